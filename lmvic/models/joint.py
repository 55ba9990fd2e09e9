"""Joint-mode image codec of 3D-LMVIC (ICT), on a reference-conditioned hyperprior + QPEM core.

``ConditionalCodec`` is the core shared with the depth codec: the single-view backbone
(``SingleViewCodec``: stride-2 analysis/synthesis stages, gain units, hyperprior) with a fusion
module after each of the first three analysis stages (1/2, 1/4, 1/8) and the first three
synthesis stages (1/8, 1/4, 1/2), and QPEM (``lmvic.qpem``) instead of the plain mean-scale
model, conditioned on a context at 1/16. Side information is a :class:`Side`; ``side=None`` turns
the reference path off (the first view of a sequence): every fusion is skipped and the QPEM
context is zero. Every fusion and every QPEM step is residual with a zero-initialised last layer,
so a freshly built codec on loaded single-view weights reproduces the single-view codec exactly
without a reference, and with one wherever no pixel is trusted (see the reference prior below).

``JointImageCodec`` adds the image reference path (paper Fig. 3/4):

- reference features ``r_s`` at s = 1/2, 1/4, 1/8, 1/16 from the decoded reference image and the
  reference decoder's features at 1/2, 1/4, 1/8 (``ReferenceFeatures``);
- feature masks ``m_s`` (N channels, sigmoid) learned from the trust mask at each scale
  (``FeatureMask``; the trust mask at scale s is the area fraction of ``geometry.warp.multiscale``);
- the aligned reference ``a_s = backward_warp(r_s, disparity_s) ⊙ m_s`` — the warp and mask half of
  ICT, computed once per scale and shared by the encoder's and decoder's ICT at that scale;
- ICT fusion ``f + Z(ResBlock(conv3×3([f, a_s])))`` (``ContextTransfer``, Z = zero-init 1×1 conv);
- the QPEM context is ``a_16``, the trust-mask fraction at 1/16 and the *aligned latent*: the
  backbone's own analysis of the reference image warped into the target at full resolution,
  masked at 1/16 and scaled by the target's gain (``Side.latent``). It lives in the target
  latent's space, so where the warp is right it predicts y almost directly;
- the *reference prior*: before QPEM, the hyperprior's means move to that aligned latent in
  proportion to the trust mask at 1/16 (``ConditionalCodec.reference_prior``), so the entropy model
  starts from "the latent is the reference's" where the geometry says so, and QPEM learns the
  corrections (measured on fox before any training: the aligned latent is 3–4× closer to y than the
  hyperprior's means in the trusted 90 % of the latent, RMS);
- the *reference anchor*: after each QPEM step the means move toward the aligned latent once more,
  by α·trust with α (quality level × channel, in [0, 1]) learned (``ReferenceAnchor``): QPEM's
  corrections, learned mostly on poorly covered views, had drifted away from a reference that fits
  (on fox at q1, anchoring by α = 0.5 untrained cut the referenced views' bits by 15 % and raised
  their PSNR by 0.15 dB).

Shapes: images (B, 3, H, W) in [0, 1], H and W multiples of 64 for coding; the latent is
(B, M, H/16, W/16). Coding is bit-exact across processes: everything the decoder derives from
the reference runs on ``EXACT_THREADS`` threads under ``no_grad`` on both sides, and the entropy
parameters are float64 (see ``lmvic.qpem`` and ``lmvic.models.single_view``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Sequence

import torch
from torch import Tensor, nn

import lmvic  # noqa: F401  (torchvision shim before compressai)
from compressai.layers import ResidualBlock
from compressai.models import CompressionModel
from geometry.warp import backward_warp
from lmvic.layers import conv, level_values, ste_round
from lmvic.exact import EXACT_THREADS, fixed_threads
from lmvic.models.single_view import DEFAULT_LAMBDAS, SingleViewCodec, build_single_view
from lmvic.qpem import QuadtreeEntropyModel, toward
from lmvic.refine import refine_latent

#: Fused scales (downsampling factors) of the encoder, decoder and entropy context.
ENCODER_SCALES = (2, 4, 8)
DECODER_SCALES = (8, 4, 2)
CONTEXT_SCALE = 16


@dataclass(frozen=True)
class Side:
    """Reference information for one target view.

    enc[k] / dec[k]: argument tuples passed to the k-th encoder / decoder fusion after the
    backbone feature (scales ``ENCODER_SCALES`` / ``DECODER_SCALES``).
    context: (B, C, H/16, W/16) QPEM context.
    latent: optional (B, M, H/16, W/16) reference latent aligned to the target, before the gain,
        times ``trust``: the QPEM context is ``[context, gain(latent)]`` (``context_ch = C + M``).
    trust: (B, 1, H/16, W/16) in [0, 1], given with ``latent``: how much of each latent pixel the
        reference covers reliably; the hyperprior's means move to the aligned latent by this much
        (``ConditionalCodec.reference_prior``), QPEM's by α times this much (``reference_anchor``).
    """

    enc: tuple[tuple[Tensor, ...], ...]
    dec: tuple[tuple[Tensor, ...], ...]
    context: Tensor
    latent: Tensor | None = None
    trust: Tensor | None = None

    def entropy_only(self) -> "Side":
        """The same reference for the entropy model only: no fusion runs in the transforms, so the
        latent and the reconstruction are the backbone's and the reference only makes them cheaper."""
        return replace(self, enc=(), dec=())


