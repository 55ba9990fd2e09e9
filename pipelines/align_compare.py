"""The alignment comparison (the paper's Table 2): how well each method warps a view's reference
onto it.

Methods: ``median`` and ``mean`` (3DGS depth, :func:`geometry.warp.relate`; valid region = the
trust mask), ``homography``, ``dis`` and ``farneback`` (:mod:`geometry.align_baselines`; valid
region = the estimated position lies inside the reference), and ``opam``: the trained OPAM of the
distributed codec (:func:`opam_align`; valid region = its cycle consistency ≥ ``OPAM_VALID``). For each (target, reference) pair and
method: PSNR and MS-SSIM over all pixels and inside the method's valid region, the covered
fraction and the seconds taken (depth methods: disparity + mask + warp from given depths).

Metrics are on 8-bit RGB (the warp is rounded to 8 bits); all-pixel PSNR comes from
:mod:`pipelines.metrics`; all-pixel MS-SSIM is the masked one below with the whole image as
region (equal to ``pytorch_msssim`` to 1e-5, tested, and several times faster in float32). Inside-region metrics: PSNR from the mean squared error over the region's pixels. MS-SSIM
(Wang et al. 2003; 11×11 Gaussian window σ = 1.5, five scales, the standard weights) with the
second image replaced by the first outside the region (so only differences inside count) and each
scale's SSIM/CS map averaged with weights = the fraction of each window inside the region (the
region downsampled like the images); with the whole image as region this is the usual MS-SSIM.
A method that covers nothing gets no inside-region value (NaN, ``null`` in JSON).
"""

from __future__ import annotations

import csv
import functools
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from geometry.align_baselines import METHODS as FLAT_METHODS, align
from pipelines import metrics
from pipelines.cache import atomic_write_bytes, atomic_write_json
from pipelines.relations import DEPTH_KINDS, Views, warp_views

#: The trained OPAM of the distributed codec (no geometry; see :func:`opam_align`).
OPAM = "opam"
ALL_METHODS = (*DEPTH_KINDS, *FLAT_METHODS, OPAM)
#: Quality at which both views are coded before OPAM sees their decoded features, and the OPAM
#: consistency above which a pixel counts as validly aligned.
OPAM_QUALITY, OPAM_VALID = 6, 0.25
METRICS = ("psnr_all", "psnr_valid", "msssim_all", "msssim_valid", "coverage", "seconds")


