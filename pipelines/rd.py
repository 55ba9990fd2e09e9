"""Rate-distortion evaluation for any codec: RD points, BD-rate, CompressAI-format JSON, table, plot.

A codec is anything with ``name``, ``description``, ``qualities`` and
``encode_decode(views, quality) -> Coded`` (:class:`Codec`); the traditional anchors live in
:mod:`pipelines.anchors`, learned codecs plug in the same way. Metrics come from
:mod:`pipelines.metrics`: PSNR on 8-bit RGB and MS-SSIM per view, averaged over views; bpp is the
total bytes · 8 over the total original pixels of all views.

The results JSON follows CompressAI's eval layout (``name``, ``description``, ``results`` with lists
``psnr-rgb``, ``ms-ssim-rgb``, ``bpp``, ``encoding_time``, ``decoding_time``, one entry per rate
point; times are seconds per view) plus lmvic's extra keys ``qualities``, ``views`` (coding
order), ``per_view`` and ``bd_rate_percent``, which CompressAI's readers ignore.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from pipelines.metrics import bpp, psnr

MIN_SIDE = 160  # MS-SSIM's five scales with an 11-tap window need sides > 160 px
METRICS = ("psnr", "ms-ssim")  # BD-rate metrics: PSNR (dB) and MS-SSIM in dB, −10·log10(1 − MS-SSIM)


# ------------------------------------------------------------------ the codec protocol
@dataclass(frozen=True)
class Coded:
    """What a codec returns for one rate point: bytes per view (in the given order), the decoded
    uint8 [H, W, 3] views, and the wall seconds spent encoding and decoding all of them."""

    num_bytes: list[int]
    decoded: list[np.ndarray]
    encode_seconds: float
    decode_seconds: float
    streams: list[dict[str, int]] | None = None  # per view, bytes of each named stream (lmvic's containers)


class Codec(Protocol):
    name: str
    description: str
    qualities: Sequence[int | float]  # the rate points, in order of increasing rate

    def encode_decode(self, views: Sequence[np.ndarray], quality: int | float) -> Coded:
        """Code ``views`` (uint8 [H, W, 3] each, one size, coding order) to real bytes and back."""
        ...


# ------------------------------------------------------------------ results
@dataclass(frozen=True)
class RDPoint:
    """One rate point; per-view lists follow the coding order."""

    quality: int | float
    num_bytes: list[int]
    height: int  # every view's original size
    width: int
    psnr: list[float]
    ms_ssim: list[float]
    encode_seconds: float  # all views
    decode_seconds: float
    streams: list[dict[str, int]] | None = None  # per view: stream name → bytes, when the codec says

    @property
    def view_bpp(self) -> list[float]:
        return [bpp(b, self.height, self.width) for b in self.num_bytes]

    @property
    def bpp(self) -> float:
        """Total bytes · 8 over the total pixels (the views share one size)."""
        return float(np.mean(self.view_bpp))

    @property
    def mean_psnr(self) -> float:
        return float(np.mean(self.psnr))

    @property
    def mean_ms_ssim(self) -> float:
        return float(np.mean(self.ms_ssim))


@dataclass
class RDCurve:
    """A codec's rate points on one set of views."""

    name: str
    description: str
    views: list[str]
    points: list[RDPoint]
    views_digest: str = ""  # SHA-256 of the views' pixels (see :func:`views_digest`)

    @property
    def bpp(self) -> list[float]:
        return [p.bpp for p in self.points]

    def metric(self, metric: str) -> list[float]:
        """Mean PSNR (dB) or MS-SSIM in dB (``−10·log10(1 − MS-SSIM)``) per rate point."""
        if metric == "psnr":
            return [p.mean_psnr for p in self.points]
        if metric == "ms-ssim":
            return [ms_ssim_db(p.mean_ms_ssim) for p in self.points]
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


