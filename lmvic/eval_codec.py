"""lmvic's coding modes as RD-evaluation codecs (``pipelines.rd.Codec``): real container bytes.

:class:`ContainerEvalCodec` codes the views (already in coding order) into a container file in a
temporary folder, decodes it with the mode's decoder as another process would, and reports per
view the bytes of its record (the header's bytes are counted with the first view, so they add up to
the file size) and of each named stream in it (e.g. ``depth`` and ``image`` or ``image.intra``).
A mode supplies ``encode_file`` and ``decode_file``.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from lmvic import FORMAT_VERSION
from lmvic.bitstream import SceneReader, ViewInfo
from lmvic.scene_codec import DecodedScene, JointCodec


def refined(name: str, summary: str, refine_steps: int) -> tuple[str, str]:
    """A codec's (name, summary) when its encoder refines latents for ``refine_steps`` steps (unchanged
    for 0): a refined codec has results of its own, beside the plain one's."""
    if not refine_steps:
        return name, summary
    return f"{name}-refine{refine_steps}", f"{summary}, encoder-side latent refinement ({refine_steps} steps)"


class ContainerEvalCodec:
    """Base of the learned codecs in ``lmvic eval``; ``names``, ``K`` (V, 3, 3) and ``T`` (V, 4, 4)
    are the views' names and cameras in coding order."""

    name: str
    summary: str  #: what the codec is; ``description`` adds the container format
    qualities: Sequence[int]

    @property
    def description(self) -> str:
        """``summary`` and the container format (results of another format are measured again)."""
        return f"{self.summary}; container format {FORMAT_VERSION}"

    def __init__(self, names: Sequence[str], K: np.ndarray, T: np.ndarray):
        self.names, self.K, self.T = list(names), K, T

    def encode_file(self, path: Path, views: list[ViewInfo], images: Sequence[np.ndarray], quality: int) -> int:
        """Write the container of ``images`` (coding order = the given order) → its size in bytes."""
        raise NotImplementedError

    def decode_file(self, path: Path) -> DecodedScene:
        raise NotImplementedError

    def encode_decode(self, images: Sequence[np.ndarray], quality: int):
        from pipelines.rd import Coded

        infos = [ViewInfo(n, v.shape[0], v.shape[1], K, T) for n, v, K, T in zip(self.names, images, self.K, self.T)]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "scene.lmv"
            start = time.perf_counter()
            size = self.encode_file(path, infos, images, quality)
            middle = time.perf_counter()
            decoded = self.decode_file(path)
            end = time.perf_counter()
            with SceneReader(path) as reader:
                per_view = list(reader.record_sizes)
                streams = [{k: s.nbytes for k, s in reader.read_view(i).items()} for i in range(len(per_view))]
        per_view[0] += size - sum(per_view)
        return Coded(per_view, [decoded.images[n] for n in self.names], middle - start, end - middle, streams)


class JointEvalCodec(ContainerEvalCodec):
    """The joint mode (3D-LMVIC): each view coded with its predecessor as reference, depth first.

    ``depths``: the views' median depth (H, W) in camera z, cropped like the images. ``model_id``
    ``joint-concat-cpu`` (named ``lmvic-concat``) is the Concatenation ablation. ``codec``, if given,
    is used instead of the shipped ``model_id`` (e.g. a training snapshot), and ``model_id`` only
    labels it. ``refine_steps``: encoder-side latent refinement (``lmvic.refine``).
    """

    def __init__(self, names: Sequence[str], K: np.ndarray, T: np.ndarray, depths: Sequence[np.ndarray],
                 model_id: str = "joint-cpu", name: str = "lmvic-joint", codec: JointCodec | None = None,
                 refine_steps: int = 0):
        from lmvic.scene_codec import DEPTH_FACTOR, ENCODER_REVISION, load_joint
        from lmvic.zoo import WeightsError, weights_sha256
        from pipelines.errors import LmvicError

        super().__init__(names, K, T)
        self.depths, self.refine_steps = list(depths), refine_steps
        try:
            self.codec = codec if codec is not None else load_joint(model_id)
        except WeightsError as exc:
            raise LmvicError(f"joint mode is not available: {exc}") from exc
        alignment = "ICT" if self.codec.aligned else "ICT without alignment: the Concatenation ablation"
        label = model_id if codec is not None else f"{model_id} {weights_sha256(model_id)[:12]}"
        summary = (f"lmvic joint mode ({label}): depth codec (CVDP + DCI, depth at 1/{DEPTH_FACTOR}) and image "
                   f"codec ({alignment}, QPEM) over 3DGS depth, intra/inter RD decision per view, depth coded only "
                   f"where the reference path uses it (encoder revision {ENCODER_REVISION})")
        self.name, self.summary = refined(name, summary, refine_steps)
        self.qualities = tuple(range(1, self.codec.num_qualities + 1))

    def encode_file(self, path, views, images, quality):
        from lmvic.scene_codec import SceneInput, encode_scene_file

        scene = SceneInput([v.name for v in views], images, self.depths, self.K, self.T)
        return encode_scene_file(path, self.codec, scene, range(len(views)), quality, self.refine_steps)[0]

    def decode_file(self, path):
        from lmvic.scene_codec import decode_scene_file

        return decode_scene_file(path, self.codec)
