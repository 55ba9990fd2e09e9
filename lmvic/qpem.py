"""QPEM: quadtree-partition entropy model on top of a mean-scale hyperprior (Li et al., 2023).

The latent ``y`` (B, M, h, w) is split into four parts: the channels into four quarters g = 0..3
and the pixels into the four positions p = 2·(i mod 2) + (j mod 2) of every 2×2 block. Element
(c, i, j) of quarter g(c) at position p(i, j) is coded at step ``s = (p − g) mod 4``, so every step
codes one position of each quarter (a Latin square): the four step masks partition the latent
exactly, and each step sees, for every channel quarter, spatial neighbours already decoded.

Gaussian parameters of step s::

    (scales_s, means_s) = (scales_hp, means_hp) + Δ_s(scales_hp, means_hp, context, ŷ_<s)

with ``(scales_hp, means_hp)`` the hyperprior's parameters, ``context`` optional side channels at
the latent resolution (the aligned reference) and ``ŷ_<s`` the latent decoded in the earlier
steps (zero elsewhere). The last layer of every Δ_s starts at zero, so an untrained QPEM is
exactly the plain hyperprior and training can only improve on it. An optional *anchor*
``(weight, target)`` then moves every step's means toward a prediction of the latent:
``means_s ← (1 − weight)·means_s + target`` (:func:`toward`; ``target`` = weight × prediction).

Bit-exactness: coding evaluates every Δ_s in float64 on ``EXACT_THREADS`` threads
(``call_in_float64``) from tensors that encoder and decoder hold identically.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import lmvic  # noqa: F401  (torchvision shim before compressai)
from compressai.entropy_models import GaussianConditional
from lmvic.layers import ste_round
from lmvic.exact import EXACT_THREADS, call_in_float64, fixed_threads

STEPS = 4


def step_masks(channels: int, height: int, width: int, device: torch.device | None = None) -> Tensor:
    """(4, C, H, W) bool: ``[s]`` selects the elements coded at step ``s`` (C a multiple of 4)."""
    if channels % STEPS:
        raise ValueError(f"QPEM needs a channel count divisible by {STEPS}, got {channels}")
    group = torch.arange(channels, device=device) * STEPS // channels  # channel quarter g
    rows = torch.arange(height, device=device) % 2
    cols = torch.arange(width, device=device) % 2
    position = 2 * rows[:, None] + cols[None, :]  # (H, W) in 0..3
    step = (position[None] - group[:, None, None]) % STEPS  # (C, H, W)
    return torch.stack([step == s for s in range(STEPS)])


def toward(means: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    """``(1 − weight)·means + target`` in the means' dtype: means (B, M, h, w) moved toward a prediction,
    ``target`` being ``weight`` × the prediction (both broadcastable to the means)."""
    return (1 - weight.to(means.dtype)) * means + target.to(means.dtype)


class StepParameters(nn.Module):
    """Δ_s: (hyperprior params 2M + decoded latent M + context) → (Δscale, Δmean).

    A small network plus a linear 1×1 path (a context that already predicts the latent, such as
    an aligned reference latent, is then one linear map away); both start at zero.
    """

    def __init__(self, M: int, context_ch: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3 * M + context_ch, hidden, 1), nn.LeakyReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.LeakyReLU(inplace=True),
            nn.Conv2d(hidden, 2 * M, 1),
        )
        self.linear = nn.Conv2d(3 * M + context_ch, 2 * M, 1)
        for layer in (self.net[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, scales: Tensor, means: Tensor, decoded: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """All (B, ·, h, w) → refined (scales, means), each (B, M, h, w)."""
        x = torch.cat([scales, means, decoded] + ([] if context is None else [context]), dim=1)
        d_scales, d_means = (self.net(x) + self.linear(x)).chunk(2, dim=1)
        return scales + d_scales, means + d_means


class QuadtreeEntropyModel(nn.Module):
    """Four-step QPEM over a ``GaussianConditional``.

    Args:
        M: latent channels (multiple of 4).
        context_ch: side channels given to every step (0 = none); a view without reference
            passes ``context=None``, which stands for zeros.
        hidden: width of each step's network (default M).

    The ``GaussianConditional`` (its CDF tables) belongs to the owning codec and is passed in.
    """

    def __init__(self, M: int, context_ch: int = 0, hidden: int | None = None):
        super().__init__()
        self.M, self.context_ch = M, context_ch
        self.steps = nn.ModuleList(StepParameters(M, context_ch, hidden or M) for _ in range(STEPS))

    def _prepare(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(step masks (4, M, h, w), context) — a missing context is zeros (reference path off)."""
        if y.shape[1] != self.M:
            raise ValueError(f"QPEM expects {self.M} latent channels, got {y.shape[1]}")
        if context is None and self.context_ch:
            context = y.new_zeros(y.shape[0], self.context_ch, *y.shape[-2:])
        if (context is None) != (self.context_ch == 0) or (context is not None and context.shape[1] != self.context_ch):
            raise ValueError(f"QPEM expects {self.context_ch} context channels")
        return step_masks(self.M, y.shape[-2], y.shape[-1], y.device), context

    def forward(self, y: Tensor, scales: Tensor, means: Tensor, gaussian: GaussianConditional,
                context: Tensor | None = None, anchor: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Training/estimation path → (ŷ with straight-through rounding, likelihoods), both (B, M, h, w).

        Likelihoods come from ``gaussian`` (additive noise in training mode, rounding in eval mode).
        ``anchor``: (weight, target) applied to every step's means (module docstring).
        """
        masks, context = self._prepare(y, context)
        y_hat = torch.zeros_like(y)
        likelihoods = torch.ones_like(y)
        for s, step in enumerate(self.steps):
            sc, mu = self._anchored(step(scales, means, y_hat, context), anchor)
            _, lik = gaussian(y, sc, means=mu)
            likelihoods = torch.where(masks[s], lik, likelihoods)
            y_hat = torch.where(masks[s], ste_round(y - mu) + mu, y_hat)
        return y_hat, likelihoods

    @staticmethod
    def _anchored(params: tuple[Tensor, Tensor], anchor: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """A step's (scales, means) with the means moved by ``anchor`` (unchanged without one)."""
        scales, means = params
        return scales, (means if anchor is None else toward(means, *anchor))

    def _exact_step(self, s: int, scales: Tensor, means: Tensor, decoded: Tensor, context: Tensor | None,
                    anchor: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        with fixed_threads(EXACT_THREADS), torch.no_grad():
            return self._anchored(call_in_float64(self.steps[s], scales, means, decoded, context), anchor)

    def compress(self, y: Tensor, scales: Tensor, means: Tensor, gaussian: GaussianConditional,
                 context: Tensor | None = None, anchor: tuple[Tensor, Tensor] | None = None
                 ) -> tuple[list[list[bytes]], Tensor]:
        """Code y in four steps → (per step a list of B strings, ŷ (B, M, h, w) float64).

        ``scales``/``means`` must be the hyperprior's float64 parameters computed exactly as the
        decoder will (e.g. ``SingleViewCodec.exact_gaussian_params``); so must ``anchor``'s tensors.
        """
        masks, context = self._prepare(y, context)
        y = y.double()
        y_hat = torch.zeros_like(y)
        strings = []
        for s in range(STEPS):
            sc, mu = self._exact_step(s, scales, means, y_hat, context, anchor)
            m = masks[s]
            indexes = gaussian.build_indexes(sc[:, m])
            strings.append(gaussian.compress(y[:, m], indexes, means=mu[:, m]))
            y_hat[:, m] = gaussian.quantize(y[:, m], "dequantize", mu[:, m])
        return strings, y_hat

    def decompress(self, strings: list[list[bytes]], scales: Tensor, means: Tensor, gaussian: GaussianConditional,
                   context: Tensor | None = None, anchor: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Inverse of ``compress`` → ŷ (B, M, h, w) float64, identical to the encoder's."""
        if len(strings) != STEPS:
            raise ValueError(f"QPEM needs {STEPS} step strings, got {len(strings)}")
        masks, context = self._prepare(scales, context)
        y_hat = torch.zeros_like(scales, dtype=torch.float64)
        for s in range(STEPS):
            sc, mu = self._exact_step(s, scales, means, y_hat, context, anchor)
            m = masks[s]
            indexes = gaussian.build_indexes(sc[:, m])
            y_hat[:, m] = gaussian.decompress(strings[s], indexes, torch.float64, mu[:, m])
        return y_hat


#: The layers that see a step's input ``[scales, means, decoded, context]``: only they know the context.
_FIRST_LAYERS = {f"steps.{s}.{layer}.weight" for s in range(STEPS) for layer in ("net.0", "linear")}


def without_context(state: dict[str, Tensor], M: int) -> dict[str, Tensor]:
    """State dict of a ``QuadtreeEntropyModel(M, context_ch)`` → that of ``QuadtreeEntropyModel(M)``
    with the context inputs dropped, which computes exactly what the original does with a zero context."""
    return {k: v[:, : 3 * M] if k in _FIRST_LAYERS else v for k, v in state.items()}


def with_context_of(plain: dict[str, Tensor], conditioned: dict[str, Tensor], M: int) -> dict[str, Tensor]:
    """Inverse of :func:`without_context`: a ``QuadtreeEntropyModel(M, context_ch)`` state with the weights of
    the plain QPEM ``plain`` and the context inputs' columns of ``conditioned``. With a zero context it
    computes exactly what ``plain`` computes (e.g. the joint codec adopting the single-view codec's QPEM)."""
    return {k: torch.cat([plain[k], v[:, 3 * M:]], dim=1) if k in _FIRST_LAYERS else plain[k]
            for k, v in conditioned.items()}
