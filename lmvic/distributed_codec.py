"""Distributed mode in a scene file: every view encoded alone, all the decoded views fused.

The container (``lmvic.bitstream``, mode ``distributed``) holds per view one stream ``image`` with
the single-view codec's strings as chunks and the z shape, exactly as the single mode: an encoder
needs one image and nothing else (``encode_view``), and a file is just the views' streams put
together (``write_distributed_file``). The header lists, per view, its side views: its
``side_views`` nearest neighbours in coding order (``neighbours_in_order``), which keeps decoding
linear in the number of views. The decoder fuses every view it decodes with those of its side
views it also decodes (``lmvic.models.distributed``): any subset of views decodes, views left out
are simply not used as side information. Views are padded to multiples of 64 (edge replication)
and cropped back; only views of the same padded size are fused.
"""
from __future__ import annotations

from pathlib import Path
from typing import Collection, Sequence

import numpy as np
import torch

from lmvic.bitstream import (BitstreamError, LatentStream, SceneHeader, SceneReader, ViewInfo,
                             write_scene)
from lmvic.eval_codec import ContainerEvalCodec
from lmvic.models.distributed import DistributedCodec, load_distributed
from lmvic.scene_codec import DecodedScene, padded_image, to_uint8
from lmvic.separate_codec import STREAM, read_stream
from lmvic.zoo import WeightsError, check_quality, load_named, weights_id, weights_sha256
from pipelines.errors import LmvicError

#: Shipped models: OPAM + PMIFM fusion, and the average-pooling comparison point.
MODEL_IDS = ("distributed-cpu", "distributed-average-cpu")
#: Side views per view written into the header by default (the training used clips of 2–4 views).
SIDE_VIEWS = 3


def load_model(model_id: str) -> DistributedCodec:
    return load_named(model_id, MODEL_IDS, load_distributed, "distributed")


@torch.no_grad()
def encode_view(model: DistributedCodec, image: np.ndarray, quality: int) -> LatentStream:
    """One camera's encoder: a uint8 ``(H, W, 3)`` image alone → its ``image`` stream."""
    out = model.compress(padded_image(image), quality)
    return LatentStream.coded(out["strings"], out["shape"])


def neighbours_in_order(order: Sequence[int], count: int) -> tuple[tuple[int, ...], ...]:
    """Per view index, the ``count`` views nearest to it in the coding ``order`` (the previous one
    before the next one at equal distance)."""
    position = {v: p for p, v in enumerate(order)}
    return tuple(tuple(sorted((u for u in order if u != v), key=lambda u: (abs(position[u] - position[v]),
                                                                            position[u]))[:count])
                 for v in range(len(order)))


#: A count of side views per view (its nearest views in coding order), or explicit side views per view.
SideViewChoice = int | Sequence[Sequence[int]]


def write_distributed_file(path: str | Path, model_id: str, quality: int, views: Sequence[ViewInfo],
                           streams: Sequence[LatentStream], order: Sequence[int],
                           side_views: SideViewChoice = SIDE_VIEWS) -> int:
    """Put independently coded views into one file, with each view's side views in the header
    (``side_views`` neighbours in coding order, or the lists given) → its size in bytes."""
    references = (neighbours_in_order(order, side_views) if isinstance(side_views, int)
                  else tuple(tuple(s) for s in side_views))
    header = SceneHeader("distributed", model_id, quality, tuple(views), tuple(order), references,
                         weights_id(model_id))
    return write_scene(path, header, [{STREAM: s} for s in streams])


def encode_distributed_file(path: str | Path, model_id: str, views: Sequence[ViewInfo],
                            images: Sequence[np.ndarray], order: Sequence[int], quality: int,
                            side_views: SideViewChoice = SIDE_VIEWS,
                            streams: Sequence[LatentStream] | None = None) -> tuple[int, DecodedScene]:
    """Code each uint8 ``(H, W, 3)`` image alone → (file bytes, the file's header as a DecodedScene
    with no images: what a view decodes to depends on which other views the decoder holds).

    ``streams``: the images' streams when they were already coded at ``quality`` by this encoder
    (every distributed model shares the single-view encoder, so their streams are the same bytes).
    """
    model = load_model(model_id)
    try:
        check_quality(model.backbone, quality)
    except WeightsError as exc:
        raise LmvicError(str(exc)) from exc
    if streams is None:
        streams = [encode_view(model, image, quality) for image in images]
    size = write_distributed_file(path, model_id, quality, views, streams, order, side_views)
    with SceneReader(path, models=MODEL_IDS) as reader:
        return size, DecodedScene(reader.header, {}, {})


