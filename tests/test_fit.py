"""The CPU 3DGS fit on a synthetic textured plane at a known depth; PLY round trip; divergence."""

from __future__ import annotations

import math

import pytest
import torch

from geometry.depth import render_depths
from geometry.gaussian_fit import FitConfig, FitDiverged, fit_gaussians, render
from geometry.ply import read_ply, write_ply

W, H = 64, 48
PLANE_Z = 4.0


def _texture(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Smooth colour pattern on the plane, [..., 3] in [0.1, 0.9]."""
    return 0.5 + 0.4 * torch.stack([torch.sin(3.1 * x) * torch.cos(2.3 * y), torch.sin(2.0 * x + 1.7 * y),
                                    torch.cos(4.2 * y - 1.1 * x)], dim=-1)


def _plane_scene(n_views: int = 6):
    """Views of the plane z = PLANE_Z from cameras near the origin: images, true depth, K, viewmats."""
    K = torch.tensor([[55.0, 0.0, W / 2], [0.0, 55.0, H / 2], [0.0, 0.0, 1.0]])
    views, images, depths = [], [], []
    for i in range(n_views):
        angle = 2 * math.pi * i / n_views
        centre = torch.tensor([1.2 * math.cos(angle), 0.9 * math.sin(angle), 0.3 * (i % 2)])
        fwd = torch.nn.functional.normalize(torch.tensor([0.0, 0.0, PLANE_Z]) - centre, dim=0)
        right = torch.nn.functional.normalize(torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0]), fwd), dim=0)
        rot = torch.stack([right, torch.linalg.cross(fwd, right), fwd], dim=1)  # camera-to-world rotation
        view = torch.eye(4)
        view[:3, :3] = rot.T
        view[:3, 3] = -rot.T @ centre
        v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
        rays_cam = torch.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], torch.ones_like(u)], -1)
        rays = rays_cam @ rot.T
        t = (PLANE_Z - centre[2]) / rays[..., 2]  # camera z of the hit, since rays_cam has z = 1
        hit = centre + t[..., None] * rays
        images.append(_texture(hit[..., 0], hit[..., 1]))
        depths.append(t)
        views.append(view)
    return images, torch.stack(depths), K.repeat(n_views, 1, 1), torch.stack(views)


@pytest.fixture(scope="module")
def fitted():
    images, depths, Ks, viewmats = _plane_scene()
    gen = torch.Generator().manual_seed(0)
    xy = (torch.rand(1500, 2, generator=gen) - 0.5) * torch.tensor([6.0, 4.5])
    points = torch.cat([xy, torch.full((1500, 1), PLANE_Z)], dim=1) + 0.02 * torch.randn(1500, 3, generator=gen)
    colors = _texture(xy[:, 0], xy[:, 1])
    config = FitConfig(iterations=300, max_side=W, sh_degree=1, sh_degree_interval=150, refine_start=100,
                       refine_every=50, max_gaussians=3000)
    gaussians = fit_gaussians(points, colors, images, Ks, viewmats, config, progress=False)
    return gaussians, images, depths, Ks, viewmats


def test_fit_reproduces_views(fitted):
    gaussians, images, _, Ks, viewmats = fitted
    colors, _, _ = render(gaussians, Ks, viewmats, W, H, render_mode="RGB")
    mse = ((colors.clamp(0, 1) - torch.stack(images)) ** 2).mean()
    psnr = -10 * torch.log10(mse)
    assert psnr > 24.0, f"PSNR {psnr:.1f} dB"
    assert 1500 <= len(gaussians) <= 3000


def test_fit_median_depth_matches_plane(fitted):
    gaussians, _, depths, Ks, viewmats = fitted
    median, mean, median_valid, mean_valid = render_depths(gaussians, Ks, viewmats, W, H)
    border = torch.zeros_like(median_valid)
    border[:, 4:-4, 4:-4] = True  # the plane fills every view; the outermost pixels see few points
    assert median_valid[border].float().mean() > 0.95
    valid = median_valid & border
    absrel = ((median[valid] - depths[valid]).abs() / depths[valid]).mean()
    assert absrel < 0.02, f"median-depth AbsRel {absrel:.4f}"
    valid = mean_valid & border
    assert ((mean[valid] - depths[valid]).abs() / depths[valid]).mean() < 0.03


def test_ply_round_trip(fitted, tmp_path):
    gaussians = fitted[0]
    path = tmp_path / "gaussians.ply"
    write_ply(path, gaussians)
    header = path.read_bytes().split(b"end_header\n")[0].decode()
    names = [line.split()[2] for line in header.splitlines() if line.startswith("property")]
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[-8:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert sum(n.startswith("f_rest_") for n in names) == 9  # degree 1: 3 coefficients x 3 channels
    back = read_ply(path)
    assert back.sh_degree == gaussians.sh_degree
    for field in ("means", "quats", "log_scales", "logit_opacities", "sh"):
        assert torch.equal(getattr(back, field), getattr(gaussians, field)), field
    # channel-major f_rest: f_rest_0..2 are red's three degree-1 coefficients
    assert back.sh[0, 1:, 0].tolist() == gaussians.sh[0, 1:, 0].tolist()
    assert not list(tmp_path.glob(".*"))


def test_divergence_is_reported_with_iteration():
    images, _, Ks, viewmats = _plane_scene(2)
    points = torch.tensor([[0.0, 0.0, PLANE_Z], [0.5, 0.2, PLANE_Z], [-0.4, 0.3, PLANE_Z]])
    config = FitConfig(iterations=50, max_side=W, lr_scales=1e4, sh_degree=0)
    with pytest.raises(FitDiverged, match=r"iteration \d+"):
        fit_gaussians(points, torch.full((3, 3), 0.5), images, Ks, viewmats, config, progress=False)
