"""``lmvic decode FILE.lmv -o DIR``: decode the views of a scene file into PNG images.

Any subset of views can be asked for with ``--views`` (joint mode also decodes the views they
depend on). Joint-mode files also give each view's decoded depth (``<view>.depth.npy``).
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.cache import atomic_write_bytes
from pipelines.codec_io import decode
from pipelines.errors import LmvicError


def register(subparsers) -> None:
    p = subparsers.add_parser("decode", help="decode a .lmv file into images", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path, help="the .lmv file")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder for the decoded views")
    p.add_argument("--views", default=None, help="comma-separated view names (default: all)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise LmvicError(f"{args.file} does not exist")
    views = [v for v in args.views.split(",") if v] if args.views else None
    decoded = decode(args.file, views)
    args.output.mkdir(parents=True, exist_ok=True)
    for name, image in decoded.images.items():
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        atomic_write_bytes(args.output / f"{Path(name).stem}.png", buf.getvalue())
    for name, depth in decoded.depths.items():
        buf = io.BytesIO()
        np.save(buf, depth)
        atomic_write_bytes(args.output / f"{Path(name).stem}.depth.npy", buf.getvalue())
    print(f"decoded {len(decoded.images)} view(s) ({decoded.header.mode} mode) into {args.output}")
    return 0
