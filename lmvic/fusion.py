"""Multi-view fusion of side views into a main feature (ParaHydra's PMIFM and LDMIC's average).

Both fusions share one interface, ``fusion(main [B, C, H, W], sides: list of [B, C, H, W])
-> [B, C, H, W]``, and the same steps: every side view is aligned onto the main view with OPAM, the
aligned views are combined into one side feature, and a residual merge adds it to the main feature.
They differ only in how the views are combined:

* ``ParallaxFusion`` (PMIFM): each aligned view is weighted by its cycle consistency ``C`` (relative
  to the view's best) and the views are mixed with per-pixel softmax weights computed from their
  consistencies, so a view that does not see a region gives way to one that does;
* ``AverageFusion`` (LDMIC's multi-view choice): the plain mean of the aligned views.

With no side view (a view decoded alone) the side feature is zero. The merge's last convolution
starts at zero, so an untrained fusion is the identity: a distributed codec built on trained
single-view weights starts out exactly as the single-view decoder (staged training).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from lmvic.opam import OPAM


class _AlignedViewFusion(nn.Module):
    """Align each side view with OPAM, ``combine`` them, merge with the main feature."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.opam = OPAM(channels)
        self.merge = nn.Sequential(
            nn.Conv2d(2 * channels, channels, 1),
            nn.LeakyReLU(0.1),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        nn.init.zeros_(self.merge[-1].weight)
        nn.init.zeros_(self.merge[-1].bias)

    def align(self, main: Tensor, sides: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Align every side view (batched through OPAM as one ``[B·V, ...]`` batch).

        Returns the aligned views ``[B, V, C, H, W]`` and their consistencies ``[B, V, 1, H, W]``.
        """
        views = len(sides)
        for side in sides:
            if side.shape != main.shape:
                raise ValueError(f"fusion: side view {tuple(side.shape)} differs from main {tuple(main.shape)}")
        stacked = torch.stack(list(sides), dim=1).flatten(0, 1)  # [B·V, C, H, W]
        result = self.opam(main.repeat_interleave(views, dim=0), stacked)
        return (result.aligned.unflatten(0, (main.shape[0], views)),
                result.consistency.unflatten(0, (main.shape[0], views)))

    def combine(self, aligned: Tensor, consistency: Tensor) -> Tensor:
        """``[B, V, C, H, W]`` views and ``[B, V, 1, H, W]`` consistencies → ``[B, C, H, W]``."""
        raise NotImplementedError

    def forward(self, main: Tensor, sides: Sequence[Tensor]) -> Tensor:
        if sides:
            side = self.combine(*self.align(main, sides))
        else:
            side = torch.zeros_like(main)
        return main + self.merge(torch.cat([main, side], dim=1))


class ParallaxFusion(_AlignedViewFusion):
    """PMIFM: consistency-weighted views mixed by weights learned from the consistencies.

    The consistency ``C`` of a pass lies between ``1/(H·W)`` (uniform attention: nothing aligned)
    and 1 (a one-to-one match). Each view's aligned feature is weighted by ``C`` relative to its
    largest value in the view, so an untrained (uniform) attention still passes its feature and
    gradient; the per-pixel softmax across views scores each view's ``log C``, which keeps the
    absolute reliability for choosing between views.
    """

    def __init__(self, channels: int, hidden: int = 16):
        super().__init__(channels)
        self.view_score = nn.Sequential(
            nn.Conv2d(1, hidden, 3, padding=1),
            nn.LeakyReLU(0.1),
            nn.Conv2d(hidden, 1, 3, padding=1),
        )

    def view_weights(self, consistency: Tensor) -> Tensor:
        """Per-pixel softmax across views of a learned score of each view's ``log C``.

        ``[B, V, 1, H, W]`` → ``[B, V, 1, H, W]``, summing to 1 over ``V``.
        """
        log_c = consistency.clamp_min(1e-12).log().flatten(0, 1)
        return self.view_score(log_c).unflatten(0, consistency.shape[:2]).softmax(dim=1)

    def combine(self, aligned: Tensor, consistency: Tensor) -> Tensor:
        relative = consistency / consistency.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        return (self.view_weights(consistency) * relative * aligned).sum(dim=1)


class AverageFusion(_AlignedViewFusion):
    """LDMIC-style average pooling of the aligned side views (consistencies ignored)."""

    def combine(self, aligned: Tensor, consistency: Tensor) -> Tensor:
        return aligned.mean(dim=1)


FUSIONS: dict[str, type[_AlignedViewFusion]] = {"pmifm": ParallaxFusion, "average": AverageFusion}
