"""Training throughput on this CPU: CPU-seconds per step, images/s and pixels/s per configuration.

Measures the real training step of ``lmvic.training.loop`` (forward, RD loss, aux loss, backward,
clipping, both Adam steps) on crops from the uint8 cache, for crop/batch pairs at (roughly) equal
pixels per step, both codec sizes and 1 vs 2 threads. CPU time (``time.process_time``) is reported
beside wall time because the machine is shared: CPU time is what the budget buys.

    .venv/bin/python benchmarks/train_throughput.py [--steps 4]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import lmvic  # noqa: F401
from lmvic.models.single_view import build_single_view
from lmvic.training.data import CropSampler, ImageCache
from lmvic.training.loop import rd_loss

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [  # (size, crop, batch, threads)
    ("cpu", 64, 32, 1), ("cpu", 128, 8, 1), ("cpu", 192, 4, 1), ("cpu", 256, 2, 1),
    ("cpu", 128, 8, 2), ("paper", 128, 8, 1),
]


def measure(size: str, crop: int, batch: int, threads: int, steps: int, cache: ImageCache) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_single_view(size)
    main = [p for n, p in model.named_parameters() if not n.endswith(".quantiles")]
    aux = [p for n, p in model.named_parameters() if n.endswith(".quantiles")]
    opt, aux_opt = torch.optim.Adam(main, 1e-4), torch.optim.Adam(aux, 1e-3)
    sampler = CropSampler(cache, crop, seed=0)
    samples = 0.0
    for i in range(steps + 1):  # the first step warms up allocators and is not counted
        if i == 1:
            c0, w0 = time.process_time(), time.perf_counter()
        s0 = time.process_time()
        x = sampler.batch(batch)
        samples += time.process_time() - s0 if i else 0.0
        q = torch.randint(1, model.num_qualities + 1, (batch,)).float()
        loss, _, _ = rd_loss(model, model, x, q)
        opt.zero_grad()
        aux_opt.zero_grad()
        (loss + model.aux_loss()).backward()
        torch.nn.utils.clip_grad_norm_(main, 1.0)
        opt.step()
        aux_opt.step()
    cpu, wall = (time.process_time() - c0) / steps, (time.perf_counter() - w0) / steps
    return {"size": size, "crop": crop, "batch": batch, "threads": threads, "cpu_s_per_step": cpu,
            "wall_s_per_step": wall, "sampling_cpu_s": samples / steps, "images_per_cpu_s": batch / cpu,
            "kpixels_per_cpu_s": batch * crop * crop / cpu / 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "cache")
    args = ap.parse_args()
    cache = ImageCache(args.cache)
    print(f"{'size':6s} {'crop':>4s} {'batch':>5s} {'thr':>3s} {'CPU s/step':>10s} {'wall s/step':>11s} "
          f"{'sample s':>8s} {'img/CPU-s':>9s} {'kpx/CPU-s':>9s}")
    for cfg in CONFIGS:
        r = measure(*cfg, steps=args.steps, cache=cache)
        print(f"{r['size']:6s} {r['crop']:4d} {r['batch']:5d} {r['threads']:3d} {r['cpu_s_per_step']:10.3f} "
              f"{r['wall_s_per_step']:11.3f} {r['sampling_cpu_s']:8.4f} {r['images_per_cpu_s']:9.2f} "
              f"{r['kpixels_per_cpu_s']:9.1f}", flush=True)


if __name__ == "__main__":
    main()
