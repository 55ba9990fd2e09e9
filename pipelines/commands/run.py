"""``lmvic run SCENE``: bring the requested stages up to date, reusing every valid cached stage."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.options import HelpFormatter, add_stage_options, configs_from_args
from pipelines.report import print_results
from pipelines.scene import load_scene
from pipelines.stages import STAGES, run, select


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_scene_args(parser: argparse.ArgumentParser) -> None:
    """The scene, work folder and device options that every scene command shares."""
    parser.add_argument("scene", type=Path, help="scene folder (with images/)")
    parser.add_argument("--work-dir", type=Path, default=None, help="cache and outputs (default: SCENE/.lmvic)")
    parser.add_argument("--allow-mixed-sizes", action="store_true", help="accept images of different sizes")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="run the pipeline stages on a scene (cached)",
                              description=__doc__, formatter_class=HelpFormatter)
    add_scene_args(p)
    p.add_argument("--stages", default=None,
                   help="comma-separated stages or groups to bring up to date; earlier ones run as needed "
                        "(default: every stage)")
    p.add_argument("--force", default=None, metavar="STAGE", help="re-run from this stage even if cached")
    add_stage_options(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    scene = load_scene(args.scene, args.allow_mixed_sizes)
    work_dir = (args.work_dir or scene.default_work_dir()).resolve()
    upto = select(args.stages.split(",")) if args.stages else len(STAGES) - 1
    results = run(scene, work_dir, configs_from_args(args), upto, args.force, args.device or default_device(), args.quiet)
    print_results(work_dir, results)
    return 0
