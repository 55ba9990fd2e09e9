"""Mixed-precision training on the CPU: bf16 autocast for the transforms, float32 where precision matters.

``torch.autocast(dtype=torch.bfloat16)`` runs convolutions about twice as fast on CPUs with
AMX/AVX-512-BF16, but bf16 keeps 8 mantissa bits: enough for features, not for likelihoods
(the rate term) or pixel coordinates (a 1-px error at 256 px). Functions wrapped by
:func:`float32` leave autocast and see float32 copies of their floating-point tensor arguments.
"""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch
from torch import Tensor

PRECISIONS = ("fp32", "bf16")
F = TypeVar("F", bound=Callable)


def mixed_precision(precision: str, device: str = "cpu") -> torch.autocast:
    """Context for a training forward: bf16 autocast for ``"bf16"``, plain float32 for ``"fp32"``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")


def _as_float32(v: object) -> object:
    return v.float() if isinstance(v, Tensor) and v.is_floating_point() else v


def float32(fn: F) -> F:
    """``fn`` run with autocast off, its floating-point tensor arguments cast to float32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(*(_as_float32(a) for a in args), **{k: _as_float32(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]
