"""``lmvic demo``: generate the embedded synthetic scene (with ground truth) and run the pipeline on it."""
from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from pipelines.commands.run import default_device
from pipelines.options import add_stage_options, configs_from_args
from pipelines.report import print_results
from pipelines.scene import load_scene
from pipelines.stages import STAGES, run
from scenes.synthetic import ArcCameras, generate


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="generate the synthetic scene and run every stage on it",
                              description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("lmvic-demo"), help="folder for the generated scene")
    p.add_argument("--views", type=int, default=24, help="number of views on the arc")
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    add_stage_options(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    cameras = ArcCameras(n_views=args.views, width=args.width, height=args.height)
    out = args.out.resolve()
    if (out / "images").is_dir() and (out / "gt" / "cameras.json").is_file():
        print(f"scene already generated in {out}")
    else:
        generate(out, cameras, seed=args.seed, progress=None if args.quiet else tqdm)
        print(f"generated {args.views} views in {out}")
    scene = load_scene(out)
    work_dir = scene.default_work_dir()
    results = run(scene, work_dir, configs_from_args(args), len(STAGES) - 1, None,
                  args.device or default_device(), args.quiet)
    print_results(work_dir, results)
    return 0
