"""``lmvic demo``: generate the embedded synthetic scene (with ground truth) and run the pipeline on it.

The demo fits the Gaussians for DEMO_ITERATIONS iterations unless ``--splat.iterations`` is given
(enough for this small scene), then prints how close the recovered cameras and depth are to the
scene's ground truth.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from tqdm import tqdm

from pipelines.commands.run import default_device
from pipelines.options import HelpFormatter, add_stage_options, configs_from_args
from pipelines.report import print_results
from pipelines.scene import load_scene
from pipelines.stages import STAGES, run
from pipelines.gt_eval import geometry_accuracy
from scenes.synthetic import ArcCameras, generate

DEMO_ITERATIONS = 600


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="generate the synthetic scene and run every stage on it",
                              description=__doc__, formatter_class=HelpFormatter)
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
    configs = configs_from_args(args)
    if getattr(args, "splat.iterations") is None:
        configs["splat"] = dataclasses.replace(configs["splat"], iterations=DEMO_ITERATIONS)
    results = run(scene, work_dir, configs, len(STAGES) - 1, None, args.device or default_device(), args.quiet)
    print_results(work_dir, results)
    acc = geometry_accuracy(out, work_dir)
    print(f"against ground truth: camera centres within {100 * acc['camera_centre_error_rel']:.2f} % of the rig size; "
          f"median depth AbsRel {acc['median']['abs_rel']:.4f} (mean depth {acc['mean']['abs_rel']:.4f}), "
          f"{100 * acc['median']['valid_fraction']:.1f} % of pixels with depth")
    print(f"next: lmvic inspect {out}   |   lmvic align-compare {out}   |   lmvic encode {out} -o demo.lmv")
    return 0
