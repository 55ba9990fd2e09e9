"""Depth codec of the joint mode: CVDP prediction from the decoded reference depth, DCI fusion.

Normalisation (``DepthRange``): depth maps are coded as normalised inverse depth
``d = (1/D − 1/far) / (1/near − 1/far)`` clamped to [0, 1] (1 = near, 0 = far), with ``near``/``far``
the smallest and largest valid depth of the whole scene (stored in the scene file). Invalid depth
(0, negative, non-finite) codes as 0, i.e. the far plane; a decoded map is always valid, in
[near, far]. Inverse depth spends the precision where disparity is large.

CVDP (paper Appendix B): the decoded reference depth (metric) is forward-splatted into the target
camera by ``geometry.warp.forward_splat`` (nearest pixel, z-buffer minimum, hit mask), then
normalised (no hit → 0). A prediction feature extractor (stride-2 convs) turns the predicted map
into features ``p_s`` at 1/2, 1/4, 1/8, 1/16 and a mask extractor turns the hit mask into sigmoid
feature masks ``m_s`` at the same scales. DCI at encoder stages 1–3 (1/2, 1/4, 1/8) and decoder
stages 1–3 (1/8, 1/4, 1/2) is ``f + conv3×3([f, p_s]) ⊙ m_s`` — the paper's
``conv([f, p]) ⊙ m`` as a residual with the conv zero-initialised, so the first view (no
reference: DCI skipped) and an untrained reference path both reduce to the plain backbone.
``p_16 ⊙ m_16`` is the QPEM context.

The backbone is the single-view hyperprior (``SingleViewCodec``) with one input/output channel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from geometry.warp import clean_depth, forward_splat
from lmvic.layers import AnalysisStage, SynthesisStage, conv
from lmvic.models.joint import CONTEXT_SCALE, DECODER_SCALES, ENCODER_SCALES, ConditionalCodec, Side
from lmvic.models.single_view import DEFAULT_LAMBDAS, SingleViewCodec

#: Depth codec widths (N, M) per size name.
DEPTH_SIZES: dict[str, tuple[int, int]] = {"cpu": (32, 64), "paper": (128, 192)}
_SCALES = (2, 4, 8, CONTEXT_SCALE)


@dataclass(frozen=True)
class DepthRange:
    """Depth range used by the normalisation (``0 < near < far``): floats for a whole scene, or
    (B,) tensors giving each sample of a batch its own scene's range (training)."""

    near: float | Tensor
    far: float | Tensor

    def __post_init__(self) -> None:
        near = torch.as_tensor(self.near, dtype=torch.float64)
        far = torch.as_tensor(self.far, dtype=torch.float64)
        if not bool(((near > 0) & (far > near) & torch.isfinite(far)).all()):
            raise ValueError(f"invalid depth range near={self.near}, far={self.far}")

    @staticmethod
    def of(depths: Tensor) -> "DepthRange":
        """Smallest and largest valid value of ``depths`` (any shape; a flat scene gets a 1 % margin)."""
        d, valid = clean_depth(depths.reshape(1, 1, -1))
        if not bool(valid.any()):
            raise ValueError("no valid depth to normalise")
        near, far = float(d[valid].min()), float(d[valid].max())
        return DepthRange(near, far if far > near * 1.01 else near * 1.01)

    def _inverse_bounds(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(1/near, 1/far) as (B or 1, 1, 1) tensors of ``like``'s dtype."""
        return tuple((1.0 / torch.as_tensor(v, dtype=torch.float64)).to(like.dtype).reshape(-1, 1, 1)
                     for v in (self.near, self.far))

    def normalise(self, depth: Tensor) -> Tensor:
        """depth (B, H, W) → normalised inverse depth (B, 1, H, W) in [0, 1]."""
        d, valid = clean_depth(depth)
        inv_near, inv_far = self._inverse_bounds(d)
        inv = torch.where(valid, 1.0 / torch.where(valid, d, torch.ones_like(d)), torch.zeros_like(d))
        out = (inv - inv_far) / (inv_near - inv_far)
        return torch.where(valid, out, torch.zeros_like(out)).clamp(0, 1)[:, None]

    def denormalise(self, code: Tensor) -> Tensor:
        """normalised (B, 1, H, W) → depth (B, H, W) in [near, far] (code clamped to [0, 1])."""
        inv_near, inv_far = self._inverse_bounds(code)
        return 1.0 / (code[:, 0].clamp(0, 1) * (inv_near - inv_far) + inv_far)


class Pyramid(nn.Module):
    """(B, 1, H, W) map → features at 1/2, 1/4, 1/8, 1/16 through stride-2 5×5 convs.

    With ``gate`` each scale's output is ``sigmoid(conv1×1(feature))`` (a feature mask in (0, 1)).
    """

    def __init__(self, channels: int, gate: bool = False):
        super().__init__()
        self.down = nn.ModuleList([conv(1, channels)] + [conv(channels, channels) for _ in range(3)])
        self.act = nn.LeakyReLU()
        self.heads = nn.ModuleList(conv(channels, channels, 1, 1) for _ in range(4)) if gate else None

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for k, down in enumerate(self.down):
            x = self.act(down(x))
            feats.append(x if self.heads is None else torch.sigmoid(self.heads[k](x)))
        return feats


class DepthContextIntegration(nn.Module):
    """DCI: ``f + conv3×3([f, p]) ⊙ m`` with the conv zero-initialised."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv(2 * channels, channels, 3, 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, feature: Tensor, prediction: Tensor, mask: Tensor) -> Tensor:
        """All (B, C, h, w) → (B, C, h, w)."""
        return feature + self.conv(torch.cat([feature, prediction], dim=1)) * mask


def depth_backbone(N: int, M: int, lambdas: tuple[float, ...]) -> SingleViewCodec:
    """A single-view hyperprior backbone with a 1-channel input and output."""
    backbone = SingleViewCodec(N, M, lambdas)
    backbone.analysis[0] = AnalysisStage(1, N)
    backbone.synthesis[-1] = SynthesisStage(N, 1, last=True)
    return backbone


class DepthCodec(ConditionalCodec):
    """Depth-map codec of the joint mode (normalised inverse depth in, normalised depth out)."""

    def __init__(self, N: int, M: int, lambdas: tuple[float, ...] = DEFAULT_LAMBDAS):
        super().__init__(depth_backbone(N, M, lambdas),
                         [DepthContextIntegration(N) for _ in ENCODER_SCALES],
                         [DepthContextIntegration(N) for _ in DECODER_SCALES], context_ch=N)
        self.prediction_features = Pyramid(N)
        self.mask_features = Pyramid(N, gate=True)

    def prediction_side(self, prediction: Tensor, hit: Tensor) -> Side:
        """Side information from a normalised prediction (B, 1, H, W) and its hit mask (B, 1, H, W)."""
        p = dict(zip(_SCALES, self.prediction_features(prediction)))
        m = dict(zip(_SCALES, self.mask_features(hit)))
        return Side(enc=tuple((p[s], m[s]) for s in ENCODER_SCALES),
                    dec=tuple((p[s], m[s]) for s in DECODER_SCALES),
                    context=p[CONTEXT_SCALE] * m[CONTEXT_SCALE])


def cross_view_prediction(ref_depth: Tensor, K_ref: Tensor, T_ref: Tensor, K: Tensor, T: Tensor,
                          size: tuple[int, int], depth_range: DepthRange) -> tuple[Tensor, Tensor]:
    """CVDP: splat the decoded reference depth (B, Hr, Wr) into the target camera.

    Returns the normalised prediction (B, 1, H, W) (0 where nothing landed) and the hit mask
    (B, 1, H, W) as 0/1 floats.
    """
    depth, hit = forward_splat(ref_depth, K_ref, T_ref, K, T, size)
    return depth_range.normalise(depth), hit[:, None].to(depth.dtype)


def build_depth_codec(size: str = "cpu", lambdas: tuple[float, ...] = DEFAULT_LAMBDAS) -> DepthCodec:
    """A fresh depth codec of a named size (``DEPTH_SIZES``)."""
    if size not in DEPTH_SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(DEPTH_SIZES)}")
    return DepthCodec(*DEPTH_SIZES[size], lambdas)
