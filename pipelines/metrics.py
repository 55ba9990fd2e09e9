"""Image-quality metrics shared by every evaluation: PSNR and MS-SSIM on 8-bit RGB, bpp from bytes."""
from __future__ import annotations

import math

import numpy as np
import torch


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


def bpp(num_bytes: int, height: int, width: int) -> float:
    """Bits per pixel of ``num_bytes`` over the original ``height``×``width`` pixels."""
    return 8.0 * num_bytes / (height * width)
