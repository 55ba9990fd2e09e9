"""Distributed mode: OPAM/PMIFM fusion against Separate (the single-view codec) and average pooling.

Every view is encoded alone by the single-view encoder (so all distributed codecs spend exactly the
single-view codec's bytes); the decoder fuses each view with its ``k`` nearest views in file order
(the previous one first). Real container bytes (``lmvic.distributed_codec``), real
decoding, PSNR of the 8-bit views. Data (held out from training):

* ``fox``: the first 8 views, area-resized to 512 px on the long side (288×512), cropped to 256×512;
* ``sceaux_castle``: its first 8 views at 512 px long side (512×384);
* ``middlebury``: the 8 stereo pairs (left, right) cropped to their common multiple of 64, k = 1:
  each view's side view is the other view of its pair.

Prints, per data set and k, the BD-rate (PSNR and MS-SSIM) of ``lmvic-distributed`` against
``lmvic-single`` and against ``lmvic-average`` at the same k (and of ``lmvic-average`` against
``lmvic-single``), and the decode seconds per view (the distributed codecs share one encoding per
quality, so their encode times are not meaningful here). JSONs, tables and RD plots go into ``--out``
(a codec already measured on the same views is read back; ``--rerun`` re-measures).

Usage: nice -n 10 python benchmarks/distributed.py [--data fox,sceaux_castle,middlebury] [--sides 1,2,3,4]
[--align-quality 6 [--align-weights DIR]]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import lmvic  # noqa: F401  (torchvision compatibility before pytorch_msssim/compressai)
from lmvic.distributed_codec import DistributedSceneCodec
from lmvic.separate_codec import SeparateCodec
from lmvic.training.data import read_rgb
from lmvic.zoo import WEIGHTS_DIR
from pipelines.rd import RDCurve, crop_common, curve_bd_rates, run_evaluation

SCENES = Path(__file__).resolve().parents[2] / "shared" / "scenes"


def image_folder(name: str, count: int, max_side: int = 512) -> tuple[list[str], list[np.ndarray]]:
    paths = sorted(p for p in (SCENES / name / "images").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    paths = paths[:count]
    return [p.name for p in paths], crop_common([read_rgb(p, max_side) for p in paths])


def middlebury_pairs() -> tuple[list[str], list[np.ndarray]]:
    """Left, right of every pair in turn (groups of 2 are the pairs)."""
    names, views = [], []
    for pair in sorted(p for p in (SCENES / "middlebury_stereo").iterdir() if p.is_dir()):
        images = sorted(p for p in pair.iterdir() if p.stem.startswith(("view", "im")))
        for p in images:
            names.append(f"{pair.name}_{p.name}")
            views.append(read_rgb(p, 4096))
    return names, crop_common(views)


DATA = {
    "fox": lambda: image_folder("fox", 8),
    "sceaux_castle": lambda: image_folder("sceaux_castle", 8),
    "middlebury": middlebury_pairs,
}


def bd_psnr(anchor: RDCurve, test: RDCurve) -> str:
    bd = curve_bd_rates(anchor, test)
    return " / ".join(f"{v:+.1f} %" if isinstance(v, float) else "n/a" for v in (bd["psnr"], bd["ms-ssim"]))


def run(data: str, sides: list[int], out: Path, rerun: bool, qualities: tuple[int, ...] = ()) -> None:
    names, views = DATA[data]()
    if data == "middlebury" and sides:
        sides = [1]
    eye_k, eye_t = np.tile(np.eye(3), (len(views), 1, 1)), np.tile(np.eye(4), (len(views), 1, 1))
    codecs = [SeparateCodec(names, eye_k, eye_t)]
    streams: dict = {}  # every distributed codec encodes with the same single-view encoder
    pairs = [[v + 1 - 2 * (v % 2)] for v in range(len(views))]  # Middlebury: each view's pair
    for k in sides:
        for model in ("distributed-cpu", "distributed-average-cpu"):
            base = {"distributed-cpu": "lmvic-distributed", "distributed-average-cpu": "lmvic-average"}[model]
            codecs.append(DistributedSceneCodec(names, eye_k, eye_t, model, pairs if data == "middlebury" else k,
                                                name=f"{base}-{k}side", shared_streams=streams))
    for codec in codecs:
        codec.qualities = tuple(q for q in codec.qualities if not qualities or q in qualities)
    print(f"== {data}: {len(views)} views of {views[0].shape[1]}x{views[0].shape[0]}, side views {sides}")
    start = time.perf_counter()
    curves, _ = run_evaluation(codecs, views, names, out / data, f"{data} ({len(views)} views), distributed mode",
                               reference="lmvic-single", reuse=not rerun)
    by_name = {c.name: c for c in curves}
    single = by_name["lmvic-single"]
    print(f"-- {data}: BD-rate PSNR / MS-SSIM (negative = fewer bits), decode s/view")
    print(f"   lmvic-single: decode {np.mean([p.decode_seconds for p in single.points]) / len(views):.2f} s/view")
    for k in sides:
        pmifm, average = by_name[f"lmvic-distributed-{k}side"], by_name[f"lmvic-average-{k}side"]
        decode = {c.name: np.mean([p.decode_seconds for p in c.points]) / len(views) for c in (pmifm, average)}
        print(f"   k={k}: OPAM+PMIFM vs Separate {bd_psnr(single, pmifm)}; vs average {bd_psnr(average, pmifm)}; "
              f"average vs Separate {bd_psnr(single, average)}; decode {decode[pmifm.name]:.2f} / "
              f"{decode[average.name]:.2f} s/view (PMIFM / average)")
    print(f"   ({time.perf_counter() - start:.0f} s)")


def gt_warp(side: np.ndarray, disparity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Right view moved onto the left by the left view's disparity (x_right = x_left − d) →
    (warped uint8, valid = known disparity landing inside the right view)."""
    import cv2

    h, w = disparity.shape
    xs = np.arange(w, dtype=np.float32)[None].repeat(h, 0) - disparity
    ys = np.arange(h, dtype=np.float32)[:, None].repeat(w, 1)
    warped = cv2.remap(side, xs, ys, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return warped, (disparity > 0) & (xs >= 0)


def psnr_in(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    mse = np.mean((a[mask].astype(np.float64) - b[mask]) ** 2)
    return float(10 * np.log10(255 ** 2 / mse))


def middlebury_alignment(quality: int, weights: Path) -> None:
    """OPAM alignment (right → left) of each pair against the ground-truth disparity warp.

    The 8-bit disparity maps are scaled per Middlebury year (2003 quarter size: ×4; 2005/2006 third
    size: ×3); the scale is checked by the warp PSNR. OPAM's mean correspondence comes from moving
    the right view's pixel x-coordinates with the attention (``align_side_image(values=...)``);
    its error against the ground truth is per pixel where the ground truth is known (median, and the
    fraction under 3 px); ``mean C`` is OPAM's mean consistency (coverage counts C ≥ ``OPAM_VALID``).
    """
    from lmvic.models.distributed import load_distributed
    from lmvic.scene_codec import padded_image
    from pipelines.align_compare import OPAM_VALID

    codec = load_distributed("distributed-cpu", weights)
    rows = []
    for pair in sorted(p for p in (SCENES / "middlebury_stereo").iterdir() if p.is_dir()):
        left_path, right_path = sorted(p for p in pair.iterdir() if p.stem.startswith(("view", "im")))
        left, right = read_rgb(left_path, 4096), read_rgb(right_path, 4096)
        raw = read_rgb(pair / f"disp{left_path.stem[-1]}.png", 4096)[..., 0].astype(np.float32)
        scale = max((1, 2, 3, 4), key=lambda s: psnr_in(left, *gt_warp(right, raw / s)))
        disparity = raw / scale
        warped, valid = gt_warp(right, disparity)
        h, w = left.shape[:2]
        main, side = (padded_image(v) for v in (left, right))
        xs = torch.arange(side.shape[-1], dtype=torch.float32).expand(1, 1, *side.shape[-2:])
        aligned, validity = codec.align_side_image(main, side, quality)
        matched_x, _ = codec.align_side_image(main, side, quality, values=xs)
        opam = (aligned[0, :, :h, :w].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        opam_valid = validity[0, 0, :h, :w].numpy() >= OPAM_VALID
        # per pixel: OPAM moves whole blocks, so its disparity is constant over each block
        opam_disp = (xs - matched_x)[0, 0, :h, :w].numpy()
        err = np.abs(opam_disp - disparity)[valid]
        rows.append((pair.name, scale, psnr_in(left, warped, valid), float(valid.mean()),
                     psnr_in(left, opam, opam_valid) if opam_valid.any() else float("nan"), float(opam_valid.mean()),
                     psnr_in(left, opam, valid), float(validity[0, 0, :h, :w].mean()), float(np.median(err)),
                     float((err < 3).mean())))
    print(f"-- Middlebury alignment, right → left (OPAM of {weights / 'distributed-cpu.pt'} at quality {quality}, "
          f"valid: consistency ≥ {OPAM_VALID})")
    print(f"{'pair':<10}{'scale':>6}{'GT PSNR':>9}{'GT cov':>8}{'OPAM PSNR':>11}{'OPAM cov':>9}"
          f"{'OPAM@GT':>9}{'mean C':>8}{'med |Δd|':>10}{'<3px':>7}")
    for r in rows:
        print(f"{r[0]:<10}{r[1]:>6}{r[2]:>9.2f}{r[3]:>8.2f}{r[4]:>11.2f}{r[5]:>9.2f}{r[6]:>9.2f}{r[7]:>8.3f}"
              f"{r[8]:>10.2f}{r[9]:>7.2f}")
    mean = np.nanmean(np.array([r[2:] for r in rows], dtype=np.float64), axis=0)
    print(f"{'mean':<16}" + "".join(f"{v:>{wd}.{p}f}" for v, wd, p in zip(mean, (9, 8, 11, 9, 9, 8, 10, 7),
                                                                         (2, 2, 2, 2, 2, 3, 2, 2))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=",".join(DATA))
    p.add_argument("--sides", default="1,2,3", help="side views per view ('' = the single-view codec only)")
    p.add_argument("--out", type=Path, default=Path("/work/runs/distributed/bench"))
    p.add_argument("--rerun", action="store_true")
    p.add_argument("--qualities", default="", help="a subset of the quality levels (default: all)")
    p.add_argument("--align-quality", type=int, default=0,
                   help="also compare OPAM's alignment with the Middlebury ground truth at this quality (0: skip)")
    p.add_argument("--align-weights", type=Path, default=WEIGHTS_DIR,
                   help="folder of the distributed-cpu weights whose OPAM is compared (default: the shipped ones)")
    a = p.parse_args()
    torch.set_num_threads(1)
    for data in [d for d in a.data.split(",") if d]:
        run(data, [int(k) for k in a.sides.split(",") if k], a.out, a.rerun,
            tuple(int(q) for q in a.qualities.split(",") if q))
    if a.align_quality:
        middlebury_alignment(a.align_quality, a.align_weights)


if __name__ == "__main__":
    main()
