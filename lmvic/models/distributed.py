"""Distributed multi-view codec: views encoded alone, fused at the decoder with OPAM (ParaHydra).

Encoder: every view is coded by the single-view backbone (``SingleViewCodec``) with no side
information at all — ``compress`` takes one image and nothing else, so cameras need not talk.

Decoder: it holds the streams of all (or any subset of) the views. Each view's latent ŷ is
entropy-decoded exactly as the single-view decoder does; then the synthesis runs on all views
together and, at the latent (1/16) and at the first ``feature_fusions`` decoder feature scales
(1/8, 1/4, 1/2), fuses every view with the others' tensors at the same scale through a multi-view
fusion (``lmvic.fusion``: ``"pmifm"`` = OPAM + PMIFM, ``"average"`` = OPAM + average pooling).
A view decoded alone is fused with no side view (zero side feature).

The entropy parameters use no side information: the encoder does not have it.

Shapes: a scene batch is ``(B, V, 3, H, W)``; all views share ``H × W`` (multiples of 64 for
``compress``; pad and crop outside).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

import lmvic  # noqa: F401  (torchvision shim before compressai)
from compressai.models import CompressionModel
from lmvic.fusion import FUSIONS
from lmvic.layers import ste_round
from lmvic.opam import align_image
from lmvic.exact import EXACT_THREADS, fixed_threads
from lmvic.models.single_view import DEFAULT_LAMBDAS, SingleViewCodec, build_single_view
from lmvic.zoo import WEIGHTS_DIR, WeightsError, base_reference, load_base, read_weights, write_weights


#: Side views of each view: ``sides[v]`` lists the indexes (in the batch's view axis) fused into view
#: ``v``; ``None`` means every other view.
SideViews = Sequence[Sequence[int]] | None


def fuse_views(fusion: nn.Module, feats: Tensor, sides: SideViews = None) -> Tensor:
    """Fuse each view with its side views: ``(B, V, C, h, w)`` → ``(B, V, C, h, w)``."""
    views = feats.shape[1]
    if sides is None:
        sides = [[u for u in range(views) if u != v] for v in range(views)]
    if len(sides) != views or any(v in s or not all(0 <= u < views for u in s) for v, s in enumerate(sides)):
        raise ValueError(f"side views {sides} do not fit {views} views (a view cannot be its own side view)")
    return torch.stack([fusion(feats[:, v], [feats[:, u] for u in sides[v]]) for v in range(views)], dim=1)


class DistributedCodec(CompressionModel):
    """Single-view encoder per view + multi-view fused synthesis.

    Args:
        backbone: the per-view codec (its analysis, hyperprior, entropy models and synthesis).
        fusion: ``"pmifm"`` or ``"average"`` (``lmvic.fusion.FUSIONS``).
        feature_fusions: decoder feature scales fused after the latent (0–3: 1/8, 1/4, 1/2).
    """

    def __init__(self, backbone: SingleViewCodec, fusion: str = "pmifm", feature_fusions: int = 1):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose one of {sorted(FUSIONS)}")
        if not 0 <= feature_fusions <= len(backbone.synthesis) - 1:
            raise ValueError(f"feature_fusions must lie in [0, {len(backbone.synthesis) - 1}]")
        if backbone.context_ch:
            raise ValueError("the distributed backbone must not take entropy context (the encoder has none)")
        self.backbone = backbone
        self.fusion_name = fusion
        widths = [backbone.M] + [backbone.N] * feature_fusions
        self.fusions = nn.ModuleList(FUSIONS[fusion](c) for c in widths)

    # ---- decoder --------------------------------------------------------------------------
    def synthesise_views(self, y_hat: Tensor, stop: int | None = None, sides: SideViews = None,
                         views_at_once: int | None = None) -> Tensor:
        """Fused synthesis. ``y_hat`` ``(B, V, M, h, w)`` (after the inverse gain) → x̂ ``(B, V, 3, 16h, 16w)``.

        Stage ``k`` of the backbone's synthesis maps scale 1/16·2^k to the next; the input of
        stage ``k`` is fused across views for ``k < len(self.fusions)``. With ``stop = k`` (one of
        those) the unfused input of fusion ``k`` is returned instead (``(B, V, C, 2^k h, 2^k w)``).
        ``sides``: each view's side views (``fuse_views``; default: all the other views).
        ``views_at_once``: the synthesis stages run on this many of the B·V views at a time (the
        fusions see all of them), so that the stages' working memory does not grow with the number of
        views (default: all at once).
        """
        fused = len(self.fusions)
        if stop is not None and not 0 <= stop < fused:
            raise ValueError(f"stop must be the index of a fusion, 0..{fused - 1}")

        def run(stages: Sequence[nn.Module], x: Tensor) -> Tensor:
            parts = []
            for part in x.flatten(0, 1).split(views_at_once or x.shape[0] * x.shape[1]):
                for stage in stages:
                    part = stage(part)
                parts.append(part)
            return torch.cat(parts).unflatten(0, x.shape[:2])

        feats = y_hat
        for k in range(fused):
            if k == stop:
                return feats
            feats = run(self.backbone.synthesis[k:k + 1], fuse_views(self.fusions[k], feats, sides))
        return run(self.backbone.synthesis[fused:], feats)

    def decode_views(self, streams: Sequence[tuple[list[list[bytes]], tuple[int, int]]],
                     quality: float, stop: int | None = None, sides: SideViews = None) -> Tensor:
        """Entropy-decode the views' latents and run ``synthesise_views`` (``stop`` as there; the
        synthesis one view at a time).

        ``streams``: per view ``(strings, shape)`` from ``compress`` (batch 1 each) → ``(1, V, ...)``.
        """
        if not streams:
            raise ValueError("decoding needs at least one view")
        codec = self.backbone
        latents = [codec.decode_latent(strings, shape, quality) for strings, shape in streams]
        if len({tuple(y.shape) for y in latents}) != 1:
            raise ValueError("all views decoded together must have the same size")
        y_hat = torch.cat(latents).float()
        level = codec.levels(quality, y_hat.shape[0])
        with fixed_threads(EXACT_THREADS), torch.no_grad():
            return self.synthesise_views(codec.inverse_gain(y_hat, level)[None], stop, sides, views_at_once=1)

    def align_side_image(self, main: Tensor, side: Tensor, quality: float, fusion_index: int | None = None,
                         values: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Attention alignment of two images with the codec's own OPAM (for align-compare).

        Both images are coded, their decoded features at the input of fusion ``fusion_index``
        (default: the finest, i.e. last) go through that fusion's OPAM, and its horizontal and
        vertical attention maps move the side image's pixels onto the main view
        (``lmvic.opam.align_image``: blocks of 16 px at the latent, 8 px at 1/8, ...).

        Args:
            main, side: ``(1, 3, H, W)`` in [0,1], H and W multiples of 64.
            values: what to move instead of the side image, ``(1, C, H, W)`` on the side view's pixel
                grid (e.g. its pixel coordinates, which gives the attention's mean correspondence).
        Returns:
            the aligned side image (or ``values``) ``(1, C, H, W)`` and its validity (OPAM
            consistency) ``(1, 1, H, W)`` in [0, 1].
        """
        index = len(self.fusions) - 1 if fusion_index is None else fusion_index
        if not 0 <= index < len(self.fusions):
            raise ValueError(f"fusion_index must lie in [0, {len(self.fusions) - 1}]")
        coded = [self.compress(image, quality) for image in (main, side)]
        feats = self.decode_views([(c["strings"], c["shape"]) for c in coded], quality, stop=index)
        with torch.no_grad():
            return align_image(self.fusions[index].opam(feats[:, 0], feats[:, 1]), side if values is None else values)

    # ---- CompressAI interface -------------------------------------------------------------
    def latents(self, x: Tensor, quality: float | Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Every view through the single-view encoder: x ``(B, V, 3, H, W)`` → ŷ after the inverse gain
        ``(B, V, M, H/16, W/16)`` and the likelihoods per coded view ``(B·V, ...)`` ({"y", "z"}).

        Quantisation as in the backbone's training path: noise for the likelihoods, straight-through
        rounding for ŷ; with the backbone in eval mode both are the hard rounding of real coding.
        """
        b, v = x.shape[:2]
        codec = self.backbone
        quality = torch.as_tensor(quality, dtype=torch.float32)
        level = codec.levels(quality.repeat_interleave(v) if quality.ndim else quality, b * v)
        y = codec.gain(codec.analyse(x.flatten(0, 1))[-1], level)
        z = codec.hyper_analysis(y)
        _, z_likelihoods = codec.entropy_bottleneck(z)
        medians = codec.entropy_bottleneck._get_medians().detach().reshape(1, -1, 1, 1)
        scales, means = codec.gaussian_params(ste_round(z - medians) + medians)
        _, y_likelihoods = codec.gaussian_conditional(y, scales, means=means)
        y_hat = codec.inverse_gain(ste_round(y - means) + means, level)
        return y_hat.unflatten(0, (b, v)), {"y": y_likelihoods, "z": z_likelihoods}

    def forward(self, x: Tensor, quality: float | Tensor) -> dict[str, object]:
        """x ``(B, V, 3, H, W)`` in [0,1] → {"x_hat" ``(B, V, 3, H, W)``, "likelihoods": {"y","z"}}
        (``latents`` then ``synthesise_views``)."""
        y_hat, likelihoods = self.latents(x, quality)
        return {"x_hat": self.synthesise_views(y_hat), "likelihoods": likelihoods}

    def compress(self, x: Tensor, quality: float) -> dict[str, object]:
        """One view ``(1, 3, H, W)`` alone → {"strings", "shape"} (the backbone's encoder, unchanged)."""
        return self.backbone.compress(x, quality)

    def decompress(self, streams: Sequence[tuple[list[list[bytes]], tuple[int, int]]],
                   quality: float, sides: SideViews = None) -> dict[str, Tensor]:
        """Decode any set of views together.

        Args:
            streams: per view ``(strings, shape)`` as returned by ``compress`` (batch 1 each).
            quality: the quality all views were coded at.
            sides: each view's side views (indexes into ``streams``); default: all the others.
        Returns:
            {"x_hat": ``(1, V, 3, 64·h, 64·w)`` in [0,1]}, views in the order given.
        """
        return {"x_hat": self.decode_views(streams, quality, sides=sides).clamp(0, 1)}


def build_distributed(size: str = "cpu", fusion: str = "pmifm", feature_fusions: int = 1,
                      lambdas: tuple[float, ...] = DEFAULT_LAMBDAS) -> DistributedCodec:
    """A fresh distributed codec on a fresh backbone of a named size (``SIZES``)."""
    return DistributedCodec(build_single_view(size, lambdas), fusion, feature_fusions)


#: Format of a shipped distributed weight file (``save_distributed``).
WEIGHTS_FORMAT = 1


class DecoderPart(CompressionModel):
    """What a distributed codec changes or adds to its single-view base: the fusions and the
    synthesis (views are decoded on their own weights; the encoder, hyperprior and entropy models
    are the base's). It shares the codec's modules, so loading it fills the codec in place."""

    def __init__(self, codec: DistributedCodec):
        super().__init__()
        self.fusions = codec.fusions
        self.synthesis = codec.backbone.synthesis


def save_distributed(codec: DistributedCodec, path: Path, base: str = "single_view_cpu",
                     meta: dict | None = None) -> Path:
    """Ship ``codec`` (float16) as ``path`` + sidecar: only its ``DecoderPart``, plus the name and
    SHA-256 of the shipped single-view weights ``base`` it was trained on (checked on loading)."""
    payload = {"format": WEIGHTS_FORMAT, **base_reference(base), "fusion": codec.fusion_name,
               "feature_fusions": len(codec.fusions) - 1}
    return write_weights(DecoderPart(codec), path, payload, {**payload, **(meta or {}), "half": True})


def load_distributed(name: str, directory: Path = WEIGHTS_DIR) -> DistributedCodec:
    """The shipped distributed codec ``name`` (e.g. ``"distributed-cpu"``) in eval mode, ready to code."""
    ck = read_weights(directory / f"{name}.pt", WEIGHTS_FORMAT, f"shipped weights {name!r}")
    codec = DistributedCodec(load_base(ck, repr(name), directory), ck["fusion"], ck["feature_fusions"])
    try:
        DecoderPart(codec).load_state_dict(ck["state_dict"])
    except RuntimeError as exc:
        raise WeightsError(f"{name!r} does not fit the distributed architecture: {exc}") from exc
    return codec.eval()
