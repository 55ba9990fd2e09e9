"""Kodak figures of the shipped single-view codec: real bytes at every quality, BD-rates, RD plot.

Also, with ``--snapshots``, the curve of BD-rate (vs CompressAI's bmshj2018-hyperprior) against
training CPU-hours, from the weight snapshots a run keeps; those points are estimated with a
hard-quantised forward (likelihood bpp), which real coding matches within about 1 %. The curve vs
bmshj2018-hyperprior is fitted with a + b·h^−p (``--fit-from``): where more of the same training levels off.

    .venv/bin/python benchmarks/kodak.py [--snapshots runs/main/snapshots]
    .venv/bin/python benchmarks/kodak.py --compare single_view_cpu runA/snapshots/step001000.pt runB/...
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import curve_fit

import lmvic  # noqa: F401
from lmvic.training.loop import validate
from lmvic.zoo import checkpoint_model, load_single_view
from pipelines.commands.eval_image import bd_rates, evaluate, landscape_batch, plot_rd

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
FIT_KEY = "bd_bmshj2018-hyperprior"  # the curve whose saturation ``--snapshots`` fits


def snapshot_curve(snap_dir: Path, kodak: Path, every: int, done: list[dict], table: Path, ranks: int = 1,
                   base_cpu_hours: float = 0.0) -> list[dict]:
    """Estimated Kodak BD-rates (every ``every``-th image) for each snapshot not yet in ``done``;
    ``table`` (CSV) is rewritten after each snapshot, so an interrupted run keeps what it measured.

    Training CPU-hours = ``base_cpu_hours`` (what the run's ``--init`` weights cost) + the run's CPU
    time × ``ranks`` (a DDP run counts each rank's CPU time once per rank).
    """
    images = landscape_batch(sorted(kodak.glob("*.png"))[::every])
    rows = list(done)
    seen = {r["snapshot"] for r in done}
    for snap in sorted(snap_dir.glob("step*.pt")):
        if str(snap) in seen:
            continue
        model, _ = checkpoint_model(snap)
        est = validate(model, images, batch=1)
        res = {"bpp": [r["bpp"] for r in est], "psnr-rgb": [r["psnr"] for r in est]}
        bd = bd_rates(res, kodak / "compressai-results")
        ck = torch.load(snap, map_location="cpu", weights_only=False)
        rows.append({"snapshot": str(snap), "step": ck["step"], "cpu_hours": base_cpu_hours + ranks * ck["cpu_seconds"] / 3600,
                     "images": len(images),
                     **{f"bd_{k}": (v if isinstance(v, float) else float("nan")) for k, v in bd.items()
                        if not k.endswith("range")}})
        print(rows[-1], flush=True)
        write_table(table, rows)
    return rows


def saturation_fit(hours: np.ndarray, bd: np.ndarray) -> tuple[float, float, float]:
    """Least-squares fit of ``bd ≈ a + b·hours^−p`` (BD-rate levelling off at ``a`` as training goes on) →
    (a, b, p)."""
    (a, b, p), _ = curve_fit(lambda h, a, b, p: a + b * h ** -p, hours, bd, p0=(bd.min(), bd.max() * hours.min(), 1.0),
                             maxfev=20000)
    return float(a), float(b), float(p)


def compare(sources: list[str], kodak: Path, every: int) -> None:
    """Estimated Kodak curves (likelihood bpp, every ``every``-th image) of shipped weights or run
    checkpoints/snapshots, and the BD-rate (PSNR) of each against the first: equal-budget A/B runs."""
    from pipelines.rd import BDRateError, bd_rate

    images = landscape_batch(sorted(kodak.glob("*.png"))[::every])
    curves = {}
    for src in sources:
        model = checkpoint_model(Path(src))[0] if src.endswith(".pt") else load_single_view(src)
        curves[src] = validate(model, images, batch=1)
        print(src, " ".join(f"q{r['quality']} {r['bpp']:.4f}/{r['psnr']:.2f}" for r in curves[src]), flush=True)
    def rate_psnr(src: str) -> tuple[list[float], list[float]]:
        return [r["bpp"] for r in curves[src]], [r["psnr"] for r in curves[src]]

    for src in sources[1:]:
        try:
            bd = f"{bd_rate(*rate_psnr(sources[0]), *rate_psnr(src)):+.1f} %"
        except BDRateError as exc:
            bd = f"n/a ({exc})"
        print(f"BD-rate of {src} vs {sources[0]} ({len(images)} Kodak images, estimated): {bd}")


def write_table(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kodak", type=Path, default=Path("/work/shared/kodak"))
    ap.add_argument("--weights", default="single_view_cpu")
    ap.add_argument("--snapshots", type=Path, default=None, help="a run's snapshots folder")
    ap.add_argument("--compare", nargs="+", default=None, metavar="WEIGHTS",
                    help="estimated curves of these shipped names or .pt checkpoints/snapshots, BD-rate vs the first")
    ap.add_argument("--every", type=int, default=1, help="snapshots, compare: probe every k-th Kodak image")
    ap.add_argument("--ranks", type=int, default=1, help="snapshots: DDP processes of the run (CPU time × ranks)")
    ap.add_argument("--base-cpu-hours", type=float, default=0.0,
                    help="snapshots: CPU-hours already spent on the run's --init weights")
    ap.add_argument("--table", default="kodak_bd_vs_cpu_hours", help="snapshots: output name (csv and png)")
    ap.add_argument("--fit-from", type=float, default=5.0, metavar="HOURS",
                    help="snapshots: fit a + b·h^-p to the BD-rates vs bmshj2018-hyperprior from this many CPU-hours on")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    anchors = args.kodak / "compressai-results"
    if args.compare:
        compare(args.compare, args.kodak, args.every)
        return
    if args.snapshots is not None:
        table = OUT / f"{args.table}.csv"
        done = []
        if table.exists():
            with open(table) as f:
                done = list(csv.DictReader(f))
        rows = snapshot_curve(args.snapshots, args.kodak, args.every, done, table, args.ranks, args.base_cpu_hours)
        rows = [{k: (v if k == "snapshot" else float(v)) for k, v in r.items()} for r in rows]
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for key in [k for k in rows[0] if k.startswith("bd_")]:
            ax.plot([r["cpu_hours"] for r in rows], [r[key] for r in rows], "o-", label=key[3:])
        fitted = [(r["cpu_hours"], r[FIT_KEY]) for r in rows if r["cpu_hours"] >= args.fit_from and np.isfinite(r[FIT_KEY])]
        if len(fitted) >= 4:
            hours, bd = map(np.array, zip(*fitted))
            a, b, p = saturation_fit(hours, bd)
            print(f"{FIT_KEY[3:]}: BD-rate ≈ {a:+.1f} + {b:.0f}·h^-{p:.2f} over the {len(fitted)} snapshots from "
                  f"{args.fit_from:g} CPU-hours: levels off at {a:+.1f} %")
            grid = np.linspace(hours.min(), 4 * hours.max(), 100)
            ax.plot(grid, a + b * grid ** -p, "k--", lw=0.8, label=f"fit: {FIT_KEY[3:]} → {a:+.0f} %")
        ax.axhline(0, color="k", lw=0.5)
        ax.set(xlabel="training CPU-hours", ylabel="Kodak BD-rate (%) (estimated)", title="BD-rate vs CPU time")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(OUT / f"{args.table}.png", dpi=110)
        return
    model = load_single_view(args.weights)
    results = evaluate(model, sorted(args.kodak.glob("*.png")), list(range(1, model.num_qualities + 1)))
    bd = bd_rates(results, anchors)
    name = "lmvic-single-view-cpu"
    (OUT / "kodak_single_view.json").write_text(json.dumps(
        {"name": name, "description": "lmvic variable-rate single-view codec (cpu size), real bytes, 24 Kodak images",
         "results": results, "bd_rate_percent": bd}, indent=1) + "\n")
    plot_rd({name: results}, anchors, OUT / "kodak_single_view.png", "Kodak")
    print(f"{'q':>2s} {'bpp':>7s} {'PSNR':>6s} {'MS-SSIM':>7s} {'enc s':>6s} {'dec s':>6s}")
    for i in range(len(results["bpp"])):
        print(f"{i + 1:2d} {results['bpp'][i]:7.4f} {results['psnr-rgb'][i]:6.2f} {results['ms-ssim-rgb'][i]:7.4f} "
              f"{results['encoding_time'][i]:6.2f} {results['decoding_time'][i]:6.2f}")
    for label, v in bd.items():
        print(f"BD-rate vs {label}: {v:+.1f} %" if isinstance(v, float) else f"{label}: {v}")


if __name__ == "__main__":
    main()
