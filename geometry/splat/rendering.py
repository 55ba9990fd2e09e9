"""``rasterization``: gsplat's public rendering call, on the CPU through our C++ rasteriser.

CUDA tensors go to ``gsplat.rasterization`` unchanged. CPU tensors run the same pipeline as gsplat
(projection, SH colour, tile intersection, front-to-back compositing) with the same arguments and
the same ``meta`` keys that ``gsplat.strategy.DefaultStrategy`` reads (``means2d`` with its gradient,
``radii``, ``width``, ``height``, ``n_cameras``, and ``gaussian_ids`` when packed). On the CPU,
``meta["median_depths"]`` [C, H, W, 1] also holds the median depth of every pixel (camera z of
the first Gaussian after which the transmittance drops below 0.5; 0 where it never does).

Supported on the CPU: no batch dimensions (means [N, 3], viewmats [C, 4, 4]), the pinhole camera,
``rasterize_mode`` "classic" or "antialiased", render modes "RGB", "D", "ED", "RGB+D", "RGB+ED".
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import Tensor

from geometry.splat.projection import project_gaussians, tile_grid
from geometry.splat.rasterize import intersect_tiles, rasterize_to_pixels

RenderMode = Literal["RGB", "D", "ED", "RGB+D", "RGB+ED"]


def rasterization(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] (w, x, y, z)
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    colors: Tensor,  # [N, D], [C, N, D] or SH [N, K, 3]
    viewmats: Tensor,  # [C, 4, 4] world-to-camera
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: Optional[int] = None,
    packed: bool = True,
    tile_size: int = 16,
    backgrounds: Optional[Tensor] = None,  # [C, D]
    render_mode: RenderMode = "RGB",
    absgrad: bool = False,
    rasterize_mode: Literal["classic", "antialiased"] = "classic",
    **cuda_only: Any,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Render C views of N Gaussians: (colors [C, H, W, D'], alphas [C, H, W, 1], meta).

    Arguments and outputs follow ``gsplat.rasterization``: ``sh_degree=None`` takes ``colors`` as
    final per-Gaussian values, otherwise as SH coefficients (colour = max(SH + 0.5, 0)). Depth
    modes append camera z ("D": accumulated, "ED": divided by alpha). Extra keyword arguments are
    forwarded to gsplat on CUDA and rejected on the CPU.
    """
    if means.is_cuda:
        import gsplat

        return gsplat.rasterization(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height,
            near_plane=near_plane, far_plane=far_plane, radius_clip=radius_clip, eps2d=eps2d,
            sh_degree=sh_degree, packed=packed, tile_size=tile_size, backgrounds=backgrounds,
            render_mode=render_mode, absgrad=absgrad, rasterize_mode=rasterize_mode, **cuda_only,
        )
    if cuda_only:
        raise ValueError(f"not supported by the CPU rasteriser: {sorted(cuda_only)}")
    _check_inputs(means, quats, scales, opacities, viewmats, Ks, render_mode, rasterize_mode)
    n_cams = viewmats.shape[0]

    proj = project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, width, height, eps2d=eps2d, near_plane=near_plane,
        far_plane=far_plane, radius_clip=radius_clip, calc_compensations=rasterize_mode == "antialiased",
        sh_coeffs=colors if sh_degree is not None else None, sh_degree=sh_degree or 0, packed=packed,
    )
    radii, means2d, depths, conics, opac = proj.radii, proj.means2d, proj.depths, proj.conics, proj.opacities
    camera_ids, gaussian_ids = proj.camera_ids, proj.gaussian_ids
    if proj.colors is not None:
        rgb = proj.colors
    elif packed:  # per-Gaussian values [N, D] or per camera [C, N, D]
        rgb = colors[gaussian_ids] if colors.dim() == 2 else colors[camera_ids, gaussian_ids]
    else:
        rgb = colors if colors.dim() == 3 else colors[None].expand(n_cams, -1, -1)
    if packed:
        image_ids = camera_ids
    else:
        image_ids = torch.arange(n_cams).repeat_interleave(means.shape[0])

    if render_mode == "RGB":
        feats = rgb
    elif render_mode in ("D", "ED"):
        feats = depths[..., None]
    else:
        feats = torch.cat([rgb, depths[..., None]], dim=-1)
    if backgrounds is not None and render_mode in ("D", "ED"):
        backgrounds = torch.zeros(n_cams, 1)
    elif backgrounds is not None and render_mode != "RGB":
        backgrounds = torch.cat([backgrounds, torch.zeros(n_cams, 1)], dim=-1)

    tiles_x, tiles_y = tile_grid(width, height, tile_size)
    tile_offsets, flatten_ids = intersect_tiles(
        means2d, radii, depths, image_ids, n_cams, tile_size, tiles_x, tiles_y
    )
    render_colors, render_alphas, median = rasterize_to_pixels(
        means2d, conics, feats, opac, depths, n_cams, width, height, tile_size, tile_offsets, flatten_ids,
        backgrounds=backgrounds, absgrad=absgrad,
    )
    if render_mode in ("ED", "RGB+ED"):
        render_colors = torch.cat(
            [render_colors[..., :-1], render_colors[..., -1:] / render_alphas.clamp_min(1e-10)], dim=-1
        )
    meta = {
        "camera_ids": camera_ids,
        "gaussian_ids": gaussian_ids,
        "radii": radii,
        "means2d": means2d,
        "depths": depths,
        "conics": conics,
        "opacities": opac,
        "tile_width": tiles_x,
        "tile_height": tiles_y,
        "tile_size": tile_size,
        "isect_offsets": tile_offsets,
        "flatten_ids": flatten_ids,
        "width": width,
        "height": height,
        "n_cameras": n_cams,
        "median_depths": median,
    }
    return render_colors, render_alphas, meta


def _check_inputs(
    means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, viewmats: Tensor, Ks: Tensor,
    render_mode: str, rasterize_mode: str,
) -> None:
    n = means.shape[0]
    if means.shape != (n, 3) or quats.shape != (n, 4) or scales.shape != (n, 3) or opacities.shape != (n,):
        raise ValueError(
            "CPU rasterization expects means [N,3], quats [N,4], scales [N,3], opacities [N] (no batch dims); "
            f"got {tuple(means.shape)}, {tuple(quats.shape)}, {tuple(scales.shape)}, {tuple(opacities.shape)}"
        )
    c = viewmats.shape[0]
    if viewmats.shape != (c, 4, 4) or Ks.shape != (c, 3, 3):
        raise ValueError(f"viewmats must be [C,4,4] and Ks [C,3,3]; got {tuple(viewmats.shape)}, {tuple(Ks.shape)}")
    if render_mode not in ("RGB", "D", "ED", "RGB+D", "RGB+ED"):
        raise ValueError(f"unsupported render_mode {render_mode!r}")
    if rasterize_mode not in ("classic", "antialiased"):
        raise ValueError(f"unsupported rasterize_mode {rasterize_mode!r}")
    if means.dtype != torch.float32:
        raise ValueError(f"the CPU rasteriser works in float32, got {means.dtype}")
