"""Single mode (the paper's "Separate"): every view coded alone by the shipped single-view codec.

The container (``lmvic.bitstream``, mode ``single``) holds per view one stream ``image`` with the
codec's strings as chunks (y parts, then z: ``SingleViewCodec.num_strings``) and the z shape. No
view refers to another, so any subset decodes. Views are padded to multiples of 64 (edge
replication) and cropped back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Collection, Sequence

import numpy as np
import torch

from lmvic.bitstream import (BitstreamError, LatentStream, SceneHeader, SceneReader, ViewInfo,
                             write_scene)
from lmvic.eval_codec import ContainerEvalCodec, refined
from lmvic.models.single_view import SingleViewCodec
from lmvic.scene_codec import DecodedScene, padded_image, to_uint8
from lmvic.zoo import WeightsError, check_quality, load_named, load_single_view, weights_id, weights_sha256
from pipelines.errors import LmvicError

MODEL_IDS = ("single_view_cpu",)
STREAM = "image"


def load_model(model_id: str) -> SingleViewCodec:
    return load_named(model_id, MODEL_IDS, load_single_view, "single-view")


def encode_separate_file(path: str | Path, model_id: str, views: Sequence[ViewInfo], images: Sequence[np.ndarray],
                         order: Sequence[int], quality: int, refine_steps: int = 0) -> tuple[int, DecodedScene]:
    """Code each uint8 [H, W, 3] image alone → (file bytes, the images the decoder will output);
    ``refine_steps``: encoder-side latent refinement per image (``lmvic.refine``)."""
    model = load_model(model_id)
    try:
        check_quality(model, quality)
    except WeightsError as exc:
        raise LmvicError(str(exc)) from exc
    records, decoded = [], {}
    for info, image in zip(views, images):
        x = padded_image(image)
        out = model.compress(x, quality, refine_steps=refine_steps, valid=image.shape[:2])
        records.append({STREAM: LatentStream.coded(out["strings"], out["shape"])})
        with torch.no_grad():
            x_hat = model.decompress(out["strings"], out["shape"], quality)["x_hat"]
        decoded[info.name] = to_uint8(x_hat, info.height, info.width)
    header = SceneHeader("single", model_id, quality, tuple(views), tuple(order), tuple(() for _ in views),
                         weights_id(model_id))
    return write_scene(path, header, records), DecodedScene(header, decoded, {})


def read_stream(reader: SceneReader, index: int, model: SingleViewCodec) -> LatentStream:
    """View ``index``'s ``image`` stream (``model``'s strings, z shape), checked against the view's size
    (``BitstreamError``); the single and distributed modes store the same per-view stream."""
    info = reader.header.views[index]
    stream = reader.read_view(index).get(STREAM)
    if stream is None or len(stream.chunks) != model.num_strings or len(stream.shape) != 2:
        raise BitstreamError(f"view {info.name!r} has no valid {STREAM!r} stream")
    expected = ((info.height + 63) // 64, (info.width + 63) // 64)
    if tuple(stream.shape) != expected:
        raise BitstreamError(f"view {info.name!r}: latent shape {tuple(stream.shape)} does not fit "
                             f"{info.height}x{info.width}")
    return stream


@torch.no_grad()
def decode_separate_file(source: str | Path, views: Collection[str] | None = None) -> DecodedScene:
    """Decode a single-mode container (any subset of its views)."""
    with SceneReader(source, models=MODEL_IDS) as reader:
        header = reader.header
        if header.mode != "single":
            raise BitstreamError(f"this is a {header.mode}-mode file; the single-view decoder reads single mode")
        model = load_model(header.model_id)
        header.check_weights(weights_id(header.model_id))
        if not 1 <= header.quality <= model.num_qualities:
            raise BitstreamError(f"quality {header.quality} is not a level of model {header.model_id!r}")
        names = [v.name for v in header.views]
        wanted = names if views is None else [n for n in names if n in set(views)]
        unknown = set(views or ()) - set(names)
        if unknown:
            raise LmvicError(f"views not in the file: {', '.join(sorted(unknown))}")
        images = {}
        for name in wanted:
            info = header.views[names.index(name)]
            stream = read_stream(reader, names.index(name), model)
            x_hat = model.decompress(stream.strings(), tuple(stream.shape), header.quality)["x_hat"]
            images[name] = to_uint8(x_hat, info.height, info.width)
    return DecodedScene(header, images, {})


class SeparateCodec(ContainerEvalCodec):
    """The single mode as an RD-evaluation codec: every view alone, real container bytes."""

    def __init__(self, names: Sequence[str], K: np.ndarray, T: np.ndarray, model_id: str = "single_view_cpu",
                 refine_steps: int = 0):
        super().__init__(names, K, T)
        self.model_id, self.refine_steps = model_id, refine_steps
        self.name, self.summary = refined("lmvic-single", f"lmvic single-view codec ({model_id} "
                                          f"{weights_sha256(model_id)[:12]}), each view alone (Separate)", refine_steps)
        self.qualities = tuple(range(1, load_model(model_id).num_qualities + 1))

    def encode_file(self, path, views, images, quality):
        return encode_separate_file(path, self.model_id, views, images, range(len(views)), quality,
                                    self.refine_steps)[0]

    def decode_file(self, path):
        return decode_separate_file(path)