def ms_ssim_views(originals: Sequence[np.ndarray], decoded: Sequence[np.ndarray], chunk: int = 8) -> list[float]:
    """MS-SSIM of each pair of uint8 [H, W, 3] views (H, W > 160), batched in float32: the definition
    of :func:`pipelines.metrics.ms_ssim` (float64, one image at a time), ~15× faster, within 1e-6."""
    import torch

    from pipelines.metrics import ms_ssim_weighted

    def batch(images: Sequence[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0

    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(originals), chunk):
            values = ms_ssim_weighted(batch(originals[i:i + chunk]), batch(decoded[i:i + chunk]))
            out += [min(float(v), 1.0) for v in values]
    return out


def ms_ssim_db(value: float) -> float:
    return math.inf if value >= 1.0 else -10.0 * math.log10(1.0 - value)


def measure(codec: Codec, views: Sequence[np.ndarray], names: Sequence[str],
            log: Callable[[str], None] = print) -> RDCurve:
    """Run ``codec`` at each of its qualities on ``views`` (coding order) and measure every view."""
    shape = views[0].shape
    if any(v.shape != shape or v.dtype != np.uint8 for v in views) or len(shape) != 3 or shape[2] != 3:
        raise ValueError("views must be uint8 [H, W, 3] arrays of one size")
    if min(shape[:2]) <= MIN_SIDE:
        raise ValueError(f"views of {shape[1]}x{shape[0]} are too small for MS-SSIM (sides must exceed {MIN_SIDE} px)")
    points = []
    for q in codec.qualities:
        coded = codec.encode_decode(views, q)
        if len(coded.num_bytes) != len(views) or len(coded.decoded) != len(views):
            raise RuntimeError(f"{codec.name} q={q}: returned {len(coded.num_bytes)} sizes and "
                               f"{len(coded.decoded)} views for {len(views)} views")
        bad = [n for n, d in zip(names, coded.decoded) if d.shape != shape or d.dtype != np.uint8]
        if bad:
            raise RuntimeError(f"{codec.name} q={q}: decoded views of the wrong shape or type: {', '.join(bad)}")
        point = RDPoint(q, [int(b) for b in coded.num_bytes], shape[0], shape[1],
                        [psnr(v, d) for v, d in zip(views, coded.decoded)],
                        ms_ssim_views(views, coded.decoded),
                        coded.encode_seconds, coded.decode_seconds, coded.streams)
        points.append(point)
        log(f"{codec.name} q={q}: {point.bpp:.4f} bpp  {point.mean_psnr:.2f} dB  "
            f"MS-SSIM {point.mean_ms_ssim:.4f}  ({(point.encode_seconds + point.decode_seconds) / len(views):.2f} s/view)")
    return RDCurve(codec.name, codec.description, list(names), points, views_digest(views))


def views_digest(views: Sequence[np.ndarray]) -> str:
    """SHA-256 over the views' shapes and pixels, in order."""
    h = hashlib.sha256()
    for v in views:
        h.update(repr(v.shape).encode())
        h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()


def crop_common(views: Sequence[np.ndarray], multiple: int = 64) -> list[np.ndarray]:
    """Crop every view at its top-left corner to the largest common size that is a multiple of
    ``multiple`` (the top-left anchor keeps the camera intrinsics valid); ValueError if too small."""
    h = min(v.shape[0] for v in views) // multiple * multiple
    w = min(v.shape[1] for v in views) // multiple * multiple
    if h == 0 or w == 0:
        raise ValueError(f"views smaller than {multiple} px cannot be cropped to a multiple of {multiple}")
    return [np.ascontiguousarray(v[:h, :w]) for v in views]


# ------------------------------------------------------------------ BD-rate
class BDRateError(ValueError):
    """A BD-rate that cannot be computed meaningfully; the message says why."""


def _monotone(label: str, rate: Sequence[float], dist: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    r, d = np.asarray(rate, np.float64), np.asarray(dist, np.float64)
    if len(r) != len(d) or len(r) < 2:
        raise BDRateError(f"{label}: needs at least 2 rate points, got {len(r)}")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(d)) and np.all(r > 0)):
        raise BDRateError(f"{label}: rates must be positive and qualities finite (a lossless point cannot be used)")
    order = np.argsort(r)
    r, d = r[order], d[order]
    if np.any(np.diff(r) <= 0) or np.any(np.diff(d) <= 0):
        pairs = ", ".join(f"({a:.4g} bpp, {b:.4g})" for a, b in zip(r, d))
        raise BDRateError(f"{label}: quality does not rise strictly with rate: {pairs}")
    return r, d


def bd_rate(anchor_rate: Sequence[float], anchor_dist: Sequence[float], test_rate: Sequence[float],
            test_dist: Sequence[float], method: str = "akima", min_overlap: float = 0.5) -> float:
    """Bjøntegaard delta rate in percent of the test curve against the anchor (negative = fewer bits
    at equal quality), via the ``bjontegaard`` package (``akima``, ``pchip`` or ``cubic``).

    The curves are sorted by rate and must rise strictly; the integration interval is their common
    quality range, which must cover at least ``min_overlap`` of the shorter curve's quality range
    (so a test curve reaching far beyond the anchor is not penalised). Raises BDRateError with the
    reason otherwise.
    """
    import bjontegaard

    ra, da = _monotone("anchor", anchor_rate, anchor_dist)
    rt, dt = _monotone("test", test_rate, test_dist)
    low, high = max(da[0], dt[0]), min(da[-1], dt[-1])
    overlap = max(high - low, 0.0) / min(da[-1] - da[0], dt[-1] - dt[0])
    if overlap < min_overlap:
        raise BDRateError(f"quality ranges overlap too little ({overlap:.0%} < {min_overlap:.0%}): anchor "
                          f"{da[0]:.2f}–{da[-1]:.2f}, test {dt[0]:.2f}–{dt[-1]:.2f}")
    return float(bjontegaard.bd_rate(ra, da, rt, dt, method=method, require_matching_points=False,
                                     min_overlap=0.0))


