"""Reusable building blocks of the learned codecs (stages, gain units, entropy-parameter heads).

Every codec in lmvic composes these: the single-view codec chains them directly; the joint codec
inserts cross-view modules between the stages. Shapes are ``(B, C, H, W)``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import lmvic  # noqa: F401  (torchvision shim before compressai)
from compressai.layers import GDN


def conv(in_ch: int, out_ch: int, kernel: int = 5, stride: int = 2) -> nn.Conv2d:
    """``kernel``×``kernel`` convolution with 'same' padding; ``stride`` divides H and W."""
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2)


def deconv(in_ch: int, out_ch: int, kernel: int = 5, stride: int = 2) -> nn.ConvTranspose2d:
    """Transposed convolution multiplying H and W by ``stride`` exactly."""
    return nn.ConvTranspose2d(
        in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, output_padding=stride - 1
    )


class AnalysisStage(nn.Sequential):
    """One stride-2 analysis step: 5×5 conv (H, W → H/2, W/2) followed by GDN unless ``last``."""

    def __init__(self, in_ch: int, out_ch: int, last: bool = False):
        layers: list[nn.Module] = [conv(in_ch, out_ch)]
        if not last:
            layers.append(GDN(out_ch))
        super().__init__(*layers)


class SynthesisStage(nn.Sequential):
    """One stride-2 synthesis step: 5×5 transposed conv (×2) followed by inverse GDN unless ``last``."""

    def __init__(self, in_ch: int, out_ch: int, last: bool = False):
        layers: list[nn.Module] = [deconv(in_ch, out_ch)]
        if not last:
            layers.append(GDN(out_ch, inverse=True))
        super().__init__(*layers)


def stage_widths(in_ch: int, hidden: int, out_ch: int, stages: int = 4) -> list[tuple[int, int]]:
    """(in, out) channels of ``stages`` chained stages: in → hidden → … → hidden → out."""
    widths = [in_ch] + [hidden] * (stages - 1) + [out_ch]
    return list(zip(widths[:-1], widths[1:]))


def level_values(table: Tensor, level: Tensor) -> Tensor:
    """Rows of ``table`` (L, C), one per quality level, at the float levels ``level`` (B,) in [0, L-1]
    → (B, C), interpolated linearly between the two nearest levels."""
    level = level.to(table.dtype).clamp(0, table.shape[0] - 1)
    low = level.floor().long().clamp(max=table.shape[0] - 2)
    frac = (level - low.to(level.dtype))[:, None]
    return (1 - frac) * table[low] + frac * table[low + 1]


class GainUnit(nn.Module):
    """Per-channel gain vectors, one per quality level, interpolated between levels.

    Variable-rate coding after Cui et al., "Asymmetric Gained Deep Image Compression with
    Continuous Rate Adaptation" (CVPR 2021). ``level`` is a float in [0, L-1] per sample; a
    fractional level interpolates log-gains linearly (geometric interpolation of the gains).
    Gains are stored as logarithms so they stay positive.
    """

    def __init__(self, init_log_gains: Tensor, channels: int):
        super().__init__()
        if init_log_gains.ndim != 1 or init_log_gains.numel() < 2:
            raise ValueError("GainUnit needs a 1-D tensor of at least two initial log-gains")
        self.log_gain = nn.Parameter(init_log_gains[:, None].repeat(1, channels).clone())

    @property
    def num_levels(self) -> int:
        return self.log_gain.shape[0]

    def gains(self, level: Tensor) -> Tensor:
        """level (B,) float in [0, L-1] → gains (B, C, 1, 1)."""
        return level_values(self.log_gain, level).exp()[:, :, None, None]

    def forward(self, x: Tensor, level: Tensor) -> Tensor:
        """x (B, C, H, W) times the gains of ``level`` (B,)."""
        return x * self.gains(level).to(x.dtype)


class EntropyParameters(nn.Module):
    """1×1 convolutions mapping hyper-decoder features (+ optional context) to Gaussian (scale, mean).

    ``hyper`` is (B, hyper_ch, h, w); ``context`` (B, context_ch, h, w) or None when
    ``context_ch == 0``. Returns ``scales, means``, each (B, M, h, w).
    """

    def __init__(self, hyper_ch: int, M: int, context_ch: int = 0):
        super().__init__()
        self.context_ch = context_ch
        in_ch = hyper_ch + context_ch
        self.net = nn.Sequential(
            nn.Conv2d(in_ch, 2 * M, 1),
            nn.LeakyReLU(inplace=True),
            nn.Conv2d(2 * M, 2 * M, 1),
            nn.LeakyReLU(inplace=True),
            nn.Conv2d(2 * M, 2 * M, 1),
        )

    def forward(self, hyper: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if (context is None) != (self.context_ch == 0):
            raise ValueError(f"EntropyParameters expects {self.context_ch} context channels")
        inputs = hyper if context is None else torch.cat([hyper, context], dim=1)
        scales, means = self.net(inputs).chunk(2, dim=1)
        return scales, means


def ste_round(x: Tensor) -> Tensor:
    """Round with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()
