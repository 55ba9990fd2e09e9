"""EWA projection of 3-D Gaussians and spherical-harmonics colour (C++ forward and backward).

Same function as gsplat's fused CUDA projection (``ProjectionEWA3DGSFused.cu``, pinhole model)
and its SH kernel: world-to-camera ``viewmats`` (OpenCV: x right, y down, z forward), the Jacobian
at the mean clamped to 1.3x the field of view, a 2-D blur ``eps2d`` (with the antialiasing
compensation on request), opacity-aware radii (``min(3.33, sqrt(2 ln(255 o)))`` standard
deviations), culling outside ``[near_plane, far_plane]``, with non-positive determinant, below the
alpha threshold or off-screen (radii 0, zero outputs, no gradient). Colours are
``max(SH(dir) + 0.5, 0)`` with ``dir`` from the camera centre to the mean, degree <= 3.
Gradients flow to means, quats, scales and SH coefficients (not to cameras).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from geometry.splat._backend import extension


class Projection(NamedTuple):
    """Per (camera, Gaussian) projection results, each [C, N, ...]."""

    radii: Tensor  # [C, N, 2] int32, 0 where culled
    means2d: Tensor  # [C, N, 2] pixels
    depths: Tensor  # [C, N] camera z
    conics: Tensor  # [C, N, 3] inverse 2-D covariance (xx, xy, yy)
    compensations: Optional[Tensor]  # [C, N] or None


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near, far, clip, comp):  # type: ignore[override]
        inputs = [t.detach().float().contiguous() for t in (means, quats, scales, opacities, viewmats, Ks)]
        radii, means2d, depths, conics, comps = extension().project_forward(
            *inputs, width, height, eps2d, near, far, clip, comp
        )
        ctx.save_for_backward(*inputs[:3], *inputs[4:], radii)
        ctx.dims = (width, height, eps2d)
        ctx.mark_non_differentiable(radii)
        return radii, means2d, depths, conics, comps

    @staticmethod
    def backward(ctx, _v_radii, v_means2d, v_depths, v_conics, v_comps):  # type: ignore[override]
        means, quats, scales, viewmats, Ks, radii = ctx.saved_tensors
        width, height, eps2d = ctx.dims
        v_means, v_quats, v_scales = extension().project_backward(
            means, quats, scales, viewmats, Ks, width, height, eps2d, radii,
            v_means2d.contiguous(), v_depths.contiguous(), v_conics.contiguous(), v_comps.contiguous(),
        )
        return v_means, v_quats, v_scales, None, None, None, None, None, None, None, None, None, None


def project_gaussians(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] (w, x, y, z), normalised inside
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N] (only for the opacity-aware radii and culling)
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    calc_compensations: bool = False,
) -> Projection:
    """Project N Gaussians into C pinhole cameras (see the module docstring for the rules)."""
    radii, means2d, depths, conics, comps = _Project.apply(
        means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near_plane, far_plane,
        radius_clip, calc_compensations,
    )
    return Projection(radii, means2d, depths, conics, comps if calc_compensations else None)


class _SphericalHarmonics(torch.autograd.Function):
    @staticmethod
    def forward(ctx, degree, means, coeffs, campos):  # type: ignore[override]
        means, coeffs, campos = (t.detach().float().contiguous() for t in (means, coeffs, campos))
        colors = extension().sh_forward(degree, means, coeffs, campos)
        ctx.save_for_backward(means, coeffs, campos, colors)
        ctx.degree = degree
        return colors

    @staticmethod
    def backward(ctx, v_colors):  # type: ignore[override]
        means, coeffs, campos, colors = ctx.saved_tensors
        v_coeffs, v_means = extension().sh_backward(ctx.degree, means, coeffs, campos, colors, v_colors.contiguous())
        return None, v_means, v_coeffs, None


def sh_to_color(degree: int, means: Tensor, coeffs: Tensor, viewmats: Tensor) -> Tensor:
    """View-dependent colours [C, N, 3] = max(SH(dir) + 0.5, 0), as gsplat's ``rasterization``.

    means [N, 3]; coeffs [N, K, 3] with K >= (degree+1)^2 (extra bands ignored); viewmats [C, 4, 4].
    """
    if not 0 <= degree <= 3:
        raise ValueError(f"sh_degree must be in 0..3 on the CPU, got {degree}")
    if coeffs.dim() != 3 or coeffs.shape[-1] != 3 or coeffs.shape[1] < (degree + 1) ** 2:
        raise ValueError(f"sh_degree {degree} needs coefficients [N, >={(degree + 1) ** 2}, 3], got {tuple(coeffs.shape)}")
    campos = -(viewmats[:, :3, :3].transpose(-1, -2) @ viewmats[:, :3, 3:])[..., 0]  # [C, 3]
    return _SphericalHarmonics.apply(degree, means, coeffs, campos.detach())


def tile_grid(width: int, height: int, tile_size: int) -> tuple[int, int]:
    """Number of tiles (across, down) covering a width x height image."""
    return math.ceil(width / tile_size), math.ceil(height / tile_size)
