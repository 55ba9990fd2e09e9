"""``lmvic eval SCENE``: rate-distortion evaluation of every codec on the scene's views.

Reads the undistorted working images of the completed sfm stage and the coding order of the
completed relations stage (``WORK/relations/order.json``; without it: file order, with a note), or an order
computed from the SfM cameras with ``--order``. Crops all views at their top-left corner to the
largest common size that is a multiple of 64 (intrinsics stay valid). Every codec codes the views
in that order to real bytes and back; writes ``WORK/eval/<codec>.json`` (CompressAI layout),
``table.csv``, ``bd_rate.csv`` and ``rd.png``, and prints the table and the BD-rates against
x265 low-delay P. A codec whose JSON already holds the same views, size and settings is read
back instead of re-run (``--rerun`` re-measures).

To add a codec (e.g. a learned one), register a factory in :data:`CODECS` that turns
:class:`EvalInputs` into an object satisfying :class:`pipelines.rd.Codec`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipelines.anchors import ANCHORS
from pipelines.cache import read_meta
from pipelines.commands.eval_image import check_refine_steps
from pipelines.commands.run import add_scene_args, default_device
from pipelines.errors import LmvicError
from pipelines.geometry_stage import CameraTable
from pipelines.rd import MIN_SIDE, Codec, crop_common, run_evaluation

REFERENCE = "x265-ldp"


@dataclass(frozen=True)
class EvalInputs:
    """What a codec factory may use: the work folder, the cameras, and the views as coded."""

    work_dir: Path
    device: str  # torch device for learned codecs
    cameras: CameraTable
    names: list[str]  # coding order
    views: list[np.ndarray]  # uint8 [H, W, 3], cropped, in coding order
    refine_steps: int = 0  # encoder-side latent refinement of the learned single and joint codecs


def _separate(inputs: EvalInputs) -> Codec:
    from lmvic.separate_codec import SeparateCodec

    index = [inputs.cameras.names.index(n) for n in inputs.names]
    return SeparateCodec(inputs.names, inputs.cameras.K[index], inputs.cameras.T[index],
                         refine_steps=inputs.refine_steps)


def _distributed(model_id: str) -> Callable[[EvalInputs], Codec]:
    def make(inputs: EvalInputs) -> Codec:
        from lmvic.distributed_codec import DistributedSceneCodec

        index = [inputs.cameras.names.index(n) for n in inputs.names]
        return DistributedSceneCodec(inputs.names, inputs.cameras.K[index], inputs.cameras.T[index], model_id)

    return make


def _joint(model_id: str, name: str) -> Callable[[EvalInputs], Codec]:
    def make(inputs: EvalInputs) -> Codec:
        from lmvic.eval_codec import JointEvalCodec
        from pipelines.geometry_stage import load_depth

        if read_meta(inputs.work_dir / "depth") is None:
            raise LmvicError(f"{name} needs the depth stage: run `lmvic run SCENE --stages geometry` first")
        h, w = inputs.views[0].shape[:2]
        depths = [load_depth(inputs.work_dir / "depth", "median", n)[:h, :w] for n in inputs.names]
        index = [inputs.cameras.names.index(n) for n in inputs.names]
        return JointEvalCodec(inputs.names, inputs.cameras.K[index], inputs.cameras.T[index], depths, model_id, name,
                              refine_steps=inputs.refine_steps)

    return make


#: Codec name → factory. The anchors need nothing from the scene.
CODECS: dict[str, Callable[[EvalInputs], Codec]] = {
    **{name: (lambda inputs, make=make: make()) for name, make in ANCHORS.items()},
    "lmvic-single": _separate,
    "lmvic-joint": _joint("joint-cpu", "lmvic-joint"),
    "lmvic-concat": _joint("joint-concat-cpu", "lmvic-concat"),
    "lmvic-distributed": _distributed("distributed-cpu"),
    "lmvic-average": _distributed("distributed-average-cpu"),
}
#: ``--mode`` shortcuts for ``--codecs``.
MODE_CODECS = {"joint": "lmvic-joint,lmvic-concat,lmvic-single,x265-ldp,x265-intra,avif",
               "distributed": "lmvic-distributed,lmvic-average,lmvic-single,x265-ldp"}


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="RD table, BD-rates, JSON per codec and RD plot",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scene_args(p)
    p.add_argument("--codecs", default=",".join(CODECS),
                   help=f"comma-separated codecs (default: all of {', '.join(CODECS)})")
    p.add_argument("--mode", choices=sorted(MODE_CODECS), default=None,
                   help="shortcut for --codecs: " + "; ".join(f"{k} = {v}" for k, v in MODE_CODECS.items()))
    p.add_argument("--order", default=None, choices=("greedy", "sorted", "random"),
                   help="coding order computed from the SfM cameras (default: the relations stage's order, "
                        "else file order)")
    p.add_argument("--max-views", type=int, default=0,
                   help="code only the first N views of the coding order (0: all); a quick evaluation of a big scene")
    p.add_argument("--refine", type=int, default=0, metavar="STEPS",
                   help="encoder-side latent refinement steps per image for lmvic-single, -joint and -concat "
                        "(0: off; their results are then measured again)")
    p.add_argument("--rerun", action="store_true",
                   help="re-measure every codec even if WORK/eval/<codec>.json holds the same views and settings")
    p.set_defaults(handler=handle)


def coding_order(work_dir: Path, cameras: CameraTable, mode: str | None) -> tuple[list[str], str]:
    """(view names in coding order, where the order came from)."""
    if mode is not None:
        from geometry.distance import view_distances
        from geometry.ordering import OrderError, resolve_order

        try:
            order = resolve_order(cameras.names, view_distances(cameras.T), mode)
        except OrderError as exc:
            raise LmvicError(str(exc)) from None
        return [cameras.names[i] for i in order], f"{mode} order from the SfM cameras"
    if read_meta(work_dir / "relations") is not None:
        from pipelines.relations import finished_relations

        relations = finished_relations(work_dir)
        names = list(relations.info["order"])
        if sorted(names) != sorted(cameras.names):
            raise LmvicError(f"the relations stage in {relations.root} names other views than the sfm stage; "
                             "re-run `lmvic run SCENE --stages relations`")
        return names, f"relations stage ({relations.root / 'order.json'})"
    print(f"note: no relations stage in {work_dir}; coding the views in file order")
    return list(cameras.names), "file order"


def prepare_views(cameras: CameraTable, names: list[str]) -> list[np.ndarray]:
    """The working images in coding order, cropped to a common multiple-of-64 size."""
    index = {n: i for i, n in enumerate(cameras.names)}
    images = cameras.load_images()
    views = [images[index[n]] for n in names]
    try:
        cropped = crop_common(views)
    except ValueError as exc:
        raise LmvicError(str(exc)) from None
    h, w = cropped[0].shape[:2]
    if min(h, w) <= MIN_SIDE:
        raise LmvicError(f"views cropped to {w}x{h} are too small for MS-SSIM (both sides must exceed {MIN_SIDE} px)")
    sizes = sorted({(v.shape[1], v.shape[0]) for v in views})
    if sizes != [(w, h)]:
        print(f"note: cropped views of {', '.join(f'{a}x{b}' for a, b in sizes)} to {w}x{h} "
              "(top-left, a multiple of 64)")
    return cropped


def handle(args: argparse.Namespace) -> int:
    import torch

    from pipelines.geometry_stage import load_cameras
    from pipelines.scene import load_scene

    torch.set_num_threads(1)  # the metrics; the machine is shared and the codecs run single-threaded
    check_refine_steps(args.refine)  # before any scene is read
    scene = load_scene(args.scene, args.allow_mixed_sizes)
    work_dir = (args.work_dir or scene.default_work_dir()).resolve()
    chosen = MODE_CODECS[args.mode] if args.mode else args.codecs
    names = [n.strip() for n in chosen.split(",") if n.strip()]
    unknown = [n for n in names if n not in CODECS]
    if unknown or not names:
        raise LmvicError(f"unknown codec(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(CODECS)}")
    if read_meta(work_dir / "sfm") is None:
        raise LmvicError(f"no completed sfm stage in {work_dir}; run `lmvic run {args.scene} --stages sfm` first")
    cameras = load_cameras(work_dir / "sfm")
    order, source = coding_order(work_dir, cameras, args.order)
    if args.max_views < 0 or args.max_views == 1:
        raise LmvicError(f"--max-views {args.max_views}: give 0 (all views) or at least 2")
    if args.max_views:
        order, source = order[: args.max_views], f"{source}, first {min(args.max_views, len(order))} views"
    views = prepare_views(cameras, order)
    print(f"{len(views)} views of {views[0].shape[1]}x{views[0].shape[0]}, coding order: {source}")
    inputs = EvalInputs(work_dir, args.device or default_device(), cameras, order, views, args.refine)
    codecs = [CODECS[n](inputs) for n in names]
    out = work_dir / "eval"
    run_evaluation(codecs, views, order, out, f"{scene.root.name} ({len(views)} views)", REFERENCE,
                   reuse=not args.rerun)
    print(f"wrote {out}/<codec>.json, table.csv, bd_rate.csv and rd.png")
    return 0
