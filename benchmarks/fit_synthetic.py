"""Fit 3D Gaussians to a scene's SfM output and report time, memory, PSNR and depth accuracy.

Reads ``WORK/sfm/cameras.json``, ``WORK/sfm/points.npz`` and the undistorted images written by the
geometry stage's SfM step, fits with ``FitConfig`` defaults (or --iterations/--max-side) on all
views except every 8th, and prints: wall time, peak RSS, Gaussian count, PSNR on the training
views and on the held-out views (every 8th, rendered at the working resolution). With --gt SCENE
(a scene with ``gt/cameras.json`` and ``depth_gt/*.npy``, e.g. the generated synthetic scene), the
fitted Gaussians are moved into the ground-truth frame by the similarity that best aligns the SfM
camera centres to the true ones (Umeyama), rendered at the true cameras, and the median depth is
compared with the true depth: AbsRel, delta < 1.05 and the valid fraction.

Usage: python benchmarks/fit_synthetic.py WORK_DIR [--gt SCENE_DIR] [--iterations N] [--max-side PX]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from geometry.depth import render_depths
from geometry.cameras import camera_centres
from geometry.gaussian_fit import FitConfig, Gaussians, fit_gaussians, render, working_images
from geometry.similarity import umeyama


def transform(g: Gaussians, scale: float, rot: np.ndarray, trans: np.ndarray) -> Gaussians:
    """Gaussians moved by x -> s R x + t (rotations composed, scales multiplied)."""
    r = torch.from_numpy(rot).float()
    w = np.sqrt(max(1e-12, 1 + np.trace(rot))) / 2
    q_r = torch.tensor([w, (rot[2, 1] - rot[1, 2]) / (4 * w), (rot[0, 2] - rot[2, 0]) / (4 * w),
                        (rot[1, 0] - rot[0, 1]) / (4 * w)], dtype=torch.float32)
    a, (b1, b2, b3) = q_r[0], q_r[1:]
    q = g.quats
    quats = torch.stack([
        a * q[:, 0] - b1 * q[:, 1] - b2 * q[:, 2] - b3 * q[:, 3],
        a * q[:, 1] + b1 * q[:, 0] + b2 * q[:, 3] - b3 * q[:, 2],
        a * q[:, 2] - b1 * q[:, 3] + b2 * q[:, 0] + b3 * q[:, 1],
        a * q[:, 3] + b1 * q[:, 2] - b2 * q[:, 1] + b3 * q[:, 0],
    ], dim=1)
    return Gaussians(means=scale * g.means @ r.T + torch.from_numpy(trans).float(), quats=quats,
                     log_scales=g.log_scales + float(np.log(scale)), logit_opacities=g.logit_opacities,
                     sh=g.sh, sh_degree=g.sh_degree)


def psnr(gaussians: Gaussians, images: list[torch.Tensor], Ks: torch.Tensor, T: torch.Tensor) -> float:
    values = []
    for img, K, view in zip(images, Ks, T):
        h, w = img.shape[:2]
        out, _, _ = render(gaussians, K[None], view[None], w, h, render_mode="RGB")
        values.append(-10 * torch.log10(((out[0].clamp(0, 1) - img) ** 2).mean()).item())
    return float(np.mean(values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--gt", type=Path)
    ap.add_argument("--iterations", type=int)
    ap.add_argument("--max-side", type=int)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cams = json.loads((args.work / "sfm" / "cameras.json").read_text())["views"]
    pts = np.load(args.work / "sfm" / "points.npz")
    images = [np.asarray(Image.open(args.work / "sfm" / v["image"]).convert("RGB")) for v in cams]
    Ks = torch.tensor([v["K"] for v in cams], dtype=torch.float32)
    T = torch.tensor([v["T"] for v in cams], dtype=torch.float32)
    held = [i for i in range(len(cams)) if i % 8 == 0]
    train = [i for i in range(len(cams)) if i % 8 != 0]
    overrides = {k: v for k, v in (("iterations", args.iterations), ("max_side", args.max_side)) if v}
    config = FitConfig(**overrides)

    t0 = time.perf_counter()
    g = fit_gaussians(pts["xyz"], pts["rgb"], [images[i] for i in train], Ks[train], T[train], config)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    work_images, work_Ks = working_images(images, Ks, config.max_side)
    print(f"fit: {len(cams)} views ({len(train)} train), {config.iterations} iterations, max side {config.max_side}: "
          f"{wall:.1f} s, peak RSS {peak:.0f} MiB, {len(g)} Gaussians")
    print(f"PSNR train {psnr(g, [work_images[i] for i in train], work_Ks[train], T[train]):.2f} dB, "
          f"held-out (every 8th) {psnr(g, [work_images[i] for i in held], work_Ks[held], T[held]):.2f} dB")
    if args.gt:
        gt = json.loads((args.gt / "gt" / "cameras.json").read_text())["views"]
        by_name = {v["name"]: v for v in gt}
        names = [v["name"] for v in cams]
        T_gt = np.array([by_name[n]["T"] for n in names])
        K_gt = np.array([by_name[n]["K"] for n in names])
        s, R, t = umeyama(camera_centres(T.double().numpy()), camera_centres(T_gt))
        err = np.linalg.norm(s * camera_centres(T.double().numpy()) @ R.T + t - camera_centres(T_gt), axis=1)
        moved = transform(g, s, R, t)
        depth_gt = np.stack([np.load(args.gt / "depth_gt" / (Path(n).stem + ".npy")) for n in names])
        h, w = depth_gt.shape[1:]
        median, _, valid, _ = render_depths(moved, K_gt, T_gt, w, h)
        truth = torch.from_numpy(depth_gt).float()
        ok = valid & (truth > 0)
        rel = (median[ok] - truth[ok]).abs() / truth[ok]
        ratio = torch.maximum(median[ok] / truth[ok], truth[ok] / median[ok])
        print(f"camera-centre error after similarity alignment: mean {err.mean():.4f}, max {err.max():.4f} "
              f"(GT units; scene scale {np.linalg.norm(camera_centres(T_gt) - camera_centres(T_gt).mean(0), axis=1).max():.2f})")
        print(f"median depth vs GT: AbsRel {rel.mean():.4f}, delta<1.05 {(ratio < 1.05).float().mean():.3f}, "
              f"valid {ok.float().mean():.3f} of GT pixels")


if __name__ == "__main__":
    main()