def zero_conv(in_ch: int, out_ch: int, kernel: int = 1) -> nn.Conv2d:
    """Convolution whose weights and bias start at zero (the output of a fresh residual branch)."""
    layer = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ReferenceAnchor(nn.Module):
    """α (B, M, 1, 1) in [0, 1] of a quality level (B,): per level and latent channel, the share of the
    way QPEM's means move toward the aligned reference latent where it is trusted; interpolated
    between levels like the gains."""

    def __init__(self, levels: int, channels: int, init: float = 0.5):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((levels, channels), init))

    def forward(self, level: Tensor) -> Tensor:
        """level (B,) float in [0, L-1] → α (B, M, 1, 1)."""
        return level_values(self.alpha, level).clamp(0, 1)[:, :, None, None]


class ConditionalCodec(CompressionModel):
    """Hyperprior + QPEM codec whose transforms take per-scale side information.

    Args:
        backbone: provides analysis/synthesis stages, hyperprior, gains and entropy models.
        enc_fusions / dec_fusions: three modules each, ``fusion(f, *side.enc[k]) → f``.
        context_ch: channels of ``Side.context``.
        anchored: a ``ReferenceAnchor`` for sides with an aligned latent (``Side.latent``).
    """

    def __init__(self, backbone: SingleViewCodec, enc_fusions: Sequence[nn.Module],
                 dec_fusions: Sequence[nn.Module], context_ch: int, anchored: bool = False):
        super().__init__()
        if len(enc_fusions) != len(ENCODER_SCALES) or len(dec_fusions) != len(DECODER_SCALES):
            raise ValueError("a conditional codec needs three encoder and three decoder fusions")
        if backbone.context_ch:
            raise ValueError("the backbone must not take entropy context (QPEM conditions on it)")
        self.backbone = backbone
        self.enc_fusions = nn.ModuleList(enc_fusions)
        self.dec_fusions = nn.ModuleList(dec_fusions)
        self.qpem = QuadtreeEntropyModel(backbone.M, context_ch)
        self.anchor = ReferenceAnchor(backbone.num_qualities, backbone.M) if anchored else None

    @property
    def num_qualities(self) -> int:
        return self.backbone.num_qualities

    def qpem_context(self, side: Side | None, level: Tensor) -> Tensor | None:
        """QPEM context of ``side`` for the 0-based quality ``level`` (B,) (None without reference)."""
        if side is None or side.latent is None:
            return None if side is None else side.context
        return torch.cat([side.context, self.backbone.gain(side.latent, level)], dim=1)

    def reference_prior(self, means: Tensor, side: Side | None, level: Tensor) -> Tensor:
        """Hyperprior means (B, M, h, w) → ``(1 − trust)·means + trust·gain(L)``, L the aligned reference
        latent (``Side.latent`` = trust·L): where the reference is trusted, the latent is predicted from
        it, not from the hyper-latent. Unchanged without an aligned latent. Elementwise in the means'
        dtype, so the coding path (float64) computes it identically in encoder and decoder."""
        if side is None or side.latent is None:
            return means
        if side.trust is None:
            raise ValueError("a side with an aligned latent needs its trust map")
        return toward(means, side.trust, self.backbone.gain(side.latent, level))

    def reference_anchor(self, side: Side | None, level: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """QPEM's anchor ``(α·trust, α·gain(L·trust))`` in ``dtype`` (``lmvic.qpem.toward``); None without an
        aligned latent or a ``ReferenceAnchor``."""
        if self.anchor is None or side is None or side.latent is None:
            return None
        alpha = self.anchor(level).to(dtype)
        return alpha * side.trust.to(dtype), alpha * self.backbone.gain(side.latent, level).to(dtype)

    def qpem_inputs(self, means: Tensor, side: Side | None, level: Tensor
                    ) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]:
        """Hyperprior means (B, M, h, w) → what QPEM takes besides them: (means after ``reference_prior``,
        ``qpem_context``, ``reference_anchor`` in the means' dtype), the same for training and coding."""
        return (self.reference_prior(means, side, level), self.qpem_context(side, level),
                self.reference_anchor(side, level, means.dtype))

    # ---- transforms -------------------------------------------------------------------------
    def analyse(self, x: Tensor, side: Side | None) -> Tensor:
        """x (B, C, H, W) → y (B, M, H/16, W/16), before the gain."""
        for k, stage in enumerate(self.backbone.analysis):
            x = stage(x)
            if side is not None and k < len(side.enc):
                x = self.enc_fusions[k](x, *side.enc[k])
        return x

    def synthesise(self, y_hat: Tensor, side: Side | None) -> list[Tensor]:
        """ŷ after the inverse gain → decoder features at 1/8, 1/4, 1/2 (after fusion) and the output."""
        feats = []
        for k, stage in enumerate(self.backbone.synthesis):
            y_hat = stage(y_hat)
            if side is not None and k < len(side.dec):
                y_hat = self.dec_fusions[k](y_hat, *side.dec[k])
            feats.append(y_hat)
        return feats

    # ---- training / estimation --------------------------------------------------------------
    def latent(self, x: Tensor, quality: float | Tensor, side: Side | None = None) -> Tensor:
        """x (B, C, H, W) → the gained latent y (B, M, H/16, W/16) that is quantised."""
        return self.backbone.gain(self.analyse(x, side), self.backbone.levels(quality, x.shape[0]))

    def forward(self, x: Tensor, quality: float | Tensor, side: Side | None = None) -> dict[str, object]:
        """→ {"x_hat", "features" (decoder features 1/8, 1/4, 1/2), "likelihoods": {"y", "z"}}.

        Same quantisation as the single-view training path (noise for likelihoods in training
        mode, straight-through rounding into the synthesis).
        """
        return self.forward_latent(self.latent(x, quality, side), quality, side)

    def forward_latent(self, y: Tensor, quality: float | Tensor, side: Side | None = None) -> dict[str, object]:
        """``forward`` from the gained latent y (B, M, h, w) on (what ``latent`` gives, or a refinement of it)."""
        bb = self.backbone
        level = bb.levels(quality, y.shape[0])
        z = bb.hyper_analysis(y)
        _, z_likelihoods = bb.entropy_bottleneck(z)
        medians = bb.entropy_bottleneck._get_medians().detach().reshape(1, -1, 1, 1)
        scales, means = bb.gaussian_params(ste_round(z - medians) + medians)
        means, context, anchor = self.qpem_inputs(means, side, level)
        y_hat, y_likelihoods = self.qpem(y, scales, means, bb.gaussian_conditional, context, anchor)
        feats = self.synthesise(bb.inverse_gain(y_hat, level), side)
        return {"x_hat": feats[-1], "features": feats[:-1],
                "likelihoods": {"y": y_likelihoods, "z": z_likelihoods}}

    # ---- coding -----------------------------------------------------------------------------
    def encode(self, x: Tensor, quality: float, side: Side | None = None, refine_steps: int = 0,
               valid: tuple[int, int] | None = None) -> tuple[list[list[bytes]], tuple[int, int], Tensor]:
        """x (B, C, H, W), H and W multiples of 64 → (strings [y step 0..3, z], z shape, ŷ float64).

        ``refine_steps`` > 0 spends encode time on a cheaper latent for the same decoder
        (``lmvic.refine``); ``valid``: (height, width) of the image within the padded x.
        """
        if x.shape[-2] % 64 or x.shape[-1] % 64:
            raise ValueError("coding needs H and W multiples of 64 (pad first)")
        with torch.no_grad():
            y = self.latent(x, quality, side)
        y = refine_latent(self, partial(self.forward_latent, quality=quality, side=side), x, y,
                          self.backbone.lambda_of(quality, x.shape[0]), refine_steps, valid)
        with torch.no_grad():
            return self.code_latent(y, quality, side)

    def code_latent(self, y: Tensor, quality: float, side: Side | None = None
                    ) -> tuple[list[list[bytes]], tuple[int, int], Tensor]:
        """Code the gained latent y (B, M, h, w), h and w multiples of 4 → as ``encode``."""
        bb = self.backbone
        level = bb.levels(quality, y.shape[0])
        with torch.no_grad():
            z = bb.hyper_analysis(y)
        z_strings = bb.entropy_bottleneck.compress(z)
        z_hat = bb.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        scales, means = bb.exact_gaussian_params(z_hat)
        with torch.no_grad():
            means, context, anchor = self.qpem_inputs(means, side, level)
        y_strings, y_hat = self.qpem.compress(y, scales, means, bb.gaussian_conditional, context, anchor)
        return [*y_strings, z_strings], tuple(z.shape[-2:]), y_hat

    def decode_latent(self, strings: list[list[bytes]], shape: tuple[int, int], quality: float,
                      side: Side | None = None) -> Tensor:
        """Strings from ``encode`` → ŷ (B, M, 4h, 4w) float64, identical to the encoder's."""
        if len(strings) != 5:
            raise ValueError("expected five strings: y steps 0..3 and z")
        bb = self.backbone
        z_hat = bb.entropy_bottleneck.decompress(strings[4], shape)
        scales, means = bb.exact_gaussian_params(z_hat)
        level = bb.levels(quality, z_hat.shape[0])
        with torch.no_grad():
            means, context, anchor = self.qpem_inputs(means, side, level)
        return self.qpem.decompress(strings[:4], scales, means, bb.gaussian_conditional, context, anchor)

    def reconstruct(self, y_hat: Tensor, quality: float, side: Side | None = None) -> list[Tensor]:
        """ŷ (gained) → decoder features and output (see ``synthesise``), on ``EXACT_THREADS`` threads."""
        bb = self.backbone
        with fixed_threads(EXACT_THREADS), torch.no_grad():
            return self.synthesise(bb.inverse_gain(y_hat.float(), bb.levels(quality, y_hat.shape[0])), side)


