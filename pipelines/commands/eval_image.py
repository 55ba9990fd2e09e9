"""``lmvic eval-image FOLDER``: the shipped single-view codec at every quality on a folder of images.

Real bytes (pad to a multiple of 64 by edge replication, crop back), PSNR/MS-SSIM on 8-bit RGB,
bpp from the stream's bytes over the original pixels. Writes a CompressAI-format results JSON,
an RD plot with the published curves found in ``FOLDER/compressai-results`` (or ``--anchors``),
and BD-rates (``bjontegaard``, Akima) against them.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from pipelines.errors import LmvicError

#: Published curves used as BD-rate anchors: label → file in the anchors folder.
ANCHORS = {
    "bmshj2018-hyperprior": "compressai-bmshj2018-hyperprior_mse_cpu.json",
    "BPG 4:4:4": "bpg_444_x265_ycbcr.json",
    "WebP": "webp.json",
    "JPEG": "jpeg.json",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval-image", help="RD evaluation of the single-view codec on an image folder")
    p.add_argument("folder", type=Path, help="folder of PNG images (e.g. Kodak)")
    p.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    p.add_argument("--weights", default="single_view_cpu", help="shipped weight name in lmvic/weights")
    p.add_argument("--checkpoint", type=Path, default=None, help="evaluate a training checkpoint instead")
    p.add_argument("--qualities", default="", help="comma-separated quality levels (default: all)")
    p.add_argument("--anchors", type=Path, default=None, help="folder of CompressAI result JSONs")
    p.add_argument("--name", default="lmvic-single-view", help="codec name in the JSON and plot")
    p.add_argument("--refine", type=int, default=0, metavar="STEPS",
                   help="encoder-side latent refinement steps per image (lmvic.refine; 0: off)")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(handler=run)


def load_model(weights: str, checkpoint: Path | None):
    """The shipped codec ``weights``, or a training checkpoint's (EMA if present) with fresh CDFs."""
    from lmvic.zoo import WeightsError, checkpoint_model, load_single_view

    try:
        if checkpoint is None:
            return load_single_view(weights)
        model, _ = checkpoint_model(checkpoint)
    except WeightsError as exc:
        raise LmvicError(str(exc)) from exc
    model.update(force=True, update_quantiles=True)
    return model.eval()


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise LmvicError(f"cannot decode image {path}")
    return np.ascontiguousarray(img[:, :, ::-1])


def landscape_batch(paths: list[Path]) -> "torch.Tensor":
    """Images of one size up to orientation (e.g. Kodak) as (n, 3, H, W) in [0, 1], portrait ones transposed."""
    import torch

    imgs = [read_image(p) for p in paths]
    imgs = [a.transpose(1, 0, 2) if a.shape[0] > a.shape[1] else a for a in imgs]
    if len({a.shape for a in imgs}) != 1:
        raise LmvicError("images differ in size beyond orientation")
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div(255)


def encode_image(model, rgb: np.ndarray, quality: int, refine_steps: int = 0) -> bytes:
    """(H, W, 3) uint8 → single-view stream bytes (padded to multiples of 64 by edge replication;
    ``refine_steps``: encoder-side latent refinement, ``lmvic.refine``)."""
    from lmvic.models.bitstream import ImageStream
    from lmvic.scene_codec import padded_image

    c = model.compress(padded_image(rgb), quality, refine_steps=refine_steps, valid=rgb.shape[:2])
    return ImageStream(quality, *rgb.shape[:2], tuple(s[0] for s in c["strings"])).to_bytes()


def decode_image(model, data: bytes) -> np.ndarray:
    """Stream bytes → (H, W, 3) uint8 (the codec's quality is read from the stream)."""
    import torch

    from lmvic.models.bitstream import ImageStream
    from lmvic.scene_codec import to_uint8

    s = ImageStream.from_bytes(data)
    if not 1 <= s.quality <= model.num_qualities:
        raise LmvicError(f"stream quality {s.quality} not in this model's 1..{model.num_qualities}")
    if len(s.chunks) != model.num_strings:
        raise LmvicError(f"the stream has {len(s.chunks)} chunks; this model codes {model.num_strings}")
    shape = (math.ceil(s.height / 64), math.ceil(s.width / 64))
    with torch.no_grad():
        x_hat = model.decompress([[c] for c in s.chunks], shape, s.quality)["x_hat"]
    return to_uint8(x_hat, s.height, s.width)


