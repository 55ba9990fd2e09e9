"""Image-quality metrics shared by every evaluation: PSNR and MS-SSIM on 8-bit RGB, bpp from bytes."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: MS-SSIM's five scale weights (Wang et al. 2003; pytorch_msssim's defaults).
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_C1, _C2 = 0.01**2, 0.03**2  # SSIM's constants for a data range of 1


def _check(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"expected two uint8 images of one shape, got {a.dtype}{a.shape} and {b.dtype}{b.shape}")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images (any shape, e.g. (H, W, 3)) with peak 255; inf if equal."""
    _check(a, b)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """MS-SSIM (pytorch_msssim, data range 255) between two (H, W, 3) uint8 images, H, W > 160."""
    from pytorch_msssim import ms_ssim as _ms_ssim

    _check(a, b)
    ta = torch.from_numpy(a).permute(2, 0, 1)[None].double()
    tb = torch.from_numpy(b).permute(2, 0, 1)[None].double()
    return float(_ms_ssim(ta, tb, data_range=255.0))


def gaussian_filter(x: Tensor, size: int = 11, sigma: float = 1.5) -> Tensor:
    """Separable Gaussian filter of every channel, 'valid' borders: [B, C, H, W] → [B, C, H−10, W−10]."""
    r = torch.arange(size, dtype=x.dtype) - size // 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)  # a contiguous weight: 2x faster
    return F.conv2d(x, g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _ssim_maps(x: Tensor, y: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(SSIM map, contrast-structure map, filtered weight) of x, y [B, C, H, W] in [0, 1] and
    weight [B, 1, H, W]: all local statistics in one filtering pass."""
    c = x.shape[1]
    mx, my, xx, yy, xy, w = gaussian_filter(torch.cat([x, y, x * x, y * y, x * y, weight], 1)).split(
        [c] * 5 + [1], dim=1)
    cs = (2 * (xy - mx * my) + _C2) / (xx - mx**2 + yy - my**2 + _C2)
    return cs * (2 * mx * my + _C1) / (mx**2 + my**2 + _C1), cs, w


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Mean SSIM of x, y [B, C, H, W] in [0, 1] (11-pixel Gaussian window, σ = 1.5, valid borders, as
    ``pytorch_msssim.ssim`` with data_range=1); differentiable (a training loss)."""
    return _ssim_maps(x, y, x.new_ones(x.shape[0], 1, *x.shape[2:]))[0].mean()


def ms_ssim_weighted(x: Tensor, y: Tensor, weight: Tensor | None = None) -> Tensor:
    """MS-SSIM of each image pair of x, y [B, C, H, W] in [0, 1] → [B].

    With ``weight`` [B, 1, H, W] (e.g. a region mask) the local values of every scale are averaged
    with the filtered, pooled weights instead of uniformly; ``None`` is ``pytorch_msssim.ms_ssim``
    (data_range=1). NaN where an image's weight vanishes or the sides are ≤ 160 pixels (five scales
    of an 11-pixel window).
    """
    if weight is None:
        weight = x.new_ones(x.shape[0], 1, *x.shape[2:])
    if min(x.shape[-2:]) <= 10 * 2 ** (len(MS_SSIM_WEIGHTS) - 1):
        return x.new_full((x.shape[0],), math.nan)
    factors = []
    for level, power in enumerate(MS_SSIM_WEIGHTS):
        full, cs, w = _ssim_maps(x, y, weight)
        last = level == len(MS_SSIM_WEIGHTS) - 1
        per_channel = ((full if last else cs) * w).sum((2, 3)) / w.sum((2, 3))  # NaN where w vanishes
        factors.append(torch.relu(per_channel) ** power)
        if not last:
            pad = [s % 2 for s in x.shape[-2:]]
            x, y, weight = (F.avg_pool2d(t, 2, padding=pad) for t in (x, y, weight))
    return torch.stack(factors).prod(0).mean(1)


def bpp(num_bytes: int, height: int, width: int) -> float:
    """Bits per pixel of ``num_bytes`` over the original ``height``×``width`` pixels."""
    return 8.0 * num_bytes / (height * width)
