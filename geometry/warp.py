"""Disparity, trust masks, backward warping and forward depth splatting between two views.

One batched, vectorised implementation used by the relations stage, the codecs (on decoded
depths) and the alignment comparison. Conventions, fixed for the whole project:

- Cameras: OpenCV/COLMAP. ``T`` [B, 4, 4] world-to-camera (x right, y down, z forward), ``K``
  [B, 3, 3] pinhole intrinsics.
- Pixels: continuous coordinates. The pixel with integer index (u, v) (column u, row v) has its
  centre at (u + 0.5, v + 0.5), as in COLMAP and gsplat; an image of width W and height H covers
  [0, W] × [0, H]. Backward warping therefore calls ``grid_sample(..., align_corners=False)`` with
  normalised coordinates x_n = 2·x/W − 1, y_n = 2·y/H − 1. The nearest pixel to a continuous
  point (x, y) is (floor(x), floor(y)).
- Depth: camera z (not ray length), [B, H, W]. Zero, negative and non-finite values are invalid.
- Disparity: [B, 2, H, W] in pixels (x then y): target pixel p corresponds to reference position
  p + disparity(p).

Trust mask (SPEC "Stage two"): a target pixel is trusted when its depth is valid and its point
(1) projects inside the reference image, (2) lies in front of the reference camera (z_ref > 0) and
(3) is not occluded there: z_ref ≤ D_ref(p_ref)·(1 + τ). D_ref(p_ref) is the bilinear
interpolation of the reference depth over its valid neighbours (weights renormalised); when the
valid neighbours carry less than half of the weight it counts as no depth and the pixel is not
trusted. The test is relative, so it does not depend on the arbitrary SfM scale.

Multi-scale (:func:`downsample_relation`): at factor f the disparity is the mean over each f×f
block of the *trusted* pixels' disparities, divided by f (0 where a block has no trusted pixel);
the mask is the fraction of trusted pixels in the block (area rule, values in [0, 1]). The
output is ceil(H/f) × ceil(W/f), like a chain of stride-2 convolutions with "same" padding; a
partial block at the right/bottom edge averages its in-image pixels only. For whole blocks the
block mean sits at the low-resolution pixel centre (i + 0.5)·f, so the convention is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


def clean_depth(depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a depth map into (depth with invalid entries set to 0, validity).

    Args:
        depth: [B, H, W].

    Returns:
        ([B, H, W] depth, [B, H, W] bool validity).
    """
    valid = torch.isfinite(depth) & (depth > 0)
    return torch.where(valid, depth, torch.zeros_like(depth)), valid


