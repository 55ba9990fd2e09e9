"""``lmvic train-distributed RUN SCENE...``: train the distributed codecs' decoder-side fusions.

The shipped single-view codec (``single_view_cpu``) stays frozen: it is every camera's encoder. Both fusions
(OPAM + PMIFM and OPAM + average pooling) train on the same coded clips of 2–4 neighbouring views
of image folders (no geometry needed), with the RD loss of the fused views plus an alignment loss
that teaches OPAM's attention to find correspondences: shifted crops with a known offset and pairs
of neighbouring views (``lmvic.distributed_training``). Resumable (``--resume``), one CSV row per
``log_every`` steps, budgeted in CPU minutes and/or by a UTC end time; ``--export`` writes the
shippable weights (``distributed-cpu.pt``, ``distributed-average-cpu.pt``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.commands.train import budget_default, utc_deadline
from pipelines.errors import LmvicError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train-distributed", help="train the distributed codecs' fusions (resumable)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="output folder: checkpoint.pt, config.json, train.csv, val.csv")
    p.add_argument("scenes", nargs="*", type=Path,
                   help="image folders (scene folders with images/) in file order; not the held-out scenes "
                        "(required unless --resume)")
    p.add_argument("--fusions", default="pmifm,average", help="comma-separated: pmifm, average")
    p.add_argument("--init", default="", help="start the fusions from the shipped distributed weights in this "
                   "folder (e.g. lmvic/weights); default: fresh fusions (the identity)")
    p.add_argument("--steps", type=int, default=None, help="step limit (default 2000; --resume: the run's; none with --until)")
    p.add_argument("--budget-cpu-minutes", type=float, default=None,
                   help="CPU minutes for all models together (default 100; --resume: the run's; none with --until)")
    p.add_argument("--until", default="", help="UTC wall-clock end HH:MM: the schedule finishes by then")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (cosine schedule, 50 warm-up steps)")
    p.add_argument("--opam-lr-scale", type=float, default=1.0, help="learning rate of OPAM relative to --lr")
    p.add_argument("--opam-temperature", type=float, default=0.0,
                   help="> 0: fix every OPAM's attention temperature to this value instead of training it")
    p.add_argument("--synthesis-lr-scale", type=float, default=0.0,
                   help="> 0 also fine-tunes the synthesis at this fraction of the learning rate")
    p.add_argument("--align-weight", type=float, default=1.0, help="weight of the alignment loss (0: RD only)")
    p.add_argument("--align-warmup-steps", type=int, default=0, help="first steps: the alignment loss alone")
    p.add_argument("--align-pairs", type=int, default=2,
                   help="shifted pairs and pairs of neighbouring views per step (each)")
    p.add_argument("--shift-ce-weight", type=float, default=0.0,
                   help="weight of the attention cross-entropy on the shifted pairs (it softens the attention)")
    p.add_argument("--shift-sharpness-weight", type=float, default=1.0,
                   help="weight of the mean-correspondence and consistency loss on the shifted pairs")
    p.add_argument("--val-every", type=int, default=150, help="steps between validations (val.csv, curves.png)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: fusions and synthesis under bf16 autocast, faster on CPUs with AMX/AVX-512-BF16")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR/checkpoint.pt with its settings "
                   "(only --steps, --budget-cpu-minutes and --until may change)")
    p.add_argument("--export", type=Path, default=None,
                   help="write the trained weights into this folder (e.g. lmvic/weights)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    import dataclasses

    import torch

    from lmvic.distributed_training import (NOT_FOR_TRAINING, DistributedTrainConfig, export_checkpoint,
                                            folder_images, train_distributed)
    from lmvic.fusion import FUSIONS
    from lmvic.training.data import refuse_held_out
    from lmvic.training.schedule import Schedule

    checkpoint = args.run_dir / "checkpoint.pt"
    if args.resume:
        if not checkpoint.exists():
            raise LmvicError(f"--resume: no checkpoint at {checkpoint}")
        stored = DistributedTrainConfig.from_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["config"])
        config = dataclasses.replace(
            stored, steps=budget_default(args.steps, stored.steps, args.until),
            budget_cpu_minutes=budget_default(args.budget_cpu_minutes, stored.budget_cpu_minutes, args.until),
            deadline=utc_deadline(args.until) if args.until else stored.deadline)
    else:
        if not args.scenes:
            raise LmvicError("give at least one image folder to train on")
        missing = [str(s) for s in args.scenes if not s.is_dir()]
        if missing:
            raise LmvicError(f"not a folder: {', '.join(missing)}")
        try:
            refuse_held_out(args.scenes, NOT_FOR_TRAINING)
        except ValueError as exc:
            raise LmvicError(str(exc)) from exc
        for scene in args.scenes:
            try:
                folder_images(scene)
            except ValueError as exc:
                raise LmvicError(str(exc)) from exc
        fusions = tuple(f for f in args.fusions.split(",") if f)
        unknown = [f for f in fusions if f not in FUSIONS]
        if unknown or not fusions:
            raise LmvicError(f"--fusions: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(FUSIONS)}")
        if args.crop % 64:
            raise LmvicError(f"--crop {args.crop} must be a multiple of 64")
        config = DistributedTrainConfig(
            str(args.run_dir), tuple(str(s) for s in args.scenes), fusions=fusions, init_weights=args.init,
            steps=budget_default(args.steps, 2000, args.until),
            budget_cpu_minutes=budget_default(args.budget_cpu_minutes, 100.0, args.until),
            deadline=utc_deadline(args.until),
            batch=args.batch, crop=args.crop, threads=args.threads, precision=args.precision,
            schedule=Schedule(peak_lr=args.lr, final_lr=args.lr / 10, warmup_steps=50),
            opam_lr_scale=args.opam_lr_scale, opam_temperature=args.opam_temperature,
            synthesis_lr_scale=args.synthesis_lr_scale,
            align_weight=args.align_weight, align_warmup_steps=args.align_warmup_steps,
            align_pairs=args.align_pairs, shift_ce_weight=args.shift_ce_weight,
            shift_sharpness_weight=args.shift_sharpness_weight, val_every=args.val_every)
    train_distributed(config, resume=args.resume)
    if args.export is not None:
        for path in export_checkpoint(args.run_dir, args.export):
            print(path)
