"""Median and mean depth of hand-made Gaussians with closed-form answers, and the PNG helper."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from geometry.depth import render_depths, save_depth_png
from geometry.gaussian_fit import Gaussians

W, H = 40, 30
K = torch.tensor([[[35.0, 0.0, 20.0], [0.0, 35.0, 15.0], [0.0, 0.0, 1.0]]])


def _layers(depths: list[float], opacities: list[float], viewmat: torch.Tensor) -> Gaussians:
    """One huge, flat Gaussian per layer on the camera axis (alpha ~ opacity at the centre pixel)."""
    cam_to_world = torch.inverse(viewmat)
    centres = torch.stack([cam_to_world[:3, :3] @ torch.tensor([0.0, 0.0, d]) + cam_to_world[:3, 3] for d in depths])
    n = len(depths)
    rot = cam_to_world[:3, :3]
    # quaternion of the camera rotation, so the flat axis (z) is the viewing axis
    w = math.sqrt(max(1e-12, 1 + rot[0, 0] + rot[1, 1] + rot[2, 2])) / 2
    q = torch.tensor([w, (rot[2, 1] - rot[1, 2]) / (4 * w), (rot[0, 2] - rot[2, 0]) / (4 * w), (rot[1, 0] - rot[0, 1]) / (4 * w)])
    return Gaussians(
        means=centres, quats=q.repeat(n, 1),
        log_scales=torch.log(torch.tensor([[50.0, 50.0, 1e-3]] * n)),
        logit_opacities=torch.logit(torch.tensor(opacities)),
        sh=torch.zeros(n, 1, 3), sh_degree=0,
    )


def test_two_layers_median_and_mean():
    view = torch.eye(4)
    view[:3, 3] = torch.tensor([0.3, -0.2, 1.0])  # camera not at the origin
    g = _layers([2.0, 5.0], [0.3, 0.9], view)
    median, mean, median_valid, mean_valid = render_depths(g, K, view[None], W, H)
    assert median.shape == (1, H, W) and median_valid.dtype == torch.bool
    c = (0, H // 2, W // 2)
    # T after the first layer is 0.7 >= 0.5, after the second 0.07: the median is the second layer
    assert median_valid[c] and abs(median[c].item() - 5.0) < 1e-4
    expected_mean = (2.0 * 0.3 + 5.0 * 0.7 * 0.9) / (0.3 + 0.7 * 0.9)
    assert mean_valid[c] and abs(mean[c].item() - expected_mean) < 2e-3
    # a single translucent layer never takes T below 0.5: no median depth anywhere, mean invalid too
    thin = _layers([3.0], [0.4], view)
    median, mean, median_valid, mean_valid = render_depths(thin, K, view[None], W, H)
    assert not median_valid.any() and (median == 0).all() and not mean_valid.any()
    _, mean, _, _ = render_depths(thin, K, view[None], W, H, mean_min_alpha=0.1)
    assert abs(mean[c].item() - 3.0) < 1e-4


def test_depth_png_has_colour_bar(tmp_path):
    depth = np.linspace(1.0, 4.0, W * H, dtype=np.float32).reshape(H, W)
    valid = depth < 3.5
    out = tmp_path / "depth.png"
    save_depth_png(out, depth, valid, title="view 0")
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[1] > img.shape[0]  # the colour bar widens the figure
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # a colour map, not a blank image
    assert not list(tmp_path.glob(".*"))  # no temporary left behind
