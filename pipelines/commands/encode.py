"""``lmvic encode SCENE -o FILE.lmv``: code a scene into one container file.

Brings the stages the mode needs up to date first (cached stages are reused): ``single`` needs the
sfm stage (cameras and working images), ``joint`` needs geometry and relations (depth, order).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from pipelines.codec_io import MODES, encode, view_summary
from pipelines.commands.run import add_scene_args, default_device
from pipelines.options import configs_from_args, add_stage_options
from pipelines.scene import load_scene
from pipelines.stages import run, select


def register(subparsers) -> None:
    p = subparsers.add_parser("encode", help="code a scene into one .lmv file", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scene_args(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="the .lmv file to write")
    p.add_argument("--mode", choices=MODES, default="single", help="joint (geometry), distributed (OPAM) or single")
    p.add_argument("--quality", type=int, default=3, help="quality level 1 (smallest) .. Q (best)")
    p.add_argument("--refine", type=int, default=0, metavar="STEPS",
                   help="single and joint modes: optimise each image's latent for STEPS steps before coding it "
                        "(a smaller file at the same quality for ~0.5-2 s per step and view; the decoder is the same)")
    add_stage_options(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    scene = load_scene(args.scene, args.allow_mixed_sizes)
    work_dir = (args.work_dir or scene.default_work_dir()).resolve()
    needed = "relations" if args.mode == "joint" else "sfm"
    run(scene, work_dir, configs_from_args(args), select([needed]), None, args.device or default_device(), args.quiet)
    start = time.perf_counter()
    size, decoded = encode(args.mode, work_dir, args.output, args.quality, args.refine)
    pixels = sum(v.height * v.width for v in decoded.header.views)
    if not args.quiet:
        print(view_summary(args.output))
    print(f"{args.output}: {len(decoded.header.views)} views, {size} bytes, {8 * size / pixels:.4f} bpp "
          f"({args.mode} mode, quality {args.quality}, {time.perf_counter() - start:.1f}s)")
    return 0
