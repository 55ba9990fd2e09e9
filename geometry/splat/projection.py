"""EWA projection of 3-D Gaussians and spherical-harmonics colour, vectorised PyTorch.

Same function as gsplat's fused CUDA projection (``ProjectionEWA3DGSFused.cu``, pinhole model):
world-to-camera ``viewmats`` (OpenCV: x right, y down, z forward), the Jacobian evaluated at the
mean clamped to 1.3x the field of view, a 2-D blur ``eps2d`` added to the covariance, opacity-aware
radii (``min(3.33, sqrt(2 ln(255 o)))`` standard deviations), and culling of Gaussians outside
``(near_plane, far_plane)``, with non-positive determinant, below the alpha threshold or off-screen.
Autograd differentiates it; culled entries use finite stand-in values so no NaN reaches a gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

ALPHA_THRESHOLD = 1.0 / 255.0


class Projection(NamedTuple):
    """Per (camera, Gaussian) projection results, each [C, N, ...]."""

    radii: Tensor  # [C, N, 2] int32, 0 where culled
    means2d: Tensor  # [C, N, 2] pixels
    depths: Tensor  # [C, N] camera z
    conics: Tensor  # [C, N, 3] inverse 2-D covariance (xx, xy, yy)
    compensations: Optional[Tensor]  # [C, N] or None


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices [N, 3, 3] from (w, x, y, z) quaternions [N, 4] (normalised here)."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rows = (
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    )
    return torch.stack(rows, dim=-1).reshape(quats.shape[:-1] + (3, 3))


def covariances(quats: Tensor, scales: Tensor) -> Tensor:
    """3-D covariances R S S^T R^T [N, 3, 3] from quaternions [N, 4] and scales [N, 3]."""
    m = quat_to_rotmat(quats) * scales[..., None, :]
    return m @ m.transpose(-1, -2)


def project_gaussians(
    means: Tensor,  # [N, 3]
    covars: Tensor,  # [N, 3, 3]
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
) -> Projection:
    """Project N Gaussians into C pinhole cameras (see the module docstring for the rules)."""
    rot = viewmats[:, None, :3, :3]  # [C, 1, 3, 3]
    means_c = (rot @ means[None, :, :, None])[..., 0] + viewmats[:, None, :3, 3]  # [C, N, 3]
    covars_c = rot @ covars[None] @ rot.transpose(-1, -2)  # [C, N, 3, 3]
    x, y, z = means_c.unbind(-1)
    in_range = (z >= near_plane) & (z <= far_plane)
    z = torch.where(in_range, z, torch.ones_like(z))

    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    rz = 1.0 / z
    tx = z * torch.minimum(torch.maximum(x * rz, -(cx / fx + 0.3 * tan_x)), (width - cx) / fx + 0.3 * tan_x)
    ty = z * torch.minimum(torch.maximum(y * rz, -(cy / fy + 0.3 * tan_y)), (height - cy) / fy + 0.3 * tan_y)
    zero = torch.zeros_like(z)
    jac = torch.stack(
        [fx * rz, zero, -fx * tx * rz * rz, zero, fy * rz, -fy * ty * rz * rz], dim=-1
    ).reshape(z.shape + (2, 3))
    cov2d = jac @ covars_c @ jac.transpose(-1, -2)  # [C, N, 2, 2]
    means2d = torch.stack([fx * x * rz + cx, fy * y * rz + cy], dim=-1)

    a, b, c = cov2d[..., 0, 0], 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0]), cov2d[..., 1, 1]
    det_orig = a * c - b * b
    a, c = a + eps2d, c + eps2d
    det = a * c - b * b
    valid = in_range & (det > 0)
    det_safe = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], dim=-1)
    compensations = None
    if calc_compensations:
        compensations = torch.sqrt(torch.clamp(det_orig / det_safe, min=0.0))

    with torch.no_grad():
        opac = opacities[None].expand_as(z)
        if compensations is not None:
            opac = opac * compensations
        visible = valid & (opac >= ALPHA_THRESHOLD)
        extent = torch.sqrt(2.0 * torch.log(opac.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD)).clamp_max(3.33)
        rx = torch.ceil(extent * torch.sqrt(a.clamp_min(0)))
        ry = torch.ceil(extent * torch.sqrt(c.clamp_min(0)))
        visible &= ~((rx <= radius_clip) & (ry <= radius_clip))
        mx, my = means2d[..., 0], means2d[..., 1]
        visible &= (mx + rx > 0) & (mx - rx < width) & (my + ry > 0) & (my - ry < height)
        radii = torch.stack([rx, ry], dim=-1) * visible[..., None]
    return Projection(radii.int(), means2d, means_c[..., 2], conics, compensations)


_SH_C0 = 0.28209479177387814
_SH_C1 = 0.4886025119029199
_SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_SH_C3 = (
    -0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
    -0.4570457994644658, 1.445305721320277, -0.5900435899266435,
)


def sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """Real SH basis [..., (degree+1)^2] at unit directions [..., 3] (3DGS / gsplat ordering)."""
    if not 0 <= degree <= 3:
        raise ValueError(f"sh_degree must be in 0..3, got {degree}")
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, _SH_C0)]
    if degree >= 1:
        out += [-_SH_C1 * y, _SH_C1 * z, -_SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            _SH_C2[0] * x * y, _SH_C2[1] * y * z, _SH_C2[2] * (2 * zz - xx - yy),
            _SH_C2[3] * x * z, _SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            _SH_C3[0] * y * (3 * xx - yy), _SH_C3[1] * x * y * z, _SH_C3[2] * y * (4 * zz - xx - yy),
            _SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy), _SH_C3[4] * x * (4 * zz - xx - yy),
            _SH_C3[5] * z * (xx - yy), _SH_C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(out, dim=-1)


def sh_to_color(degree: int, means: Tensor, coeffs: Tensor, viewmats: Tensor) -> Tensor:
    """View-dependent colours [C, N, 3] = max(SH(dir) + 0.5, 0), as gsplat's ``rasterization``.

    means [N, 3]; coeffs [N, K, 3] with K >= (degree+1)^2 (extra bands ignored); viewmats [C, 4, 4].
    """
    n_bases = (degree + 1) ** 2
    if coeffs.shape[-2] < n_bases:
        raise ValueError(f"sh_degree {degree} needs {n_bases} coefficients, got {coeffs.shape[-2]}")
    campos = -viewmats[:, :3, :3].transpose(-1, -2) @ viewmats[:, :3, 3:]  # [C, 3, 1]
    dirs = F.normalize(means[None] - campos[..., 0][:, None], dim=-1)  # [C, N, 3]
    basis = sh_basis(degree, dirs)  # [C, N, K']
    rgb = torch.einsum("cnk,nkd->cnd", basis, coeffs[:, :n_bases])
    return torch.clamp_min(rgb + 0.5, 0.0)


def tile_grid(width: int, height: int, tile_size: int) -> tuple[int, int]:
    """Number of tiles (across, down) covering a width x height image."""
    return math.ceil(width / tile_size), math.ceil(height / tile_size)
