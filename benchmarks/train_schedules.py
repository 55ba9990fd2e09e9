"""Compare training schedules (and variable rate vs one fixed λ) at equal CPU time on Kodak.

Each configuration trains for the same CPU-minutes of one thread (``lmvic train``, run folders
under ``runs/schedules/``; an existing finished run is reused), then its final weights are probed
on the 24 Kodak images with a hard-quantised forward (likelihood bpp, PSNR on 8-bit output) at
every quality. Prints a table and BD-rates vs CompressAI's bmshj2018-hyperprior, and writes
``benchmarks/results/schedules_<minutes>min.csv`` and ``.png``.

    .venv/bin/python benchmarks/train_schedules.py --minutes 5
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import torch

import lmvic  # noqa: F401
from lmvic.zoo import checkpoint_model
from lmvic.training.loop import validate
from pipelines.commands.eval_image import bd_rates, landscape_batch, plot_rd

ROOT = Path(__file__).resolve().parents[1]
CONFIGS: dict[str, list[str]] = {
    "constant-1e-4": ["--schedule", "constant", "--lr", "1e-4", "--warmup", "0"],
    "cosine-1e-3": ["--schedule", "cosine", "--lr", "1e-3", "--warmup", "100"],
    "cosine-3e-3": ["--schedule", "cosine", "--lr", "3e-3", "--warmup", "100"],
    "step-1e-3": ["--schedule", "step", "--lr", "1e-3", "--warmup", "100"],
    "fixed-q4-cosine-1e-3": ["--schedule", "cosine", "--lr", "1e-3", "--warmup", "100", "--quality", "4"],
}


def probe(ckpt: Path, images: torch.Tensor) -> dict[str, list[float]]:
    """Estimated Kodak RD of a training checkpoint (EMA weights if present)."""
    model, _ = checkpoint_model(ckpt)
    ck = torch.load(ckpt, map_location="cpu", weights_only=False)
    rows = validate(model, images, batch=1)
    return {"bpp": [r["bpp"] for r in rows], "psnr-rgb": [r["psnr"] for r in rows],
            "cpu_min": ck["cpu_seconds"] / 60, "steps": ck["step"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="CPU-minutes per configuration")
    ap.add_argument("--kodak", type=Path, default=Path("/work/shared/kodak"))
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "schedules")
    ap.add_argument("--only", default="", help="comma-separated subset of configurations")
    ap.add_argument("--probe-only", action="store_true",
                    help="probe the runs' latest checkpoints as they are (no training; unfinished runs show their CPU-minutes)")
    ap.add_argument("--every", type=int, default=1, help="probe every k-th Kodak image (1: all 24)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = args.only.split(",") if args.only else list(CONFIGS)
    for name in names:
        run = args.runs / name
        if args.probe_only or (run / "curves.png").exists():
            continue
        cmd = [sys.executable, "-m", "pipelines.commands.train", str(run), "--minutes", str(args.minutes),
               "--threads", "1", "--val-every", str(args.minutes / 2), "--ckpt-every", "1",
               "--cache", str(ROOT / "runs" / "cache"), *CONFIGS[name]]
        if (run / "checkpoint.pt").exists():
            cmd.append("--resume")
        print("training", name, flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    images = landscape_batch(sorted(args.kodak.glob("*.png"))[:: args.every])
    results, out = {}, ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"schedules_{args.minutes:g}min"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "cpu_min", "steps", "quality", "bpp_est", "psnr_est"])
        for name in names:
            r = probe(args.runs / name / "checkpoint.pt", images)
            if "--quality" in CONFIGS[name]:  # a fixed-λ model is only trained at its own level
                q = int(CONFIGS[name][CONFIGS[name].index("--quality") + 1])
                r["bpp"], r["psnr-rgb"] = r["bpp"][q - 1: q], r["psnr-rgb"][q - 1: q]
            results[name] = r
            for k, (b, p) in enumerate(zip(r["bpp"], r["psnr-rgb"]), 1):
                w.writerow([name, f"{r['cpu_min']:.2f}", r["steps"], k, f"{b:.4f}", f"{p:.3f}"])
    anchors = args.kodak / "compressai-results"
    for name, r in results.items():
        bd = bd_rates(r, anchors) if len(r["bpp"]) >= 4 else {}
        pts = " ".join(f"{b:.3f}/{p:.2f}" for b, p in zip(r["bpp"], r["psnr-rgb"]))
        hp = bd.get("bmshj2018-hyperprior")
        hp = f"{hp:+.1f} %" if isinstance(hp, float) else "n/a"
        print(f"{name:24s} {r['cpu_min']:5.1f} CPU-min {r['steps']:5d} steps  BD vs hyperprior {hp:>8s}  {pts}")
    plot_rd(results, anchors, stem.with_suffix(".png"), f"Kodak (estimated), {args.minutes:g} CPU-min per config")


if __name__ == "__main__":
    main()