def curve_bd_rates(anchor: RDCurve, test: RDCurve, **kwargs) -> dict[str, float | str]:
    """BD-rate (%) of ``test`` vs ``anchor`` per metric in :data:`METRICS`; the reason string where
    it cannot be computed."""
    out: dict[str, float | str] = {}
    for metric in METRICS:
        try:
            out[metric] = bd_rate(anchor.bpp, anchor.metric(metric), test.bpp, test.metric(metric), **kwargs)
        except BDRateError as exc:
            out[metric] = str(exc)
    return out


# ------------------------------------------------------------------ files
def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None  # JSON has no infinity (a lossless view's PSNR)


def to_compressai_json(curve: RDCurve, bd_rates: dict | None = None) -> dict:
    """The CompressAI eval layout (``results`` lists per rate point) plus lmvic's per-view detail."""
    n = len(curve.views)
    pts = curve.points
    out = {
        "name": curve.name,
        "description": curve.description,
        "results": {
            "psnr-rgb": [_finite(p.mean_psnr) for p in pts],
            "ms-ssim-rgb": [p.mean_ms_ssim for p in pts],
            "bpp": [p.bpp for p in pts],
            "encoding_time": [p.encode_seconds / n for p in pts],
            "decoding_time": [p.decode_seconds / n for p in pts],
        },
        "qualities": [p.quality for p in pts],
        "views": curve.views,
        "views_sha256": curve.views_digest,
        "per_view": [{"quality": p.quality, "bytes": p.num_bytes, "height": p.height, "width": p.width,
                      "bpp": p.view_bpp, "psnr-rgb": [_finite(x) for x in p.psnr], "ms-ssim-rgb": p.ms_ssim}
                     | ({"streams": p.streams} if p.streams is not None else {}) for p in pts],
    }
    if bd_rates is not None:
        out["bd_rate_percent"] = bd_rates
    return out


def from_compressai_json(data: dict) -> RDCurve:
    """An RDCurve from a file written by :func:`to_compressai_json` (per-view detail required)."""
    n = len(data["views"])
    enc, dec = data["results"]["encoding_time"], data["results"]["decoding_time"]
    points = [RDPoint(v["quality"], v["bytes"], v["height"], v["width"],
                      [math.inf if x is None else x for x in v["psnr-rgb"]], v["ms-ssim-rgb"], e * n, d * n,
                      v.get("streams"))
              for v, e, d in zip(data["per_view"], enc, dec)]
    return RDCurve(data["name"], data["description"], data["views"], points, data.get("views_sha256", ""))


def load_matching(path: Path, codec: Codec, names: Sequence[str], digest: str) -> RDCurve | None:
    """The curve stored at ``path`` if it was measured by this codec (name, description, qualities)
    on these views (names in this order, pixels with this :func:`views_digest`); None otherwise or
    if unreadable."""
    try:
        curve = from_compressai_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    same = (curve.name == codec.name and curve.description == codec.description and curve.views == list(names)
            and [p.quality for p in curve.points] == list(codec.qualities) and curve.views_digest == digest)
    return curve if same else None


def earlier_curves(out_dir: Path, names: Sequence[str], digest: str, skip: set[str]) -> list[RDCurve]:
    """The curves in ``out_dir/*.json`` measured on these views (names in this order, pixels with
    this :func:`views_digest`) by codecs not named in ``skip``, sorted by codec name; unreadable or
    foreign JSON files are ignored."""
    curves = []
    for path in sorted(out_dir.glob("*.json")):
        try:
            curve = from_compressai_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if curve.name not in skip and curve.views == list(names) and curve.views_digest == digest:
            curves.append(curve)
    return curves


def write_json(curve: RDCurve, path: Path, bd_rates: dict | None = None) -> Path:
    path.write_text(json.dumps(to_compressai_json(curve, bd_rates), indent=1, allow_nan=False) + "\n")
    return path


TABLE_COLUMNS = ("codec", "quality", "bpp", "psnr_rgb", "ms_ssim_rgb", "encode_s_per_view", "decode_s_per_view")


def table_rows(curves: Sequence[RDCurve]) -> list[tuple]:
    """One row per codec and rate point, columns :data:`TABLE_COLUMNS`."""
    return [(c.name, p.quality, p.bpp, p.mean_psnr, p.mean_ms_ssim, p.encode_seconds / len(c.views),
             p.decode_seconds / len(c.views)) for c in curves for p in c.points]


