"""Traditional anchors on the ``fox`` development scene, BD-rate against x265 low-delay P.

Views: ``../shared/scenes/fox/images`` in file order (capture order), resized to 512 px wide
(OpenCV area interpolation, 1080×1920 → 512×910) and cropped at the top-left to 512×896
(:func:`pipelines.rd.crop_common`), as in ``shared/ENVIRONMENT.md``. Prints the RD table, BD-rates
(PSNR and MS-SSIM) next to the figures published there, and the wall time; writes the JSONs,
table and plot into ``--out``.

Usage: nice -n 10 python benchmarks/anchors.py [--views 50] [--codecs x265-ldp,avif,...] [--out DIR]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch

import lmvic  # noqa: F401  (torchvision compatibility before pytorch_msssim/compressai)
from pipelines.anchors import ANCHORS, make_anchor
from pipelines.rd import crop_common, run_evaluation
from pipelines.scene import read_image

FOX = Path(__file__).resolve().parents[2] / "shared" / "scenes" / "fox" / "images"
#: BD-rate (PSNR) vs x265 LDP measured on fox in shared/ENVIRONMENT.md.
PUBLISHED = {"avif": 5.5, "jxl": 31.0, "x265-intra": 33.0, "webp": 41.0, "jpeg": 105.0}


def load_views(folder: Path, count: int, width: int = 512) -> tuple[list[str], list[np.ndarray]]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:count]
    views = []
    for p in paths:
        img = read_image(p)
        height = round(img.shape[0] * width / img.shape[1])
        views.append(cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA))
    return [p.name for p in paths], crop_common(views)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=50, help="first N views in file order")
    parser.add_argument("--codecs", default=",".join(ANCHORS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/anchors_fox"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not FOX.is_dir():
        raise SystemExit(f"the fox scene is not present at {FOX}")
    t0 = time.perf_counter()
    names, views = load_views(FOX, args.views)
    print(f"fox: {len(views)} views of {views[0].shape[1]}x{views[0].shape[0]}, file order")
    codecs = [make_anchor(name) for name in args.codecs.split(",")]
    _, bd = run_evaluation(codecs, views, names, args.out, f"fox ({len(views)} views)", log=lambda s: print(s, flush=True))
    print("BD-rate (PSNR) vs x265-ldp, measured here / published in shared/ENVIRONMENT.md:")
    for name, values in bd.items():
        here = values["psnr"]
        here = f"{here:+.1f} %" if isinstance(here, float) else f"n/a ({here})"
        ref = f"{PUBLISHED[name]:+.1f} %" if name in PUBLISHED else "-"
        print(f"  {name:<12} {here:>10}   {ref:>8}")
    print(f"wall time {time.perf_counter() - t0:.0f} s; outputs in {args.out}")


if __name__ == "__main__":
    main()
