"""CompressAI's entropy models, kept in float32 when the transforms train under bf16 autocast, and
with an optional straight-through rounding for optimising a latent at encode time.

A likelihood computed from a bf16 latent (8 mantissa bits) cannot resolve the rate term, so the
entropy models' forward always runs in float32 (``lmvic.precision.float32``). Without autocast and
with ``straight_through`` off (the default) these classes behave exactly like CompressAI's, and
their state dicts are the same.

``straight_through = True`` (see ``lmvic.refine``) changes only gradients: the eval-mode rounding
``round(x − μ) + μ`` then passes the gradient to x unchanged and none to μ, so the estimated rate
of the *rounded* latent can be minimised by gradient descent. The values are the same bit for bit
(``r + (x − x)`` is exactly ``r``).

``bits_per_pixel`` turns the models' likelihoods into the rate every training loss and the encoder's
refinement count.
"""
from __future__ import annotations

import math

import lmvic  # noqa: F401  (torchvision shim before compressai)
from compressai.entropy_models import EntropyBottleneck as _EntropyBottleneck
from compressai.entropy_models import GaussianConditional as _GaussianConditional
from torch import Tensor

from lmvic.precision import float32


class _StraightThrough:
    """Mixin over a CompressAI entropy model: straight-through eval-mode rounding when enabled."""

    straight_through = False

    def quantize(self, inputs: Tensor, mode: str, means: Tensor | None = None) -> Tensor:
        outputs = super().quantize(inputs, mode, means)  # type: ignore[misc]
        if mode != "dequantize" or not self.straight_through:
            return outputs
        outputs = outputs + (inputs - inputs.detach())
        return outputs if means is None else outputs - (means - means.detach())


class EntropyBottleneck(_StraightThrough, _EntropyBottleneck):
    """``compressai.entropy_models.EntropyBottleneck`` whose training forward stays in float32; ``_StraightThrough`` rounding on request."""

    forward = float32(_EntropyBottleneck.forward)


class GaussianConditional(_StraightThrough, _GaussianConditional):
    """``compressai.entropy_models.GaussianConditional`` whose training forward stays in float32; ``_StraightThrough`` rounding on request."""

    forward = float32(_GaussianConditional.forward)


def bits_per_pixel(likelihoods: dict[str, Tensor], num_pixels: int) -> Tensor:
    """Σ −log2 likelihood per sample / pixels → (B,)."""
    total = sum(l.log().flatten(1).sum(1) for l in likelihoods.values())
    return -total / (math.log(2) * num_pixels)
