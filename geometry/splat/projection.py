"""EWA projection of 3-D Gaussians with their opacities and spherical-harmonics colours (C++).

Same function as gsplat's fused CUDA projection (``ProjectionEWA3DGSFused.cu``, pinhole model)
and its SH kernel, in one C++ pass forward and one backward (a single autograd node):
world-to-camera ``viewmats`` (OpenCV: x right, y down, z forward), the Jacobian at the mean
clamped to 1.3x the field of view, a 2-D blur ``eps2d`` (with the antialiasing compensation on
request, folded into the per-entry opacity), opacity-aware radii (``min(3.33, sqrt(2 ln(255 o)))``
standard deviations), culling outside ``[near_plane, far_plane]``, with non-positive determinant,
below the alpha threshold or off-screen. Colours are ``max(SH(dir) + 0.5, 0)`` with ``dir`` from
the camera centre to the mean, degree <= 3. Gradients flow to means, quats, scales, opacities and
SH coefficients (not to cameras).

Dense results have shape [C, N, ...] (culled entries: radii 0, zero outputs, no gradient); packed
results keep only the visible (camera, Gaussian) pairs, camera-major, with their ids.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from geometry.splat._backend import extension


class Projection(NamedTuple):
    """Per-entry projection results: [C, N, ...] dense or [nnz, ...] packed."""

    radii: Tensor  # [..., 2] int32, 0 where culled
    means2d: Tensor  # [..., 2] pixels
    depths: Tensor  # [...] camera z
    conics: Tensor  # [..., 3] inverse 2-D covariance (xx, xy, yy)
    opacities: Tensor  # [...] opacity times the compensation when antialiased
    colors: Optional[Tensor]  # [..., 3] SH colours, or None without SH coefficients
    compensations: Optional[Tensor]  # [...] or None
    camera_ids: Optional[Tensor]  # [nnz] int64 when packed
    gaussian_ids: Optional[Tensor]  # [nnz] int64 when packed


_NO_SH = torch.empty(0)


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, quats, scales, opacities, coeffs, viewmats, Ks, sh_degree, width, height,  # type: ignore[override]
                eps2d, near, far, clip, comp, packed):
        inputs = [t.detach().float().contiguous() for t in (means, quats, scales, opacities, coeffs, viewmats, Ks)]
        radii, means2d, depths, conics, opac, colors, comps, entry_of, camera_ids, gaussian_ids = (
            extension().project_forward(*inputs, sh_degree, width, height, eps2d, near, far, clip, comp, packed)
        )
        ctx.save_for_backward(*inputs, entry_of, comps, colors)
        ctx.dims = (sh_degree, width, height, eps2d)
        ctx.mark_non_differentiable(radii, comps, camera_ids, gaussian_ids)
        return radii, means2d, depths, conics, opac, colors, comps, camera_ids, gaussian_ids

    @staticmethod
    def backward(ctx, _v_radii, v_means2d, v_depths, v_conics, v_opac, v_colors, *_ids):  # type: ignore[override]
        *inputs, entry_of, comps, colors = ctx.saved_tensors
        v_means, v_quats, v_scales, v_opacities, v_coeffs = extension().project_backward(
            *inputs, *ctx.dims, entry_of, comps, colors,
            v_means2d.contiguous(), v_depths.contiguous(), v_conics.contiguous(), v_opac.contiguous(),
            v_colors.contiguous(),
        )
        return (v_means, v_quats, v_scales, v_opacities, v_coeffs if ctx.dims[0] >= 0 else None,
                None, None, None, None, None, None, None, None, None, None, None)


def project_gaussians(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] (w, x, y, z), normalised inside
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    calc_compensations: bool = False,
    sh_coeffs: Optional[Tensor] = None,  # [N, K, 3]
    sh_degree: int = 3,
    packed: bool = False,
) -> Projection:
    """Project N Gaussians into C pinhole cameras; with ``sh_coeffs`` also their colours.

    ``sh_coeffs`` [N, K, 3] needs K >= (sh_degree + 1)^2 (extra bands are ignored).
    """
    degree = -1
    coeffs = _NO_SH
    if sh_coeffs is not None:
        if not 0 <= sh_degree <= 3:
            raise ValueError(f"sh_degree must be in 0..3 on the CPU, got {sh_degree}")
        if sh_coeffs.dim() != 3 or sh_coeffs.shape[-1] != 3 or sh_coeffs.shape[1] < (sh_degree + 1) ** 2:
            raise ValueError(
                f"sh_degree {sh_degree} needs coefficients [N, >={(sh_degree + 1) ** 2}, 3], got {tuple(sh_coeffs.shape)}"
            )
        degree, coeffs = sh_degree, sh_coeffs
    radii, means2d, depths, conics, opac, colors, comps, camera_ids, gaussian_ids = _Project.apply(
        means, quats, scales, opacities, coeffs, viewmats, Ks, degree, width, height, eps2d, near_plane,
        far_plane, radius_clip, calc_compensations, packed,
    )
    return Projection(
        radii, means2d, depths, conics, opac, colors if degree >= 0 else None,
        comps if calc_compensations else None, camera_ids if packed else None, gaussian_ids if packed else None,
    )


def tile_grid(width: int, height: int, tile_size: int) -> tuple[int, int]:
    """Number of tiles (across, down) covering a width x height image."""
    return math.ceil(width / tile_size), math.ceil(height / tile_size)
