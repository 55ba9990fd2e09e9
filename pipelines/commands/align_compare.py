"""``lmvic align-compare SCENE``: warp each view's reference onto it with 3DGS median depth, 3DGS
mean depth, a SIFT/RANSAC homography and dense optical flow (DIS, Farnebäck); PSNR and MS-SSIM
over all pixels and inside each method's valid region, and the covered fraction. Prints the
per-method means and writes ``WORK/align_compare/`` (table.json, table.csv, pairs.csv,
figure.png). Pairs are (view, its reference) in the coding order of the relations stage.
"""
from __future__ import annotations

import argparse
import time

from pipelines.cache import staging_dir
from pipelines.commands.run import add_scene_args
from pipelines.errors import LmvicError
from pipelines.relations import finished_relations, stage_views
from pipelines.scene import load_scene


def register(subparsers) -> None:
    from pipelines.align_compare import ALL_METHODS

    p = subparsers.add_parser("align-compare", help="alignment table (JSON, CSV, terminal) and figure",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scene_args(p)
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"comma-separated subset of {','.join(ALL_METHODS)} (default: all)")
    p.add_argument("--max-pairs", type=int, default=None,
                   help="use at most this many pairs, spread evenly over the coding order (default: all)")
    p.add_argument("--figure-pairs", type=int, default=3, help="pairs shown in figure.png (default: 3)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from pipelines.align_compare import ALL_METHODS, align_compare, format_table

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:
        raise LmvicError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(ALL_METHODS)}")
    scene = load_scene(args.scene, args.allow_mixed_sizes)
    work_dir = (args.work_dir or scene.default_work_dir()).resolve()
    relations = finished_relations(work_dir)
    views = stage_views(work_dir)
    index = {n: i for i, n in enumerate(views.names)}
    pairs = [(index[t], index[r]) for t, r in relations.pairs()]
    if args.max_pairs is not None:
        if args.max_pairs < 1:
            raise LmvicError("--max-pairs must be at least 1")
        keep = np.unique(np.linspace(0, len(pairs) - 1, min(args.max_pairs, len(pairs))).round().astype(int))
        pairs = [pairs[k] for k in keep]
    start = time.perf_counter()
    progress = None if args.quiet else (lambda it: tqdm(it, desc="align-compare", unit="pair"))
    with staging_dir(work_dir / "align_compare") as tmp:
        table = align_compare(views, pairs, relations.info["tau"], tmp, methods, args.figure_pairs, progress)
    print(format_table(table))
    print(f"align-compare: {len(pairs)} pairs in {time.perf_counter() - start:.1f}s")
    print(f"outputs: {work_dir / 'align_compare'}")
    return 0
