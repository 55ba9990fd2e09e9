"""Tile intersection and rasterisation of projected Gaussians on the CPU (C++ extension).

The autograd function wraps the extension's forward and hand-written backward; gradients reach
the 2-D means, conics, colours and opacities (and backgrounds), from which PyTorch autograd carries
them through the projection. With ``absgrad`` the backward also stores the per-pixel summed
absolute 2-D mean gradients in ``means2d.absgrad`` (as gsplat does, for ``DefaultStrategy``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from geometry.splat._backend import extension


@torch.no_grad()
def intersect_tiles(
    means2d: Tensor,  # [M, 2]
    radii: Tensor,  # [M, 2] int32
    depths: Tensor,  # [M]
    image_ids: Tensor,  # [M] int
    n_images: int,
    tile_size: int,
    tiles_x: int,
    tiles_y: int,
) -> tuple[Tensor, Tensor]:
    """Depth-sorted per-tile lists: (tile_offsets [n_images*tiles_y*tiles_x + 1], flatten_ids).

    Entry ``flatten_ids[tile_offsets[t]:tile_offsets[t+1]]`` lists, front to back, the entries whose
    radius box touches tile t (t = (image * tiles_y + ty) * tiles_x + tx).
    """
    offsets, ids = extension().intersect_tiles(
        means2d.detach().float().contiguous(),
        radii.int().contiguous(),
        depths.detach().float().contiguous(),
        image_ids.int().contiguous(),
        n_images, tile_size, tiles_x, tiles_y,
    )
    return offsets, ids


def _contiguous(*tensors: Tensor) -> list[Tensor]:
    return [t.detach().contiguous() for t in tensors]


class _RasterizeToPixels(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        means2d: Tensor,  # [..., 2] (M entries)
        conics: Tensor,  # [..., 3]
        colors: Tensor,  # [..., D]
        opacities: Tensor,  # [...]
        depths: Tensor,  # [...]
        backgrounds: Tensor,  # [I, D] or empty
        n_images: int,
        width: int,
        height: int,
        tile_size: int,
        tile_offsets: Tensor,
        flatten_ids: Tensor,
        absgrad: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        colors_c, alphas, median, last_ids = extension().rasterize_forward(
            *_contiguous(means2d, conics, colors, opacities, depths, backgrounds),
            n_images, width, height, tile_size, tile_offsets, flatten_ids,
        )
        ctx.save_for_backward(means2d, conics, colors, opacities, backgrounds, tile_offsets, flatten_ids,
                              alphas, last_ids)
        ctx.dims = (n_images, width, height, tile_size)
        ctx.absgrad = absgrad
        ctx.mark_non_differentiable(median)
        return colors_c, alphas, median

    @staticmethod
    def backward(ctx, v_colors_c: Tensor, v_alphas: Tensor, v_median: Tensor):  # type: ignore[override]
        means2d, conics, colors, opacities, backgrounds, tile_offsets, flatten_ids, alphas, last_ids = (
            ctx.saved_tensors
        )
        n_images, width, height, tile_size = ctx.dims
        v_means2d, v_conics, v_colors, v_opacities, v_abs = extension().rasterize_backward(
            *_contiguous(means2d, conics, colors, opacities, backgrounds),
            n_images, width, height, tile_size, tile_offsets, flatten_ids, alphas, last_ids,
            *_contiguous(v_colors_c, v_alphas), ctx.absgrad,
        )
        if ctx.absgrad:
            means2d.absgrad = v_abs.reshape(means2d.shape)
        v_backgrounds = None
        if ctx.needs_input_grad[5]:
            v_backgrounds = (v_colors_c * (1.0 - alphas)).sum(dim=(1, 2))
        return (
            v_means2d.reshape(means2d.shape), v_conics.reshape(conics.shape), v_colors.reshape(colors.shape),
            v_opacities.reshape(opacities.shape), None, v_backgrounds,
            None, None, None, None, None, None, None,
        )


def rasterize_to_pixels(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    depths: Tensor,
    n_images: int,
    width: int,
    height: int,
    tile_size: int,
    tile_offsets: Tensor,
    flatten_ids: Tensor,
    backgrounds: Optional[Tensor] = None,
    absgrad: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Composite entries front to back per pixel.

    Entries (M of them, any leading shape) hold 2-D means [..., 2], conics [..., 3], colours
    [..., D], opacities [...] and camera depths [...]; ``tile_offsets``/``flatten_ids`` come from
    :func:`intersect_tiles`. Returns colours [I, H, W, D] (plus T * background), alphas
    [I, H, W, 1] and median depth [I, H, W, 1] (0 where the transmittance never drops below 0.5).
    """
    if backgrounds is None:
        backgrounds = torch.empty(0, dtype=colors.dtype)
    return _RasterizeToPixels.apply(
        means2d, conics, colors, opacities, depths.detach(), backgrounds, n_images, width, height,
        tile_size, tile_offsets, flatten_ids, absgrad,
    )
