"""Distributed mode in a scene file: every view encoded alone, all the decoded views fused.

The container (``lmvic.bitstream``, mode ``distributed``) holds per view one stream ``image`` with
two chunks (CompressAI's y and z strings) and the z shape, exactly as the single mode: an encoder
needs one image and nothing else (``encode_view``), and a file is just the views' streams put
together (``write_distributed_file``). The decoder fuses every view it decodes with all the other
views it decodes (``lmvic.models.distributed``); the header lists, per view, the other views as its
optional side information. Any subset of views decodes: views left out are simply not used as
side information. Views are padded to multiples of 64 (edge replication) and cropped back; views
whose padded sizes differ are fused within groups of equal size.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Collection, Sequence

import numpy as np
import torch

from lmvic.bitstream import BitstreamError, LatentStream, SceneHeader, SceneReader, ViewInfo, write_scene
from lmvic.eval_codec import ContainerEvalCodec
from lmvic.models.distributed import DistributedCodec, load_distributed
from lmvic.scene_codec import DecodedScene, pad
from lmvic.zoo import WEIGHTS_DIR, WeightsError, check_quality
from pipelines.errors import LmvicError

#: Shipped models: OPAM + PMIFM fusion, and the average-pooling comparison point.
MODEL_IDS = ("distributed-cpu", "distributed-average-cpu")
STREAM = "image"


def load_model(model_id: str) -> DistributedCodec:
    if model_id not in MODEL_IDS:
        raise BitstreamError(f"unknown distributed model {model_id!r} (known: {', '.join(MODEL_IDS)})")
    try:
        return load_distributed(model_id)
    except WeightsError as exc:
        raise LmvicError(str(exc)) from exc


def _padded(image: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` → ``(1, 3, H', W')`` in [0, 1], padded to multiples of 64."""
    return pad(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255)


@torch.no_grad()
def encode_view(model: DistributedCodec, image: np.ndarray, quality: int) -> LatentStream:
    """One camera's encoder: a uint8 ``(H, W, 3)`` image alone → its ``image`` stream."""
    out = model.compress(_padded(image), quality)
    (y_strings, z_strings), shape = out["strings"], out["shape"]
    return LatentStream((y_strings[0], z_strings[0]), tuple(shape))


def write_distributed_file(path: str | Path, model_id: str, quality: int, views: Sequence[ViewInfo],
                           streams: Sequence[LatentStream], order: Sequence[int]) -> int:
    """Put independently coded views into one file → its size in bytes."""
    others = tuple(tuple(u for u in range(len(views)) if u != v) for v in range(len(views)))
    header = SceneHeader("distributed", model_id, quality, tuple(views), tuple(order), others)
    return write_scene(path, header, [{STREAM: s} for s in streams])


def encode_distributed_file(path: str | Path, model_id: str, views: Sequence[ViewInfo],
                            images: Sequence[np.ndarray], order: Sequence[int],
                            quality: int) -> tuple[int, DecodedScene]:
    """Code each uint8 ``(H, W, 3)`` image alone → (file bytes, the file's header as a DecodedScene
    with no images: what a view decodes to depends on which other views the decoder holds)."""
    model = load_model(model_id)
    try:
        check_quality(model.backbone, quality)
    except WeightsError as exc:
        raise LmvicError(str(exc)) from exc
    size = write_distributed_file(path, model_id, quality, views,
                                  [encode_view(model, image, quality) for image in images], order)
    with SceneReader(path, models=MODEL_IDS) as reader:
        return size, DecodedScene(reader.header, {}, {})


def decode_views(model: DistributedCodec, infos: Sequence[ViewInfo], streams: Sequence[LatentStream],
                 quality: int) -> dict[str, np.ndarray]:
    """Fused decode of views (each fused with every other one of the same padded size) → uint8
    ``(H, W, 3)`` per view name, cropped to the view's size."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, stream in enumerate(streams):
        groups.setdefault(tuple(stream.shape), []).append(i)
    images = {}
    for members in groups.values():
        coded = [([[streams[i].chunks[0]], [streams[i].chunks[1]]], tuple(streams[i].shape)) for i in members]
        x_hat = model.decompress(coded, float(quality))["x_hat"][0]
        for i, view in zip(members, x_hat):
            info = infos[i]
            images[info.name] = (view[:, :info.height, :info.width].permute(1, 2, 0) * 255).round().to(
                torch.uint8).numpy()
    return images


def read_stream(reader: SceneReader, index: int) -> LatentStream:
    """View ``index``'s ``image`` stream, checked against the view's size (``BitstreamError``)."""
    info = reader.header.views[index]
    stream = reader.read_view(index).get(STREAM)
    if stream is None or len(stream.chunks) != 2 or len(stream.shape) != 2:
        raise BitstreamError(f"view {info.name!r} has no valid {STREAM!r} stream")
    expected = ((info.height + 63) // 64, (info.width + 63) // 64)
    if tuple(stream.shape) != expected:
        raise BitstreamError(f"view {info.name!r}: latent shape {tuple(stream.shape)} does not fit "
                             f"{info.height}x{info.width}")
    return stream


@torch.no_grad()
def decode_distributed_file(source: str | Path, views: Collection[str] | None = None) -> DecodedScene:
    """Decode a distributed-mode file: all its views, or the subset ``views`` (fused among themselves)."""
    with SceneReader(source, models=MODEL_IDS) as reader:
        header = reader.header
        if header.mode != "distributed":
            raise BitstreamError(f"this is a {header.mode}-mode file; the distributed decoder reads distributed mode")
        model = load_model(header.model_id)
        if not 1 <= header.quality <= model.backbone.num_qualities:
            raise BitstreamError(f"quality {header.quality} is not a level of model {header.model_id!r}")
        names = [v.name for v in header.views]
        unknown = set(views or ()) - set(names)
        if unknown:
            raise LmvicError(f"views not in the file: {', '.join(sorted(unknown))}")
        wanted = [i for i, n in enumerate(names) if views is None or n in set(views)]
        streams = [read_stream(reader, i) for i in wanted]
    return DecodedScene(header, decode_views(model, [header.views[i] for i in wanted], streams, header.quality), {})


class DistributedSceneCodec(ContainerEvalCodec):
    """The distributed mode as an RD-evaluation codec: real container bytes.

    The decoder decodes groups of ``group`` views (consecutive in the given order) together, so each
    view has ``group − 1`` side views; 0 decodes all the views together.
    """

    def __init__(self, names: Sequence[str], K: np.ndarray, T: np.ndarray, model_id: str = "distributed-cpu",
                 group: int = 0):
        super().__init__(names, K, T)
        self.model_id, self.group = model_id, group
        self.name = {"distributed-cpu": "lmvic-distributed", "distributed-average-cpu": "lmvic-average"}[model_id]
        if group:
            self.name += f"-{group - 1}side"
        sha = json.loads((WEIGHTS_DIR / f"{model_id}.json").read_text())["sha256"][:12]
        self.description = (f"lmvic distributed mode ({model_id} {sha}), views coded alone, fused at the decoder "
                            f"in groups of {group or 'all'}")
        self.qualities = tuple(range(1, load_model(model_id).backbone.num_qualities + 1))

    def encode_file(self, path, views, images, quality):
        return encode_distributed_file(path, self.model_id, views, images, range(len(views)), quality)[0]

    def decode_file(self, path):
        group = self.group or len(self.names)
        parts = [decode_distributed_file(path, self.names[first: first + group])
                 for first in range(0, len(self.names), group)]
        return DecodedScene(parts[0].header, {n: im for part in parts for n, im in part.images.items()}, {})
