"""``lmvic inspect SCENE``: depth, mask, warp and error pictures per view, a top-down camera plot
with the coding order, and an index page (``WORK/inspect/index.html``).

Needs the relations stage (``lmvic run SCENE --stages relations``); nothing is recomputed except
the warps drawn in the pictures.
"""
from __future__ import annotations

import argparse
import time

from pipelines.cache import staging_dir
from pipelines.commands.run import add_scene_args
from pipelines.relations import finished_relations, stage_views
from pipelines.scene import load_scene


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="depth / mask / warp pictures and an index page",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scene_args(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pipelines.inspect_report import inspect_report

    scene = load_scene(args.scene, args.allow_mixed_sizes)
    work_dir = (args.work_dir or scene.default_work_dir()).resolve()
    relations = finished_relations(work_dir)
    views = stage_views(work_dir)
    start = time.perf_counter()
    progress = None if args.quiet else (lambda it: tqdm(it, desc="inspect", unit="view"))
    with staging_dir(work_dir / "inspect") as tmp:
        inspect_report(views, relations, tmp, progress)
    print(f"inspect: {len(views.names)} views in {time.perf_counter() - start:.1f}s")
    print(f"outputs: {work_dir / 'inspect' / 'index.html'}")
    return 0
