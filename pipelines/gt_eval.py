"""Accuracy of stage one against a scene's ground truth (``gt/cameras.json`` + ``depth_gt/``).

SfM recovers cameras up to a similarity; the reconstructed camera centres are aligned to the true
ones (Umeyama). Undistortion may crop the working images, so depth is compared through 3-D points,
not pixel by pixel: every pixel with estimated depth is back-projected with the estimated camera,
mapped by the similarity into the true frame and projected into the true camera; its z there (d)
is compared with the ground-truth depth at that pixel (d*). AbsRel = mean |d - d*| / d*,
δ<1.05 = fraction with max(d/d*, d*/d) < 1.05, over points landing on ground-truth depth.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from geometry.cameras import camera_centres
from geometry.similarity import umeyama
from pipelines.cache import read_json
from pipelines.errors import LmvicError
from pipelines.geometry_stage import DEPTH_KINDS, load_cameras, load_depth


def geometry_accuracy(scene_root: Path, work_dir: Path) -> dict:
    """Camera-centre error (relative to the camera spread) and depth accuracy per depth kind."""
    gt_path = Path(scene_root) / "gt" / "cameras.json"
    if not gt_path.is_file():
        raise LmvicError(f"{scene_root} has no gt/cameras.json")
    gt = {v["name"]: v for v in read_json(gt_path)["views"]}
    cams = load_cameras(Path(work_dir) / "sfm")
    names = [n for n in cams.names if n in gt]
    est_c = camera_centres(cams.T[[cams.names.index(n) for n in names]])
    gt_c = camera_centres(np.array([gt[n]["T"] for n in names]))
    s, R, t = umeyama(est_c, gt_c)
    err = np.linalg.norm(s * est_c @ R.T + t - gt_c, axis=1)
    spread = np.linalg.norm(gt_c - gt_c.mean(0), axis=1).max()
    out = {"views": len(names), "camera_centre_error_rel": float(err.mean() / spread), "scale": s}
    for kind in DEPTH_KINDS:
        ratios, valid_frac = [], []
        for i, name in enumerate(names):
            est = load_depth(Path(work_dir) / "depth", kind, name)
            ref = np.load(Path(scene_root) / "depth_gt" / f"{Path(name).stem}.npy")
            j = cams.names.index(name)
            d, d_star = _reprojected(est, cams.K[j], cams.T[j], (s, R, t), np.array(gt[name]["K"]),
                                     np.array(gt[name]["T"]), ref)
            ratios.append(d / d_star)
            valid_frac.append(float((est > 0).mean()))
        r = np.concatenate(ratios)
        out[kind] = {"abs_rel": float(np.abs(r - 1).mean()), "delta_1.05": float((np.maximum(r, 1 / r) < 1.05).mean()),
                     "valid_fraction": float(np.mean(valid_frac))}
    return out


def _reprojected(est: np.ndarray, K: np.ndarray, T: np.ndarray, sim: tuple, K_gt: np.ndarray, T_gt: np.ndarray,
                 depth_gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d, d*) for the estimated depth pixels that land on ground-truth depth (see the module doc)."""
    s, R, t = sim
    v, u = np.nonzero(est > 0)
    z = est[v, u].astype(np.float64)
    cam = (np.linalg.inv(K) @ np.stack([u + 0.5, v + 0.5, np.ones_like(z)])) * z
    world = np.linalg.inv(T) @ np.vstack([cam, np.ones_like(z)])
    world_gt = s * R @ world[:3] + t[:, None]
    cam_gt = T_gt[:3, :3] @ world_gt + T_gt[:3, 3:]
    pix = K_gt @ cam_gt
    x, y = np.floor(pix[0] / pix[2]).astype(int), np.floor(pix[1] / pix[2]).astype(int)
    h, w = depth_gt.shape
    inside = (cam_gt[2] > 0) & (x >= 0) & (x < w) & (y >= 0) & (y < h)
    d_star = depth_gt[y[inside], x[inside]]
    keep = d_star > 0
    return cam_gt[2][inside][keep], d_star[keep]