def decode_views(model: DistributedCodec, infos: Sequence[ViewInfo], streams: Sequence[LatentStream],
                 sides: Sequence[Sequence[int]], quality: int) -> dict[str, np.ndarray]:
    """Fused decode: view ``i`` fused with the views ``sides[i]`` (indexes into ``streams``) of the
    same padded size → uint8 ``(H, W, 3)`` per view name, cropped to the view's size."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, stream in enumerate(streams):
        groups.setdefault(tuple(stream.shape), []).append(i)
    images = {}
    for members in groups.values():
        coded = [(streams[i].strings(), tuple(streams[i].shape)) for i in members]
        local = {i: k for k, i in enumerate(members)}
        group_sides = [[local[u] for u in sides[i] if u in local] for i in members]
        x_hat = model.decompress(coded, float(quality), group_sides)["x_hat"][0]
        for i, view in zip(members, x_hat):
            info = infos[i]
            images[info.name] = to_uint8(view[None], info.height, info.width)
    return images


@torch.no_grad()
def decode_distributed_file(source: str | Path, views: Collection[str] | None = None) -> DecodedScene:
    """Decode a distributed-mode file: all its views, or the subset ``views``; each view is fused with
    those of its side views (the header's references) that are decoded too."""
    with SceneReader(source, models=MODEL_IDS) as reader:
        header = reader.header
        if header.mode != "distributed":
            raise BitstreamError(f"this is a {header.mode}-mode file; the distributed decoder reads distributed mode")
        model = load_model(header.model_id)
        header.check_weights(weights_id(header.model_id))
        if not 1 <= header.quality <= model.backbone.num_qualities:
            raise BitstreamError(f"quality {header.quality} is not a level of model {header.model_id!r}")
        names = [v.name for v in header.views]
        unknown = set(views or ()) - set(names)
        if unknown:
            raise LmvicError(f"views not in the file: {', '.join(sorted(unknown))}")
        wanted = [i for i, n in enumerate(names) if views is None or n in set(views)]
        streams = [read_stream(reader, i, model.backbone) for i in wanted]
    local = {i: k for k, i in enumerate(wanted)}
    sides = [[local[u] for u in header.references[i] if u in local] for i in wanted]
    return DecodedScene(header, decode_views(model, [header.views[i] for i in wanted], streams, sides,
                                             header.quality), {})


class DistributedSceneCodec(ContainerEvalCodec):
    """The distributed mode as an RD-evaluation codec: real container bytes, every view decoded
    with its side views (``side_views``: the nearest views in coding order, or explicit lists)."""

    def __init__(self, names: Sequence[str], K: np.ndarray, T: np.ndarray, model_id: str = "distributed-cpu",
                 side_views: SideViewChoice = SIDE_VIEWS, name: str | None = None,
                 shared_streams: dict | None = None):
        """``shared_streams``: a dict shared by codecs that evaluate the same views, so each quality
        is encoded once (then their encode seconds count only the file writing)."""
        super().__init__(names, K, T)
        self.model_id, self.side_views = model_id, side_views
        self.shared_streams = {} if shared_streams is None else shared_streams
        self.name = name or {"distributed-cpu": "lmvic-distributed", "distributed-average-cpu": "lmvic-average"}[model_id]
        sha = weights_sha256(model_id)[:12]
        sides = (f"its {side_views} nearest views in coding order" if isinstance(side_views, int)
                 else f"side views {[list(s) for s in side_views]}")
        self.summary = f"lmvic distributed mode ({model_id} {sha}), views coded alone, each fused at the decoder with {sides}"
        self.qualities = tuple(range(1, load_model(model_id).backbone.num_qualities + 1))

    def encode_file(self, path, views, images, quality):
        from pipelines.rd import views_digest

        key = (quality, views_digest(images))
        if key not in self.shared_streams:
            model = load_model(self.model_id)
            self.shared_streams[key] = [encode_view(model, image, quality) for image in images]
        return encode_distributed_file(path, self.model_id, views, images, range(len(views)), quality,
                                       self.side_views, self.shared_streams[key])[0]

    def decode_file(self, path):
        return decode_distributed_file(path)