def masked_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """PSNR in dB (peak 255) of uint8 images [H, W, 3] over the pixels of ``mask`` [H, W]."""
    if not mask.any():
        return math.nan
    mse = float(np.mean((a[mask].astype(np.float64) - b[mask].astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def masked_ms_ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """MS-SSIM of uint8 images [H, W, 3] inside ``mask`` [H, W] (see the module docstring).

    Needs both sides ≥ 161 pixels (five scales with an 11-pixel window); NaN otherwise.
    """
    b = np.where(mask[..., None], b, a)
    x, y = (torch.as_tensor(v, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0 for v in (a, b))
    return float(metrics.ms_ssim_weighted(x, y, torch.as_tensor(mask, dtype=torch.float32)[None, None])[0])


def align_pair(views: Views, target: int, reference: int, tau: float, methods: Sequence[str] = ALL_METHODS):
    """{method: (warped [H, W, 3] float32, valid [H, W] bool, seconds)}."""
    out = {}
    for method in methods:
        start = time.perf_counter()
        if method in DEPTH_KINDS:
            warped, valid = warp_views(views, method, target, reference, tau)
        elif method == OPAM:
            warped, valid = opam_align(views.image(target), views.image(reference))
        else:
            warped, valid = align(method, views.image(target), views.image(reference))
        out[method] = (warped, valid, time.perf_counter() - start)
    return out


def opam_align(target: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The shipped distributed codec's OPAM applied to the pixels (``DistributedCodec.align_side_image``):
    both uint8 [H, W, 3] views are coded at ``OPAM_QUALITY``, the finest fusion's attention moves the
    reference's pixel blocks onto the target. → (warped float32 [H, W, 3] in [0, 1], valid [H, W] =
    consistency ≥ ``OPAM_VALID``)."""
    from lmvic.scene_codec import padded_image

    h, w = target.shape[:2]
    main, side = (padded_image(v) for v in (target, reference))
    aligned, validity = _opam_codec().align_side_image(main, side, OPAM_QUALITY)
    return (aligned[0, :, :h, :w].permute(1, 2, 0).clamp(0, 1).numpy().astype(np.float32),
            validity[0, 0, :h, :w].numpy() >= OPAM_VALID)


@functools.lru_cache(maxsize=1)
def _opam_codec():
    from lmvic.models.distributed import load_distributed

    return load_distributed("distributed-cpu")


def scores(target: np.ndarray, warped: np.ndarray, valid: np.ndarray, seconds: float) -> dict[str, float]:
    """The metrics of one warped reference (float [H, W, 3] in [0, 1], rounded to 8 bits here)
    against its target (uint8 [H, W, 3])."""
    w8 = np.clip(np.round(warped * 255.0), 0, 255).astype(np.uint8)
    target = np.array(target)  # a writable copy (decoded images may be read-only)
    return {
        "psnr_all": metrics.psnr(target, w8),
        "psnr_valid": masked_psnr(target, w8, valid),
        "msssim_all": masked_ms_ssim(target, w8, np.ones(valid.shape, bool)),
        "msssim_valid": masked_ms_ssim(target, w8, valid),
        "coverage": float(valid.mean()),
        "seconds": seconds,
    }


def summarise(rows: list[dict]) -> list[dict]:
    """Per-method means over pairs (NaN values skipped; ``pairs`` counts the pairs)."""
    table = []
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        entry = {"method": method, "pairs": len(sel)}
        for key in METRICS:
            vals = np.array([r[key] for r in sel], np.float64)
            vals = vals[np.isfinite(vals)]
            entry[key] = float(vals.mean()) if len(vals) else math.nan
        table.append(entry)
    return table


def format_table(table: list[dict]) -> str:
    header = ("method", "pairs", "PSNR all", "PSNR valid", "MS-SSIM all", "MS-SSIM valid", "coverage", "s/pair")
    lines = ["{:<11}{:>6}{:>10}{:>12}{:>13}{:>15}{:>10}{:>8}".format(*header)]
    for r in table:
        lines.append("{:<11}{:>6}{:>10.2f}{:>12.2f}{:>13.4f}{:>15.4f}{:>10.3f}{:>8.2f}".format(
            r["method"], r["pairs"], r["psnr_all"], r["psnr_valid"], r["msssim_all"], r["msssim_valid"],
            r["coverage"], r["seconds"]))
    return "\n".join(lines)


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def _csv_bytes(rows: list[dict]) -> bytes:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def _figure(views: Views, shown: list[tuple[int, int, dict]], path: Path) -> None:
    """Target, reference and every method's warp (invalid pixels dimmed) for a few pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(shown[0][2])
    cols = 2 + len(methods)
    h, w = views.image(shown[0][0]).shape[:2]
    fig, axes = plt.subplots(len(shown), cols, figsize=(2.6 * cols, 2.6 * len(shown) * h / w + 0.4),
                             squeeze=False)
    for row, (t, r, warps) in zip(axes, shown):
        panels = [(f"target {views.names[t]}", views.image(t) / 255.0),
                  (f"reference {views.names[r]}", views.image(r) / 255.0)]
        for m in methods:
            warped, valid, _ = warps[m]
            shown_img = np.where(valid[..., None], warped, 0.25 * warped)
            panels.append((f"{m} ({100 * valid.mean():.0f}% valid)", shown_img))
        for ax, (title, img) in zip(row, panels):
            ax.imshow(np.clip(img, 0, 1))
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def align_compare(views: Views, pairs: Sequence[tuple[int, int]], tau: float, out: Path,
                  methods: Sequence[str] = ALL_METHODS, figure_pairs: int = 3, progress=None) -> list[dict]:
    """Run the comparison on (target, reference) index pairs; write pairs.csv, table.json,
    table.csv and figure.png into ``out``; return the per-method table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = set(np.linspace(0, len(pairs) - 1, min(figure_pairs, len(pairs))).round().astype(int).tolist())
    rows, shown = [], []
    iterator = progress(list(enumerate(pairs))) if progress else enumerate(pairs)
    for k, (t, r) in iterator:
        warps = align_pair(views, t, r, tau, methods)
        target = views.image(t)
        for method, (warped, valid, seconds) in warps.items():
            rows.append({"target": views.names[t], "reference": views.names[r], "method": method,
                         **scores(target, warped, valid, seconds)})
        if k in chosen:
            shown.append((t, r, warps))
    table = summarise(rows)
    atomic_write_bytes(out / "pairs.csv", _csv_bytes(rows))
    atomic_write_bytes(out / "table.csv", _csv_bytes(table))
    atomic_write_json(out / "table.json", _json_safe({"tau": tau, "table": table, "pairs": rows}))
    if shown:
        _figure(views, shown, out / "figure.png")
    return table
