"""``lmvic train-joint RUN SCENE...``: train the joint codec on clips of synthetic and real scenes.

Staged on the shipped single-view codec (``--init-single-view single_view_cpu --freeze-backbone``
trains the reference path, QPEM and the depth codec only). Resumable (``--resume``), one CSV row
per ``log_every`` steps, under ``torchrun`` with DDP; ``--export`` writes shippable weights.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.commands.train import budget_default, utc_deadline
from pipelines.errors import LmvicError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train-joint", help="train the joint codec (background-friendly, resumable)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="output folder: checkpoint.pt, config.json, train.csv")
    p.add_argument("scenes", nargs="+", type=Path, help="synthetic scene folders (with gt/) or work folders of "
                   "real scenes whose geometry and relations stages have run")
    p.add_argument("--steps", type=int, default=None,
                   help="step budget (default 1000; with --until, none: the end time ends the run)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--crop", type=int, default=128, help="square crop side; 0: whole views cut to multiples of "
                   "64 (what the depth codec codes: its coarse map of a crop is a few pixels)")
    p.add_argument("--range-jitter", type=float, default=0.0, help="narrow each clip's depth range in inverse "
                   "depth by a random share up to this (0 to <1), so that the depth codec sees normalised maps over "
                   "all of [0, 1] and not only the low end a scene's far content puts them at")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (cosine schedule, 20 warm-up steps)")
    p.add_argument("--init-single-view", default="", help="single-view weights for the image backbone "
                   "(a shipped name such as single_view_cpu, or a .pt path); default: a fresh backbone")
    p.add_argument("--freeze-backbone", action="store_true", help="train only what the joint codec adds")
    p.add_argument("--no-alignment", action="store_true", help="the Concatenation ablation: ICT takes the "
                   "reference unwarped (model joint-concat-SIZE)")
    p.add_argument("--init-joint", default="", help="start from what a previous run's checkpoint.pt or a joint "
                   "weight file (e.g. lmvic/weights/joint-cpu.pt) adds to the single-view base")
    p.add_argument("--init-parts", default="image,depth", help="what --init-joint initialises: comma-separated "
                   "name prefixes of the joint codec's tensors (e.g. depth,image.qpem)")
    p.add_argument("--parts", choices=("all", "depth", "image", "context"), default="all", help="what trains: all, "
                   "the depth codec alone (image codec not run), the image codec on the frozen depth codec's output, "
                   "or all but the ICT fusions (the reference only conditions the entropy model)")
    p.add_argument("--depth-weight", type=float, default=1.0, help="the depth codec (which codes at its lowest "
                   "rate point) weighs its distortion by DEPTH_WEIGHT·λ_1: below 1 is cheaper, coarser depth")
    p.add_argument("--depth-metric", choices=("mse", "relative"), default="mse", help="depth distortion: mse of "
                   "the decoded map upsampled to the image size, or relative: squared relative inverse-depth error "
                   "of the coded coarse map (what the trust mask tests; far content weighs like near)")
    p.add_argument("--view-weights", default="", help="comma-separated loss weights w_t of a clip's views (their "
                   "count is the clip length); default the paper's 0.5,1.2,0.5,0.9")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR/checkpoint.pt")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--metric", choices=["mse", "ms-ssim"], default="mse",
                   help="distortion of the RD loss (ms-ssim: λ·1333·(1 − MS-SSIM) as CompressAI; crops over 160 px)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: transforms under bf16 autocast, ~2x faster on CPUs with AMX/AVX-512-BF16 "
                        "(entropy models and geometry stay fp32)")
    p.add_argument("--until", default="", help="UTC wall-clock end HH:MM: the schedule finishes by then")
    p.add_argument("--export", default="", help="write the trained codec as shippable weights (e.g. "
                   "lmvic/weights/joint-cpu.pt); with --steps 0 and no --until this ships the "
                   "untrained initialisation")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from lmvic.clips import check_range_jitter
    from lmvic.joint_training import VIEW_WEIGHTS, JointTrainConfig, export_history, shipped_base, train_joint
    from lmvic.scene_codec import save_joint
    from lmvic.training.data import HELD_OUT_SCENES, refuse_held_out
    from lmvic.training.loop import check_metric, dist_info
    from lmvic.training.schedule import Schedule

    missing = [str(s) for s in args.scenes if not s.is_dir()]
    if missing:
        raise LmvicError(f"not a folder: {', '.join(missing)}")
    try:
        refuse_held_out(args.scenes)
    except ValueError as exc:
        raise LmvicError(str(exc)) from exc
    try:
        check_metric(args.metric, args.crop)
    except ValueError as exc:
        raise LmvicError(f"--metric: {exc}") from exc
    try:
        view_weights = tuple(float(w) for w in args.view_weights.split(",")) if args.view_weights else VIEW_WEIGHTS
    except ValueError as exc:
        raise LmvicError(f"--view-weights: {args.view_weights!r} is not a comma-separated list of numbers") from exc
    try:
        check_range_jitter(args.range_jitter)
    except ValueError as exc:
        raise LmvicError(f"--range-jitter: {exc}") from exc
    if args.resume and not (args.run_dir / "checkpoint.pt").exists():
        raise LmvicError(f"--resume: no checkpoint at {args.run_dir / 'checkpoint.pt'}")
    config = JointTrainConfig(str(args.run_dir), tuple(str(s) for s in args.scenes),
                              steps=budget_default(args.steps, 1000, args.until),
                              batch=args.batch, crop=args.crop, range_jitter=args.range_jitter,
                              init_single_view=args.init_single_view,
                              init_joint=args.init_joint, init_parts=tuple(args.init_parts.split(",")),
                              freeze_backbone=args.freeze_backbone, aligned=not args.no_alignment,
                              parts=args.parts, depth_weight=args.depth_weight, view_weights=view_weights,
                              threads=args.threads,
                              precision=args.precision, metric=args.metric, depth_metric=args.depth_metric,
                              deadline=utc_deadline(args.until),
                              schedule=Schedule(peak_lr=args.lr, warmup_steps=20))
    model = train_joint(config, resume=args.resume)
    if args.export and dist_info()[0] == 0:
        # a frozen shipped backbone is referenced by name and SHA-256, not stored again
        print(save_joint(model.eval(), Path(args.export), base=shipped_base(config),
                         training=export_history(args.run_dir / "checkpoint.pt"), held_out=HELD_OUT_SCENES))