def evaluate(model, paths: list[Path], qualities: list[int], log=print, refine_steps: int = 0
             ) -> dict[str, list[float]]:
    """Mean bpp, PSNR, MS-SSIM and times per quality over ``paths`` (CompressAI's result keys)."""
    from pipelines.metrics import bpp, ms_ssim, psnr

    res: dict[str, list[float]] = {k: [] for k in
                                   ("psnr-rgb", "ms-ssim-rgb", "bpp", "encoding_time", "decoding_time")}
    images = [read_image(p) for p in paths]
    for q in qualities:
        acc = {k: 0.0 for k in res}
        for img in images:
            t0 = time.perf_counter()
            data = encode_image(model, img, q, refine_steps)
            t1 = time.perf_counter()
            rec = decode_image(model, data)
            t2 = time.perf_counter()
            acc["psnr-rgb"] += psnr(img, rec)
            acc["ms-ssim-rgb"] += ms_ssim(img, rec)
            acc["bpp"] += bpp(len(data), *img.shape[:2])
            acc["encoding_time"] += t1 - t0
            acc["decoding_time"] += t2 - t1
        for k in res:
            res[k].append(acc[k] / len(images))
        log(f"q{q}: {res['bpp'][-1]:.4f} bpp  {res['psnr-rgb'][-1]:.2f} dB  MS-SSIM {res['ms-ssim-rgb'][-1]:.4f}")
    return res


def load_anchor(path: Path) -> dict[str, list[float]]:
    return json.loads(path.read_text())["results"]


def bd_rates(results: dict[str, list[float]], anchors_dir: Path) -> dict[str, float | str]:
    """BD-rate (%) of ``results`` against each anchor in ``ANCHORS`` on PSNR-RGB (Akima), integrated
    over the PSNR interval both curves cover (``"<label> PSNR range"`` gives it; the curves of a
    briefly trained model may overlap an anchor only partly). Where it cannot be computed, the reason."""
    from pipelines.rd import BDRateError, bd_rate

    out: dict[str, float | str] = {}
    for label, fname in ANCHORS.items():
        if not (anchors_dir / fname).exists():
            continue
        a = load_anchor(anchors_dir / fname)
        low = max(min(a["psnr-rgb"]), min(results["psnr-rgb"]))
        high = min(max(a["psnr-rgb"]), max(results["psnr-rgb"]))
        try:
            out[label] = bd_rate(a["bpp"], a["psnr-rgb"], results["bpp"], results["psnr-rgb"], min_overlap=0.01)
            out[f"{label} PSNR range"] = f"{low:.2f}-{high:.2f} dB"
        except BDRateError as exc:
            out[label] = str(exc)
    return out


def plot_rd(curves: dict[str, dict[str, list[float]]], anchors_dir: Path | None, out: Path,
            title: str) -> Path:
    """PSNR-vs-bpp plot of ``curves`` (label → results) plus every anchor JSON found."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    if anchors_dir is not None:
        for label, fname in ANCHORS.items():
            if (anchors_dir / fname).exists():
                a = load_anchor(anchors_dir / fname)
                ax.plot(a["bpp"], a["psnr-rgb"], "--", lw=1, label=label)
    for label, r in curves.items():
        ax.plot(r["bpp"], r["psnr-rgb"], "o-", lw=2, label=label)
    ax.set(xlabel="bpp", ylabel="PSNR-RGB (dB)", title=title, xlim=(0, 1.0), ylim=(20, 38))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def check_refine_steps(steps: int) -> None:
    """``--refine STEPS`` of the evaluation commands: a count from 0, else a one-line ``LmvicError``."""
    if steps < 0:
        raise LmvicError(f"--refine {steps}: give a number of steps ≥ 0")


def run(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    check_refine_steps(args.refine)
    paths = sorted(p for p in args.folder.glob("*.png"))
    if not paths:
        raise LmvicError(f"no PNG images in {args.folder}")
    model = load_model(args.weights, args.checkpoint)
    qualities = ([int(q) for q in args.qualities.split(",")] if args.qualities
                 else list(range(1, model.num_qualities + 1)))
    for q in qualities:
        if not 1 <= q <= model.num_qualities:
            raise LmvicError(f"quality {q} not in 1..{model.num_qualities}")
    results = evaluate(model, paths, qualities, refine_steps=args.refine)
    anchors = args.anchors or args.folder / "compressai-results"
    anchors = anchors if anchors.is_dir() else None
    bd = bd_rates(results, anchors) if anchors else {}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.name}_{args.folder.name}"
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"name": args.name, "description": f"real bytes, {len(paths)} images, qualities {qualities}"
                        + (f", {args.refine} latent refinement steps" if args.refine else ""),
         "results": results, "bd_rate_percent": bd}, indent=1) + "\n")
    plot_rd({args.name: results}, anchors, args.out / f"{stem}.png", f"{args.folder.name}: {args.name}")
    for label, v in bd.items():
        print(f"BD-rate vs {label}: {v:+.1f} %" if isinstance(v, float) else f"{label}: {v}")
    print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.png')}")