class FeatureMask(nn.Module):
    """Trust-mask fraction (B, 1, h, w) → feature mask (B, C, h, w) in (0, 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(conv(1, channels, 3, 1), nn.LeakyReLU(inplace=True),
                                 conv(channels, channels, 3, 1), nn.Sigmoid())

    def forward(self, mask: Tensor) -> Tensor:
        return self.net(mask)


class ReferenceFeatures(nn.Module):
    """Decoded reference image + its decoder features → reference features at 1/2, 1/4, 1/8, 1/16.

    ``r_2 = F(conv↓(x̂), d_2)``, ``r_4 = F(conv↓(r_2), d_4)``, ``r_8 = F(conv↓(r_4), d_8)``,
    ``r_16 = conv↓(r_8)``, with F = 3×3 conv over the concatenation and conv↓ a stride-2 5×5 conv.
    """

    def __init__(self, N: int):
        super().__init__()
        self.down = nn.ModuleList([conv(3, N), conv(N, N), conv(N, N), conv(N, N)])
        self.merge = nn.ModuleList(conv(2 * N, N, 3, 1) for _ in range(3))
        self.act = nn.LeakyReLU()

    def forward(self, image: Tensor, decoder_feats: Sequence[Tensor]) -> list[Tensor]:
        """image (B, 3, H, W); decoder_feats at 1/8, 1/4, 1/2 (N ch) → [r_2, r_4, r_8, r_16] (N ch)."""
        feats, x = [], image
        for k, down in enumerate(self.down):
            x = self.act(down(x))
            if k < len(self.merge):
                x = self.act(self.merge[k](torch.cat([x, decoder_feats[-1 - k]], dim=1)))
            feats.append(x)
        return feats


class ContextTransfer(nn.Module):
    """ICT fusion: ``f + Z(ResBlock(conv3×3([f, aligned])))`` (Z zero-initialised: starts as identity)."""

    def __init__(self, channels: int):
        super().__init__()
        self.fuse = nn.Sequential(conv(2 * channels, channels, 3, 1), nn.LeakyReLU(inplace=True),
                                  ResidualBlock(channels, channels))
        self.out = zero_conv(channels, channels)

    def forward(self, feature: Tensor, aligned: Tensor) -> Tensor:
        """feature, aligned: (B, C, h, w) → (B, C, h, w)."""
        return feature + self.out(self.fuse(torch.cat([feature, aligned], dim=1)))


class JointImageCodec(ConditionalCodec):
    """Image codec of the joint mode: single-view backbone + ICT in encoder and decoder + QPEM."""

    def __init__(self, backbone: SingleViewCodec):
        N = backbone.N
        super().__init__(backbone, [ContextTransfer(N) for _ in ENCODER_SCALES],
                         [ContextTransfer(N) for _ in DECODER_SCALES], context_ch=N + 1 + backbone.M, anchored=True)
        self.reference_features = ReferenceFeatures(N)
        self.feature_masks = nn.ModuleDict({str(s): FeatureMask(N) for s in (2, 4, 8, CONTEXT_SCALE)})

    def reference_side(self, ref_image: Tensor, ref_feats: Sequence[Tensor],
                       relation: dict[int, tuple[Tensor, Tensor]]) -> Side:
        """Side information of a target view from its decoded reference.

        Args:
            ref_image: (B, 3, H, W) decoded reference. ref_feats: its decoder features (1/8, 1/4, 1/2).
            relation: ``geometry.warp.multiscale`` of the target→reference disparity and trust mask,
                with the factors 1, 2, 4, 8, 16: {f: (disparity (B, 2, H/f, W/f), mask (B, 1, ·))}.

        The aligned latent is computed without gradient (an input of the entropy model, like the
        hyperprior's parameters, not a path to train the reference's decoder through).
        """
        feats = dict(zip((2, 4, 8, CONTEXT_SCALE), self.reference_features(ref_image, ref_feats)))
        aligned = {}
        for s, r in feats.items():
            disparity, mask = relation[s]
            aligned[s] = backward_warp(r, disparity) * self.feature_masks[str(s)](mask)
        mask_16 = relation[CONTEXT_SCALE][1]
        with torch.no_grad():
            latent = self.analyse(backward_warp(ref_image, relation[1][0]), None) * mask_16
        return Side(enc=tuple((aligned[s],) for s in ENCODER_SCALES),
                    dec=tuple((aligned[s],) for s in DECODER_SCALES),
                    context=torch.cat([aligned[CONTEXT_SCALE], mask_16], dim=1), latent=latent, trust=mask_16)


def build_joint_image(size: str = "cpu", lambdas: tuple[float, ...] = DEFAULT_LAMBDAS,
                      backbone: SingleViewCodec | None = None) -> JointImageCodec:
    """Joint image codec on ``backbone`` (e.g. shipped single-view weights) or on a fresh one of ``size``."""
    return JointImageCodec(backbone if backbone is not None else build_single_view(size, lambdas))

