"""CompressAI's entropy models, kept in float32 when the transforms train under bf16 autocast.

A likelihood computed from a bf16 latent (8 mantissa bits) cannot resolve the rate term, so the
entropy models' forward always runs in float32 (``lmvic.precision.float32``). Without autocast these
classes behave exactly like CompressAI's, and their state dicts are the same.
"""
from __future__ import annotations

import lmvic  # noqa: F401  (torchvision shim before compressai)
from compressai.entropy_models import EntropyBottleneck as _EntropyBottleneck
from compressai.entropy_models import GaussianConditional as _GaussianConditional
from lmvic.precision import float32


class EntropyBottleneck(_EntropyBottleneck):
    """``compressai.entropy_models.EntropyBottleneck`` whose training forward stays in float32."""

    forward = float32(_EntropyBottleneck.forward)


class GaussianConditional(_GaussianConditional):
    """``compressai.entropy_models.GaussianConditional`` whose training forward stays in float32."""

    forward = float32(_GaussianConditional.forward)
