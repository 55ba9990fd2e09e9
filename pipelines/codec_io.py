"""What ``lmvic encode``/``decode`` share: gathering a scene's coded inputs and dispatching on mode.

Every mode codes the undistorted working images of the sfm stage (what the geometry describes), in
the coding order of the relations stage when it exists (file order otherwise); joint mode also
needs stage one's median depth.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import numpy as np

from pipelines.errors import LmvicError

MODES = ("joint", "distributed", "single")


@dataclass(frozen=True)
class CodedInputs:
    names: list[str]
    images: list[np.ndarray]  # uint8 [H, W, 3]
    K: np.ndarray  # [N, 3, 3]
    T: np.ndarray  # [N, 4, 4]
    order: list[int]


def gather_inputs(work_dir: Path) -> CodedInputs:
    from pipelines.geometry_stage import load_cameras
    from pipelines.relations import finished_relations

    cams = load_cameras(Path(work_dir) / "sfm")
    try:
        order = [cams.names.index(n) for n in finished_relations(work_dir).info["order"]]
    except LmvicError:
        order = list(range(len(cams)))
    return CodedInputs(cams.names, cams.load_images(), cams.K, cams.T, order)


def encode(mode: str, work_dir: Path, out: Path, quality: int, refine_steps: int = 0):
    """Code the scene of ``work_dir`` into ``out`` → (file bytes, DecodedScene as the decoder will give it).

    ``refine_steps``: encoder-side latent refinement per image (``lmvic.refine``), single and joint modes.
    """
    if refine_steps < 0 or (refine_steps and mode == "distributed"):
        raise LmvicError("latent refinement takes a number of steps ≥ 0, in the single and joint modes "
                         "(a distributed encoder cannot see the views its decoder fuses)")
    inputs = gather_inputs(work_dir)
    if mode in ("single", "distributed"):
        from lmvic.bitstream import ViewInfo

        views = [ViewInfo(n, im.shape[0], im.shape[1], K, T)
                 for n, im, K, T in zip(inputs.names, inputs.images, inputs.K, inputs.T)]
        if mode == "distributed":
            from lmvic.distributed_codec import encode_distributed_file

            return encode_distributed_file(out, "distributed-cpu", views, inputs.images, inputs.order, quality)
        from lmvic.separate_codec import encode_separate_file

        return encode_separate_file(out, "single_view_cpu", views, inputs.images, inputs.order, quality, refine_steps)
    if mode == "joint":
        from lmvic.scene_codec import SceneInput, encode_scene_file, load_joint
        from lmvic.zoo import WeightsError
        from pipelines.geometry_stage import load_depth

        try:
            codec = load_joint("joint-cpu")
        except WeightsError as exc:
            raise LmvicError(f"joint mode is not available: {exc}") from exc
        depths = [load_depth(Path(work_dir) / "depth", "median", n) for n in inputs.names]
        scene = SceneInput(inputs.names, inputs.images, depths, inputs.K, inputs.T)
        return encode_scene_file(out, codec, scene, inputs.order, quality, refine_steps)
    raise LmvicError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")


def decode(path: Path, views: Collection[str] | None):
    """Decode any lmvic scene file, whatever its mode → DecodedScene."""
    from lmvic.bitstream import SceneReader

    with SceneReader(path) as reader:
        mode = reader.header.mode
    if mode == "single":
        from lmvic.separate_codec import decode_separate_file

        return decode_separate_file(path, views)
    if mode == "distributed":
        from lmvic.distributed_codec import decode_distributed_file

        return decode_distributed_file(path, views)
    if mode == "joint":
        from lmvic.scene_codec import decode_scene_file

        return decode_scene_file(path, views=views)
    raise LmvicError(f"{path} is a {mode}-mode file, which this version cannot decode")


def view_summary(path: Path) -> str:
    """One line per view of a coded file, in coding order: name, reference(s), record bytes, bpp and
    the bytes of each stream (in joint mode ``image`` = coded with the reference, ``image.intra`` =
    the encoder found coding it alone cheaper)."""
    from lmvic.bitstream import SceneReader

    with SceneReader(path) as reader:
        header, sizes = reader.header, reader.record_sizes
        width = max(len(v.name) for v in header.views)
        lines = [f"{'view':<{width}}  {'reference':<{width}}  {'bytes':>8}  {'bpp':>7}  streams"]
        for i in header.order:
            view = header.views[i]
            refs = ",".join(header.views[r].name for r in header.references[i]) or "-"
            streams = "  ".join(f"{k} {s.nbytes}" for k, s in reader.read_view(i).items())
            lines.append(f"{view.name:<{width}}  {refs:<{width}}  {sizes[i]:>8}  "
                         f"{8 * sizes[i] / (view.height * view.width):7.4f}  {streams}")
    return "\n".join(lines)
