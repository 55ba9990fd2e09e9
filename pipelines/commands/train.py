"""``lmvic train RUN_DIR``: train the variable-rate single-view codec on CPU crops (resumable, DDP)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from pipelines.errors import LmvicError

DEFAULT_SCENES = Path("/work/shared/scenes")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train the single-view codec (background-friendly)")
    p.add_argument("run_dir", type=Path, help="output folder: checkpoint.pt, train.csv, val.csv, curves.png")
    p.add_argument("--scenes", type=Path, default=DEFAULT_SCENES, help="development scenes root")
    p.add_argument("--cache", type=Path, default=None, help="crop cache folder (default RUN_DIR/../cache)")
    p.add_argument("--size", default="cpu", choices=["cpu", "paper"])
    p.add_argument("--quality", type=int, default=0, help="0: variable rate; k: train level k only")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--schedule", default="cosine", choices=["constant", "cosine", "step"])
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--final-lr", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=300, help="warm-up steps")
    p.add_argument("--minutes", type=float, default=None,
                   help="budget in CPU-minutes of this process (default 60; with --until, none: the end time ends the run)")
    p.add_argument("--steps", type=int, default=None,
                   help="budget in steps instead (default: none, --minutes counts; with --resume, replaces the run's)")
    p.add_argument("--until", default="", help="UTC wall-clock end HH:MM (schedule finishes by then)")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights (0: off)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--metric", choices=["mse", "ms-ssim"], default="mse",
                   help="distortion of the RD loss (ms-ssim: λ·1333·(1 − MS-SSIM) as CompressAI; crops over 160 px)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="bf16: transforms under bf16 autocast, ~2x faster on CPUs with AMX/AVX-512-BF16 "
                        "(entropy models stay fp32; default fp32, or the resumed run's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the training forward through torch.compile: fewer CPU-seconds per step after a few "
                        "CPU-minutes of compiling (benchmarks/train_throughput.py --compile); default off, or the "
                        "resumed run's")
    p.add_argument("--init", default="", help="start a fresh run (new optimiser and schedule) from these "
                   "weights: a shipped name (single_view_cpu), an exported .pt or a run's checkpoint.pt")
    p.add_argument("--entropy", choices=["hyperprior", "qpem"], default=None,
                   help="entropy model of the latent: the hyperprior alone, or QPEM's four-step context over it "
                        "(default: that of the --init weights, else hyperprior)")
    p.add_argument("--init-qpem", default="", metavar="JOINT_MODEL",
                   help="start the QPEM from a shipped joint model's (e.g. joint-cpu), reference context removed")
    p.add_argument("--trainable", choices=["all", "qpem"], default="all",
                   help="qpem: train only the QPEM, the transforms and hyperprior stay as --init gives them "
                        "(models built on these weights stay valid)")
    p.add_argument("--dead-leaves", type=float, default=0.0, metavar="SHARE",
                   help="fraction of the crops drawn from procedural dead-leaves images (built once beside "
                        "the crop cache, colours from the real photos; default 0)")
    p.add_argument("--leaf-photos", type=float, default=0.0, metavar="P",
                   help="with --dead-leaves: the share of the leaves that wear minified photo textures "
                        "(lmvic/training/dead_leaves.py texture_bank; default 0: flat, shaded, striped, grainy fills)")
    p.add_argument("--permute-channels", action="store_true",
                   help="give each crop its RGB channels in a random order (colour variety beyond the scenes')")
    p.add_argument("--max-side", type=int, default=768, help="photos are area-downscaled to this long side "
                   "when the crop cache is built")
    p.add_argument("--scales", default="1,0.5", help="comma-separated scales of --max-side the cache holds each "
                   "photo at (smaller ones: more detail per pixel); images under the crop size are not sampled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-every", type=float, default=5.0, help="validation period, CPU-minutes")
    p.add_argument("--ckpt-every", type=float, default=3.0, help="checkpoint period, CPU-minutes")
    p.add_argument("--val-count", type=int, default=8, help="validation crops (from held-out scenes)")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR/checkpoint.pt with its config (--threads, --precision, --compile, --until, --minutes may change; a new --until without --minutes lifts the stored budget)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    import torch

    from lmvic.training.curves import plot_run
    from lmvic.training.data import HELD_OUT_SCENES, ImageCache, build_cache, scene_images, validation_crops
    from lmvic.training.dead_leaves import build_dead_leaves_cache
    from lmvic.training.loop import TrainConfig, check_metric, dist_info, train
    from lmvic.training.schedule import Schedule

    if args.crop % 64:
        raise LmvicError(f"--crop {args.crop} must be a multiple of 64")
    scales = cache_scales(args.scales)
    try:
        check_metric(args.metric, args.crop)
    except ValueError as exc:
        raise LmvicError(f"--metric: {exc}") from exc
    torch.set_num_threads(args.threads)
    rank, world = dist_info()
    ckpt = args.run_dir / "checkpoint.pt"
    if args.resume:
        if not ckpt.exists():
            raise LmvicError(f"--resume: no checkpoint at {ckpt}")
        cfg = resumed_config(TrainConfig.from_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["config"]),
                             args)
    else:
        if ckpt.exists():
            raise LmvicError(f"{ckpt} exists: pass --resume or choose another run folder")
        if not args.scenes.is_dir():
            raise LmvicError(f"scenes folder not found: {args.scenes}")
        cache = args.cache or args.run_dir.parent / "cache"
        paths = scene_images(args.scenes)
        if not paths:
            raise LmvicError(f"no training images under {args.scenes}")
        if not 0.0 <= args.dead_leaves < 1.0:
            raise LmvicError(f"--dead-leaves {args.dead_leaves} must be in [0, 1)")
        if not 0.0 <= args.leaf_photos <= 1.0:
            raise LmvicError(f"--leaf-photos {args.leaf_photos} must be in [0, 1]")
        if args.leaf_photos and not args.dead_leaves:
            raise LmvicError("--leaf-photos textures dead leaves: it needs --dead-leaves SHARE")
        leaves = cache.parent / (f"{cache.name}_dead_leaves" + (f"_photo{args.leaf_photos:g}" if args.leaf_photos else ""))
        if rank == 0:
            build_cache(paths, cache, args.max_side, scales)
            if args.dead_leaves:
                build_dead_leaves_cache(leaves, ImageCache(cache), progress=not args.quiet, photo=args.leaf_photos)
        if world > 1:
            torch.distributed.barrier()  # the other ranks reuse rank 0's cache
        val = [p for s in HELD_OUT_SCENES for p in scene_images(args.scenes, include=(s,), exclude=())[: args.val_count // 2]]
        cfg = TrainConfig(
            out_dir=str(args.run_dir), cache_dir=str(cache), size=args.size,
            dead_leaves_dir=str(leaves) if args.dead_leaves else "", dead_leaves_share=args.dead_leaves,
            permute_channels=args.permute_channels,
            quality=args.quality, crop=args.crop, batch=args.batch,
            schedule=Schedule(args.schedule, args.lr, args.final_lr, args.warmup),
            budget_cpu_minutes=budget_default(args.minutes, 60.0, args.until), max_steps=args.steps or 0,
            deadline=utc_deadline(args.until),
            ema_decay=args.ema,
            threads=args.threads, precision=args.precision or "fp32", compile=bool(args.compile), seed=args.seed,
            metric=args.metric, val_every_cpu_minutes=args.val_every,
            ckpt_every_cpu_minutes=args.ckpt_every, val_images=tuple(str(p) for p in val), init=args.init,
            entropy=args.entropy or initial_entropy(args.init), init_qpem=args.init_qpem, trainable=args.trainable)
        if (cfg.init_qpem or cfg.trainable == "qpem") and cfg.entropy != "qpem":
            raise LmvicError("--init-qpem and --trainable qpem need --entropy qpem")
    crops = validation_crops([Path(p) for p in cfg.val_images]) if cfg.val_images else None
    train(cfg, resume=args.resume, val_crops=crops if rank == 0 else None)
    if rank == 0:
        plot_run(Path(cfg.out_dir))
        print(json.dumps({"run_dir": cfg.out_dir, "checkpoint": str(ckpt)}))


def cache_scales(text: str) -> tuple[float, ...]:
    """``--scales`` as a tuple of floats in (0, 1]; a clear error otherwise."""
    try:
        scales = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise LmvicError(f"--scales {text!r}: comma-separated numbers expected") from None
    if not all(0 < v <= 1 for v in scales):
        raise LmvicError(f"--scales {text!r}: each scale must be in (0, 1]")
    return scales


def resumed_config(saved: "TrainConfig", args: argparse.Namespace) -> "TrainConfig":
    """The config a ``--resume`` continues with: the run's own, with the options that may change
    (--threads, --precision, --compile, --until, --minutes, --steps) applied. A new --until moves the schedule's end
    (e.g. the machine got busier than planned) and, without --minutes or --steps, lifts the stored
    budget as on a fresh run (the end time ends the run)."""
    return dataclasses.replace(
        saved, threads=args.threads, precision=args.precision or saved.precision,
        compile=saved.compile if args.compile is None else args.compile,
        deadline=utc_deadline(args.until) if args.until else saved.deadline,
        budget_cpu_minutes=budget_default(args.minutes, saved.budget_cpu_minutes, args.until),
        max_steps=int(budget_default(args.steps, saved.max_steps, args.until)))


def initial_entropy(init: str) -> str:
    """The entropy model of the weights ``init`` names ("hyperprior" for a fresh run)."""
    from lmvic.zoo import WeightsError, single_view_from

    if not init:
        return "hyperprior"
    try:
        return single_view_from(init).entropy
    except WeightsError as exc:
        raise LmvicError(f"--init: {exc}") from exc


def budget_default(given: float | None, default: float, until: str) -> float:
    """A budget option's value (CPU-minutes, steps): as given; else none (0) when ``--until`` sets the end,
    so that the run lasts until then; else ``default`` (a fresh run's default, or the resumed run's own)."""
    if given is not None:
        return given
    return 0 if until else default


def utc_deadline(hhmm: str) -> float:
    """Unix time of the next UTC ``HH:MM`` ('' → 0, no deadline)."""
    import datetime as dt

    if not hhmm:
        return 0.0
    try:
        h, m = (int(v) for v in hhmm.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        end = now.replace(hour=h, minute=m, second=0, microsecond=0)
    except ValueError as exc:
        raise LmvicError(f"--until wants HH:MM in UTC, got {hhmm!r}") from exc
    if end <= now:
        end += dt.timedelta(days=1)
    return end.timestamp()


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m pipelines.commands.train RUN_DIR …``, e.g. under ``torchrun``):
    ``lmvic train`` with the same options, ``-q``/``-v`` included."""
    from pipelines.cli import main as cli_main

    return cli_main(["train", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
