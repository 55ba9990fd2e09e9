"""Training throughput on this CPU: CPU-seconds per step, images/s and pixels/s per configuration.

Measures the real training step of ``lmvic.training.loop`` (forward, RD loss, aux loss, backward,
clipping, both Adam steps) on crops from the uint8 cache, for crop/batch pairs at (roughly) equal
pixels per step, both codec sizes and 1 vs 2 threads. CPU time (``time.process_time``) is reported
beside wall time because the machine is shared: CPU time is what the budget buys.

``--compile`` measures instead the step ``lmvic train`` runs in the recipes (256-px crops, batch 4, bf16,
one thread) eager and through ``torch.compile`` (``--compile``), with the first step's cost (compiling).

``--joint`` measures instead the joint codec's training step (``lmvic train-joint``'s own loop: a
4-view clip, frozen backbone, bf16, one thread) at both codec sizes on a synthetic scene: what the
``paper`` width would cost per step on this CPU.

    .venv/bin/python benchmarks/train_throughput.py [--steps 4] [--compile | --joint]
"""
from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import torch

import lmvic  # noqa: F401
from lmvic.models.single_view import build_single_view
from lmvic.precision import mixed_precision
from lmvic.training.compile import compiled
from lmvic.training.data import CropSampler, ImageCache
from lmvic.training.loop import optimisation_step, rd_loss

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [  # (size, crop, batch, threads)
    ("cpu", 64, 32, 1), ("cpu", 128, 8, 1), ("cpu", 192, 4, 1), ("cpu", 256, 2, 1),
    ("cpu", 128, 8, 2), ("paper", 128, 8, 1),
]


def measure(size: str, crop: int, batch: int, threads: int, steps: int, cache: ImageCache,
            precision: str = "fp32", compile: bool = False, entropy: str = "hyperprior") -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_single_view(size, entropy=entropy)
    net = compiled(model, compile)
    main = [p for n, p in model.named_parameters() if not n.endswith(".quantiles")]
    aux = [p for n, p in model.named_parameters() if n.endswith(".quantiles")]
    opt, aux_opt = torch.optim.Adam(main, 1e-4), torch.optim.Adam(aux, 1e-3)
    sampler = CropSampler([cache], crop, seed=0)
    samples, start = 0.0, time.process_time()
    for i in range(steps + 1):  # the first step warms up allocators (and compiles) and is not counted
        if i == 1:
            c0, w0 = time.process_time(), time.perf_counter()
            first = c0 - start
        s0 = time.process_time()
        x = sampler.batch(batch)
        samples += time.process_time() - s0 if i else 0.0
        q = torch.randint(1, model.num_qualities + 1, (batch,)).float()
        with mixed_precision(precision):
            loss, _, _ = rd_loss(net, model, x, q)
        optimisation_step(loss, opt, main, 1.0, model.aux_loss(), aux_opt)
    cpu, wall = (time.process_time() - c0) / steps, (time.perf_counter() - w0) / steps
    return {"size": size, "crop": crop, "batch": batch, "threads": threads, "cpu_s_per_step": cpu,
            "wall_s_per_step": wall, "sampling_cpu_s": samples / steps, "images_per_cpu_s": batch / cpu,
            "kpixels_per_cpu_s": batch * crop * crop / cpu / 1e3, "first_step_cpu_s": first}


def compile_table(steps: int, cache: ImageCache) -> None:
    print(f"{'forward':9s} {'CPU s/step':>10s} {'wall s/step':>11s} {'img/CPU-s':>9s} {'first step CPU s':>16s}")
    for compile in (False, True):
        r = measure("cpu", 256, 4, 1, steps, cache, precision="bf16", compile=compile, entropy="qpem")
        print(f"{'compiled' if compile else 'eager':9s} {r['cpu_s_per_step']:10.3f} {r['wall_s_per_step']:11.3f} "
              f"{r['images_per_cpu_s']:9.2f} {r['first_step_cpu_s']:16.1f}", flush=True)


def measure_joint(size: str, crop: int, steps: int, scene: Path, run_dir: Path) -> dict:
    """Wall seconds per step of ``train_joint`` (the first step, which warms up, is not counted)."""
    from lmvic.joint_training import JointTrainConfig, train_joint

    cfg = JointTrainConfig(str(run_dir), (str(scene),), size=size, steps=steps + 1, batch=1, crop=crop,
                           freeze_backbone=True, precision="bf16", log_every=1, ckpt_every=10**9)
    codec = train_joint(cfg, log=lambda _: None)
    with open(run_dir / "train.csv", newline="") as f:
        seconds = [float(r["s_per_step"]) for r in csv.DictReader(f)][1:]
    trained = sum(p.numel() for n, p in codec.named_parameters() if not n.startswith("image.backbone."))
    return {"size": size, "crop": crop, "s_per_step": sum(seconds) / len(seconds), "trained_params": trained}


def joint_table(steps: int) -> None:
    from scenes.synthetic import ArcCameras, generate

    torch.set_num_threads(1)
    print(f"{'size':6s} {'crop':>4s} {'s/step':>7s} {'clips/h':>7s} {'trained params':>14s}")
    with tempfile.TemporaryDirectory() as tmp:
        scene = generate(Path(tmp) / "scene", ArcCameras(n_views=6, width=320, height=256), seed=0)
        for size in ("cpu", "paper"):
            r = measure_joint(size, 256, steps, scene, Path(tmp) / size)
            print(f"{r['size']:6s} {r['crop']:4d} {r['s_per_step']:7.2f} {3600 / r['s_per_step']:7.0f} "
                  f"{r['trained_params'] / 1e6:13.2f}M", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "cache")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--compile", action="store_true", help="the recipes' step, eager and compiled, instead")
    mode.add_argument("--joint", action="store_true", help="the joint codec's training step at both sizes instead")
    args = ap.parse_args()
    if args.joint:
        return joint_table(args.steps)
    cache = ImageCache(args.cache)
    if args.compile:
        return compile_table(args.steps, cache)
    print(f"{'size':6s} {'crop':>4s} {'batch':>5s} {'thr':>3s} {'CPU s/step':>10s} {'wall s/step':>11s} "
          f"{'sample s':>8s} {'img/CPU-s':>9s} {'kpx/CPU-s':>9s}")
    for cfg in CONFIGS:
        r = measure(*cfg, steps=args.steps, cache=cache)
        print(f"{r['size']:6s} {r['crop']:4d} {r['batch']:5d} {r['threads']:3d} {r['cpu_s_per_step']:10.3f} "
              f"{r['wall_s_per_step']:11.3f} {r['sampling_cpu_s']:8.4f} {r['images_per_cpu_s']:9.2f} "
              f"{r['kpixels_per_cpu_s']:9.1f}", flush=True)


if __name__ == "__main__":
    main()
