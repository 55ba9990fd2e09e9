"""``lmvic status SCENE``: which stages are cached and valid, which are stale and why.

Validity is judged against the options given here (defaults unless set), exactly as ``lmvic run``
with the same options would judge it.
"""
from __future__ import annotations

import argparse

from pipelines.commands.run import add_scene_args
from pipelines.options import add_stage_options, configs_from_args
from pipelines.report import print_states
from pipelines.scene import load_scene
from pipelines.stages import STAGES, plan


def register(subparsers) -> None:
    p = subparsers.add_parser("status", help="show which stages are cached, valid or stale",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scene_args(p)
    add_stage_options(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    scene = load_scene(args.scene, args.allow_mixed_sizes)
    work_dir = (args.work_dir or scene.default_work_dir()).resolve()
    states = plan(scene, work_dir, configs_from_args(args), len(STAGES) - 1)
    leftovers = sorted(p.name for p in work_dir.glob(".tmp-*")) if work_dir.is_dir() else []
    print_states(work_dir, states, leftovers)
    return 0
