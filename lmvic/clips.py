"""Training clips for the joint codec: runs of consecutive views in coding order, randomly cropped.

A :class:`ViewSequence` holds one scene's views already in coding order (images, depths in camera
z, intrinsics, world-to-camera). :class:`ClipSampler` draws a sequence (weighted by its number of
clips), a run of ``length`` consecutive views and one crop window shared by the run; each view's
principal point is shifted by the crop offset (``geometry.cameras.crop_intrinsics``), so the
geometry of the crop stays exact. No flips: a flip would need mirrored cameras too. Crop ``0``
takes whole views, cut to multiples of the scene codec's padding ``PAD`` at a random
offset: what the depth codec sees when it codes (its coarse map of a crop would be a few pixels), one
sequence per batch so that the views stack.

``range_jitter`` j > 0 narrows each clip's normalisation range in inverse depth:
``1/near' = 1/far + (1/near - 1/far) * u`` with ``u ~ U(1 - j, 1)``. A scene's normalised inverse
depth sits mostly near 0 (far content dominates), so without it the depth codec only ever sees the
low end of [0, 1] and codes nearer held-out content badly; with it the same maps are stretched
toward 1 (content nearer than ``near'`` saturates at 1, as the codec's clamp codes it).

Sources (:func:`load_sequence`): a scene made by ``scenes.synthetic.generate`` (exact depth and
poses; its arc order is the coding order), or a real scene's work folder: its stage-one outputs
(working images, median depth, cameras) in the coding order of its relations stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from geometry.cameras import crop_intrinsics
from lmvic.models.depth_codec import DepthRange
from lmvic.scene_codec import PAD


@dataclass(frozen=True)
class ViewSequence:
    """One scene in coding order: images (V, H, W, 3) uint8, depths (V, H, W) float32 (0 = invalid),
    intrinsics (V, 3, 3), world_to_camera (V, 4, 4)."""

    images: np.ndarray
    depths: np.ndarray
    intrinsics: np.ndarray
    world_to_camera: np.ndarray

    def __post_init__(self) -> None:
        v, h, w = self.depths.shape
        if self.images.shape != (v, h, w, 3) or self.intrinsics.shape != (v, 3, 3) \
                or self.world_to_camera.shape != (v, 4, 4):
            raise ValueError("ViewSequence: images, depths and cameras disagree in count or size")

    @cached_property
    def depth_range(self) -> DepthRange:
        """The whole sequence's range, as the scene codec normalises (not the crop's)."""
        return DepthRange.of(torch.from_numpy(self.depths))


def load_sequence(source: Path | str) -> ViewSequence:
    """A training sequence from ``source``: a scene folder with ground truth (``gt/cameras.json`` and
    ``depth_gt/``, as ``scenes.synthetic.generate`` writes it; file order = arc order = coding order),
    or a work folder whose stage one and relations stage have run (median depth, relations' order)."""
    from pipelines.relations import finished_relations, stage_views, views_from_ground_truth

    source = Path(source)
    if (source / "gt" / "cameras.json").is_file():
        views = views_from_ground_truth(source)
        return stage_sequence(views, range(len(views.names)))
    views = stage_views(source)
    names = list(views.names)
    return stage_sequence(views, [names.index(n) for n in finished_relations(source).info["order"]])


def stage_sequence(views, order: Sequence[int], depth_kind: str = "median") -> ViewSequence:
    """A real scene from its stage outputs: ``views`` a ``pipelines.relations.Views`` (names, K, T,
    ``depth(kind, i)``, ``image(i)``), ``order`` the coding order as view indexes.

    Views of different sizes (per-image cameras undistort to slightly different sizes) are cropped
    at the top-left corner to the common size, which keeps their intrinsics valid.
    """
    if views.image is None:
        raise ValueError("these views carry no images")
    images = [views.image(i) for i in order]
    depths = [views.depth(depth_kind, i) for i in order]
    h, w = min(im.shape[0] for im in images), min(im.shape[1] for im in images)
    return ViewSequence(np.stack([im[:h, :w] for im in images]), np.stack([d[:h, :w] for d in depths]).astype(np.float32),
                        np.asarray(views.K)[list(order)], np.asarray(views.T)[list(order)])


@dataclass(frozen=True)
class Clip:
    """A batch of clips: images (B, L, 3, h, w) in [0, 1], depths (B, L, h, w), K (B, L, 3, 3),
    T (B, L, 4, 4) (float32) and each clip's sequence depth range (near, far: (B,))."""

    images: torch.Tensor
    depths: torch.Tensor
    K: torch.Tensor
    T: torch.Tensor
    depth_range: DepthRange


def check_range_jitter(range_jitter: float) -> None:
    """ValueError unless ``range_jitter`` is in [0, 1) (1 would let near' reach far)."""
    if not 0.0 <= range_jitter < 1.0:
        raise ValueError(f"range_jitter must be in [0, 1), got {range_jitter}")


class ClipSampler:
    """Random clips of ``length`` consecutive views cropped to ``crop`` × ``crop`` (0: whole views),
    normalised with the sequence's depth range narrowed by up to ``range_jitter`` (module docstring)."""

    def __init__(self, sequences: Sequence[ViewSequence], length: int = 4, crop: int = 128, seed: int = 0,
                 range_jitter: float = 0.0):
        check_range_jitter(range_jitter)
        least = crop or PAD
        self.sequences = [s for s in sequences
                          if len(s.depths) >= length and min(s.depths.shape[1:]) >= least]
        if not self.sequences:
            raise ValueError(f"no sequence has {length} views of at least {least} px")
        self.length, self.crop, self.range_jitter = length, crop, range_jitter
        counts = np.array([len(s.depths) - length + 1 for s in self.sequences], dtype=np.float64)
        self.weights = counts / counts.sum()
        self.rng = np.random.default_rng(seed)

    def sequence(self) -> ViewSequence:
        """A random sequence, weighted by its number of clips."""
        return self.sequences[int(self.rng.choice(len(self.sequences), p=self.weights))]

    def one(self, seq: ViewSequence) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
        """A clip of ``seq``: (images (L, h, w, 3), depths (L, h, w), K (L, 3, 3) with shifted principal
        point, T (L, 4, 4), (near, far) of the sequence, near jittered); h = w = crop, or the whole
        view's size."""
        start = int(self.rng.integers(0, len(seq.depths) - self.length + 1))
        views = slice(start, start + self.length)
        h, w = seq.depths.shape[1:]
        ch, cw = (self.crop, self.crop) if self.crop else (h - h % PAD, w - w % PAD)
        y0 = int(self.rng.integers(0, h - ch + 1))
        x0 = int(self.rng.integers(0, w - cw + 1))
        window = (views, slice(y0, y0 + ch), slice(x0, x0 + cw))
        near, far = seq.depth_range.near, seq.depth_range.far
        if self.range_jitter:
            u = self.rng.uniform(1.0 - self.range_jitter, 1.0)
            near = 1.0 / (1.0 / far + (1.0 / near - 1.0 / far) * u)
        return (seq.images[window], seq.depths[window], crop_intrinsics(seq.intrinsics[views], x0, y0),
                seq.world_to_camera[views], (near, far))

    def batch(self, size: int) -> Clip:
        # whole views: one sequence (one size) for the batch
        seqs = [self.sequence() for _ in range(size)] if self.crop else [self.sequence()] * size
        images, depths, K, T, bounds = (np.stack(parts) for parts in zip(*(self.one(seq) for seq in seqs)))
        return Clip(torch.from_numpy(images).permute(0, 1, 4, 2, 3).float().div_(255),
                    torch.from_numpy(depths).float(), torch.from_numpy(K).float(), torch.from_numpy(T).float(),
                    DepthRange(torch.from_numpy(bounds[:, 0]), torch.from_numpy(bounds[:, 1])))