def pixel_centres(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """[H, W, 2] continuous (x, y) coordinates of pixel centres, (u + 0.5, v + 0.5)."""
    y, x = torch.meshgrid(
        torch.arange(height, dtype=like.dtype, device=like.device) + 0.5,
        torch.arange(width, dtype=like.dtype, device=like.device) + 0.5,
        indexing="ij",
    )
    return torch.stack([x, y], dim=-1)


def backproject(depth: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Camera-frame points ``D(p) · K⁻¹ [x, y, 1]ᵀ`` of every pixel centre.

    Args:
        depth: [B, H, W] camera z.
        K: [B, 3, 3].

    Returns:
        [B, H, W, 3].
    """
    _, H, W = depth.shape
    pix = pixel_centres(H, W, depth)
    homog = torch.cat([pix, torch.ones_like(pix[..., :1])], dim=-1)  # [H, W, 3]
    rays = torch.einsum("bij,hwj->bhwi", torch.linalg.inv(K), homog)
    return rays * depth[..., None]


def reproject(
    depth_src: torch.Tensor,
    K_src: torch.Tensor,
    T_src: torch.Tensor,
    K_dst: torch.Tensor,
    T_dst: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each source pixel's point lands in the destination camera.

    ``X_dst = R X_src + t`` with ``[R|t]`` the top of ``T_dst T_src⁻¹``; ``p_dst = (K_dst X_dst)[:2]
    / z_dst``. Where ``z_dst ≤ 0`` the position is meaningless (it is computed with z = 1).

    Args:
        depth_src: [B, H, W] valid (cleaned) source depth.
        K_src, K_dst: [B, 3, 3]. T_src, T_dst: [B, 4, 4] world-to-camera.

    Returns:
        (positions [B, H, W, 2] in destination pixels, z_dst [B, H, W]).
    """
    points = backproject(depth_src, K_src)
    rel = T_dst @ torch.linalg.inv(T_src)
    cam = torch.einsum("bij,bhwj->bhwi", rel[:, :3, :3], points) + rel[:, None, None, :3, 3]
    z = cam[..., 2]
    proj = torch.einsum("bij,bhwj->bhwi", K_dst, cam)
    z_div = torch.where(z > 0, z, torch.ones_like(z))
    return proj[..., :2] / z_div[..., None], z


def sample(image: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``image`` at continuous pixel positions (zeros outside).

    Args:
        image: [B, C, Hs, Ws].
        positions: [B, H, W, 2] (x, y) in ``image``'s pixel coordinates.

    Returns:
        [B, C, H, W].
    """
    Hs, Ws = image.shape[-2:]
    scale = positions.new_tensor([2.0 / Ws, 2.0 / Hs])
    grid = torch.nan_to_num(positions * scale - 1.0, nan=-2.0).clamp(-2.0, 2.0)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def inside(positions: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, H, W] bool: positions [B, H, W, 2] within [0, width] × [0, height]."""
    x, y = positions[..., 0], positions[..., 1]
    return (x >= 0) & (x <= width) & (y >= 0) & (y <= height)


def backward_warp(reference: torch.Tensor, disparity: torch.Tensor) -> torch.Tensor:
    """Warp a reference into the target frame: ``out(p) = reference(p + disparity(p))``.

    Args:
        reference: [B, C, Hr, Wr] image or features.
        disparity: [B, 2, H, W] in pixels of this (target) resolution; the reference may have
            another size only if the disparity was computed for it.

    Returns:
        [B, C, H, W], bilinear, zero where the position falls outside the reference.
    """
    _, _, H, W = disparity.shape
    positions = pixel_centres(H, W, disparity) + disparity.permute(0, 2, 3, 1)
    return sample(reference, positions)


@dataclass(frozen=True)
class Relation:
    """How a target view sees its reference.

    disparity: [B, 2, H, W] pixels; 0 where the target depth is invalid or the point is behind
        the reference camera.
    mask: [B, H, W] bool, the three-criterion trust mask.
    z_ref: [B, H, W] depth of each target pixel's point in the reference camera.
    """

    disparity: torch.Tensor
    mask: torch.Tensor
    z_ref: torch.Tensor


def relate(
    depth_tgt: torch.Tensor,
    K_tgt: torch.Tensor,
    T_tgt: torch.Tensor,
    depth_ref: torch.Tensor,
    K_ref: torch.Tensor,
    T_ref: torch.Tensor,
    tau: float = 0.02,
) -> Relation:
    """Disparity from target to reference and the trust mask (see the module docstring).

    Args:
        depth_tgt: [B, H, W] target depth. depth_ref: [B, Hr, Wr] reference depth.
        K_tgt, K_ref: [B, 3, 3]. T_tgt, T_ref: [B, 4, 4] world-to-camera.
        tau: relative occlusion tolerance (≥ 0).

    Returns:
        :class:`Relation`; the disparity is differentiable with respect to the target depth.
    """
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    d_tgt, v_tgt = clean_depth(depth_tgt)
    d_ref, v_ref = clean_depth(depth_ref)
    Hr, Wr = d_ref.shape[-2:]
    positions, z = reproject(d_tgt, K_tgt, T_tgt, K_ref, T_ref)
    in_front = z > 0
    defined = v_tgt & in_front
    _, H, W = d_tgt.shape
    disparity = torch.where(defined[..., None], positions - pixel_centres(H, W, d_tgt), 0.0)

    with torch.no_grad():
        stacked = torch.stack([d_ref, v_ref.to(d_ref.dtype)], dim=1)  # [B, 2, Hr, Wr]
        sampled = sample(stacked, positions.detach())
        weight = sampled[:, 1]
        ref_depth = sampled[:, 0] / weight.clamp_min(1e-6)
        visible = (weight >= 0.5) & (z.detach() <= ref_depth * (1.0 + tau))
        mask = defined & inside(positions.detach(), Hr, Wr) & visible
    return Relation(disparity=disparity.permute(0, 3, 1, 2), mask=mask, z_ref=z)


def downsample_relation(
    disparity: torch.Tensor, mask: torch.Tensor, factor: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Disparity and mask at 1/factor (rules in the module docstring).

    Args:
        disparity: [B, 2, H, W] pixels. mask: [B, H, W] bool or fraction.
        factor: integer ≥ 1.

    Returns:
        (disparity [B, 2, ceil(H/f), ceil(W/f)] in low-resolution pixels,
         mask fraction [B, 1, ceil(H/f), ceil(W/f)]).
    """
    if factor < 1:
        raise ValueError(f"scale factor must be >= 1, got {factor}")
    weight = mask.to(disparity.dtype)[:, None]
    pool = dict(kernel_size=factor, stride=factor, ceil_mode=True)
    frac = F.avg_pool2d(weight, **pool)
    total = F.avg_pool2d(disparity * weight, **pool)
    mean = torch.where(frac > 0, total / frac.clamp_min(1e-12), 0.0)
    return mean / factor, frac


def multiscale(
    disparity: torch.Tensor, mask: torch.Tensor, factors: Sequence[int] = (1, 2, 4, 8, 16)
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{factor: (disparity, mask fraction)} for every factor, each computed from full resolution."""
    return {f: downsample_relation(disparity, mask, f) for f in factors}


def forward_splat(
    depth_ref: torch.Tensor,
    K_ref: torch.Tensor,
    T_ref: torch.Tensor,
    K_tgt: torch.Tensor,
    T_tgt: torch.Tensor,
    size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-view depth prediction (CVDP): splat a reference depth into the target camera.

    Every valid reference pixel is moved to the target pixel nearest to its projection; where
    several land on one pixel the smallest target z wins (z-buffer via ``scatter_reduce(amin)``);
    pixels nobody lands on get 0. Differentiable with respect to the reference depth through the
    winning z values.

    Args:
        depth_ref: [B, Hr, Wr]. K_ref, K_tgt: [B, 3, 3]. T_ref, T_tgt: [B, 4, 4].
        size: (H, W) of the target.

    Returns:
        (predicted target depth [B, H, W], hit mask [B, H, W] bool).
    """
    H, W = size
    d_ref, v_ref = clean_depth(depth_ref)
    positions, z = reproject(d_ref, K_ref, T_ref, K_tgt, T_tgt)
    B = d_ref.shape[0]
    pix = torch.floor(positions.detach().clamp(-1.0, float(max(H, W)) + 1.0)).long()
    u, v = pix[..., 0], pix[..., 1]
    keep = v_ref & (z > 0) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
    batch = torch.arange(B, device=d_ref.device)[:, None, None].expand_as(u)
    flat = (batch * H * W + v * W + u)[keep]
    buffer = torch.full((B * H * W,), float("inf"), dtype=d_ref.dtype, device=d_ref.device)
    buffer = buffer.scatter_reduce(0, flat, z[keep], reduce="amin", include_self=True)
    hit = torch.isfinite(buffer)
    depth = torch.where(hit, buffer, torch.zeros_like(buffer))
    return depth.view(B, H, W), hit.view(B, H, W)