def write_table(curves: Sequence[RDCurve], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(TABLE_COLUMNS)
        for row in table_rows(curves):
            writer.writerow([row[0], row[1], *(f"{x:.6g}" for x in row[2:])])
    return path


def format_table(curves: Sequence[RDCurve]) -> str:
    rows = table_rows(curves)
    w = max([12] + [len(row[0]) for row in rows])  # the codec column fits the longest name
    lines = [f"{'codec':<{w}} {'q':>6} {'bpp':>8} {'PSNR':>7} {'MS-SSIM':>8} {'enc s/v':>8} {'dec s/v':>8}"]
    for name, q, b, p, m, e, d in rows:
        lines.append(f"{name:<{w}} {q!s:>6} {b:8.4f} {p:7.2f} {m:8.4f} {e:8.3f} {d:8.3f}")
    return "\n".join(lines)


def plot_rd(curves: Sequence[RDCurve], path: Path, title: str) -> Path:
    """PNG with PSNR-RGB vs bpp and MS-SSIM (dB) vs bpp (log-scale bpp) for every curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for curve in curves:
        for ax, metric in zip(axes, METRICS):
            ax.plot(curve.bpp, curve.metric(metric), "o-", ms=4, lw=1.5, label=curve.name)
    axes[0].set(xlabel="bpp", ylabel="PSNR-RGB (dB)", title=f"{title}: PSNR")
    axes[1].set(xlabel="bpp", ylabel="MS-SSIM (dB) = −10·log10(1 − MS-SSIM)", title=f"{title}: MS-SSIM")
    for ax in axes:
        ax.set_xscale("log")  # rate points span ~0.03–3 bpp
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_bd_rates(bd_rates: dict[str, dict[str, float | str]], reference: str) -> str:
    lines = [f"BD-rate vs {reference} (negative = fewer bits at equal quality):"]
    w = max([12] + [len(name) for name in bd_rates])
    for name, values in bd_rates.items():
        cells = [f"{m} {v:+.1f} %" if isinstance(v, float) else f"{m} n/a ({v})" for m, v in values.items()]
        lines.append(f"  {name:<{w}} " + "   ".join(cells))
    return "\n".join(lines)


def write_bd_rates(bd_rates: dict[str, dict[str, float | str]], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("codec", *(f"bd_rate_{m}_percent" for m in METRICS)))
        for name, values in bd_rates.items():
            writer.writerow((name, *(f"{values[m]:.3f}" if isinstance(values[m], float) else "" for m in METRICS)))
    return path


def run_evaluation(codecs: Sequence[Codec], views: Sequence[np.ndarray], names: Sequence[str], out_dir: Path,
                   title: str, reference: str = "x265-ldp", reuse: bool = True,
                   log: Callable[[str], None] = print) -> tuple[list[RDCurve], dict[str, dict[str, float | str]]]:
    """Measure every codec on ``views`` (coding order), then write into ``out_dir``: ``<codec>.json``
    (CompressAI layout, with BD-rates vs ``reference`` if it is among the codecs), ``table.csv``,
    ``bd_rate.csv`` and ``rd.png``; log the table and the BD-rates. Returns (curves, BD-rates).

    With ``reuse``, a codec whose ``<codec>.json`` already holds the same views (names, order and
    pixels), description and qualities is read back instead of re-run (see :func:`load_matching`).
    The table, BD-rates and plot also keep the other codecs of ``out_dir`` measured earlier on the
    same views (:func:`earlier_curves`), so evaluating one more codec never drops the others."""
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = []
    digest = views_digest(views)
    for codec in codecs:
        path = out_dir / f"{codec.name}.json"
        cached = load_matching(path, codec, names, digest) if reuse else None
        if cached is not None:
            log(f"{codec.name}: reusing {path} (same views, settings and qualities)")
            curves.append(cached)
            continue
        curves.append(measure(codec, views, names, log))
        write_json(curves[-1], path)  # kept even if a later codec fails
    earlier = earlier_curves(out_dir, names, digest, {c.name for c in codecs})
    if earlier:
        log(f"also in the table, measured earlier on the same views: {', '.join(c.name for c in earlier)}")
    curves += earlier
    anchor = next((c for c in curves if c.name == reference), None)
    bd = {c.name: curve_bd_rates(anchor, c) for c in curves if c is not anchor} if anchor else {}
    for curve in curves:
        write_json(curve, out_dir / f"{curve.name}.json", {"anchor": reference, **bd[curve.name]}
                   if curve.name in bd else None)
    write_table(curves, out_dir / "table.csv")
    write_bd_rates(bd, out_dir / "bd_rate.csv")
    plot_rd(curves, out_dir / "rd.png", title)
    log(format_table(curves))
    log(format_bd_rates(bd, reference) if anchor else f"no BD-rates: {reference} was not evaluated")
    return curves, bd
