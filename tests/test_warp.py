"""geometry.warp against closed-form cases and an analytic ray-cast scene."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from geometry.warp import (
    backward_warp,
    downsample_relation,
    forward_splat,
    multiscale,
    relate,
    sample,
)

W, H, FOCAL = 128, 96, 110.0


def intrinsics(f: float = FOCAL, w: int = W, h: int = H) -> np.ndarray:
    return np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1.0]])


def pose(rot_y_deg: float, centre) -> np.ndarray:
    """World-to-camera 4×4 for a camera at ``centre`` turned by ``rot_y_deg`` about the y axis."""
    a = math.radians(rot_y_deg)
    R_c2w = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    T = np.eye(4)
    T[:3, :3] = R_c2w.T
    T[:3, 3] = -R_c2w.T @ np.asarray(centre, float)
    return T


class Scene:
    """A tilted plane behind a sphere, ray cast in float64 with NumPy (independent of the code)."""

    plane_n = np.array([0.15, -0.05, 1.0]) / np.linalg.norm([0.15, -0.05, 1.0])
    plane_c = 5.0
    sphere_c = np.array([0.2, 0.1, 3.0])
    sphere_r = 0.6

    def first_hit(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Smallest positive ray parameter t of origin + t·dir (inf when nothing is hit)."""
        denom = dirs @ self.plane_n
        t_plane = (self.plane_c - origins @ self.plane_n) / np.where(denom == 0, np.nan, denom)
        t_plane = np.where(t_plane > 0, t_plane, np.inf)
        oc = origins - self.sphere_c
        a = np.sum(dirs * dirs, -1)
        b = 2 * np.sum(oc * dirs, -1)
        c = np.sum(oc * oc, -1) - self.sphere_r**2
        disc = b * b - 4 * a * c
        t_sph = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
        t_sph = np.where((disc >= 0) & (t_sph > 0), t_sph, np.inf)
        return np.nan_to_num(np.minimum(t_plane, t_sph), nan=np.inf)

    def render(self, K: np.ndarray, T: np.ndarray, w: int = W, h: int = H):
        """(depth [h, w] camera z, world points [h, w, 3]) of the pixel centres."""
        R, t = T[:3, :3], T[:3, 3]
        centre = -R.T @ t
        u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
        cam_dirs = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K).T  # z component 1
        dirs = cam_dirs @ R  # rows: Rᵀ d
        t_hit = self.first_hit(np.broadcast_to(centre, dirs.shape), dirs)
        return t_hit, centre + t_hit[..., None] * dirs  # t is camera z since d_cam.z = 1

    def visible_from(self, points: np.ndarray, K: np.ndarray, T: np.ndarray, w=W, h=H):
        """GT trust: in front of the camera, inside its image, and nothing hit before the point."""
        R, t = T[:3, :3], T[:3, 3]
        centre = -R.T @ t
        cam = points @ R.T + t
        proj = cam @ K.T
        x, y = proj[..., 0] / cam[..., 2], proj[..., 1] / cam[..., 2]
        dirs = points - centre
        t_hit = self.first_hit(np.broadcast_to(centre, dirs.shape), dirs)  # point is at t = 1
        return (cam[..., 2] > 0) & (x >= 0) & (x <= w) & (y >= 0) & (y <= h) & (t_hit > 1 - 1e-6), (x, y)


def batch(*arrays):
    return [torch.as_tensor(np.asarray(a), dtype=torch.float32)[None] for a in arrays]


K_NP = intrinsics()
T_TGT = pose(0.0, [0, 0, 0])
T_REF = pose(-12.0, [1.5, 0.2, 0.1])


@pytest.fixture(scope="module")
def scene_views():
    scene = Scene()
    depth_t, points_t = scene.render(K_NP, T_TGT)
    depth_r, _ = scene.render(K_NP, T_REF)
    return scene, depth_t, points_t, depth_r


def test_disparity_and_mask_match_ray_cast_ground_truth(scene_views):
    scene, depth_t, points_t, depth_r = scene_views
    gt_mask, (gx, gy) = scene.visible_from(points_t, K_NP, T_REF)
    u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    gt_disp = np.stack([gx - u, gy - v])

    dt, dr, K, Tt, Tr = batch(depth_t, depth_r, K_NP, T_TGT, T_REF)
    rel = relate(dt, K, Tt, dr, K, Tr, tau=0.02)

    epe = np.linalg.norm(rel.disparity[0].numpy() - gt_disp, axis=0)
    assert epe[gt_mask].mean() < 0.05 and epe.max() < 0.05
    mask = rel.mask[0].numpy()
    iou = (mask & gt_mask).sum() / (mask | gt_mask).sum()
    in_frame = (gx >= 0) & (gx <= W) & (gy >= 0) & (gy <= H)
    assert (in_frame & ~gt_mask).mean() > 0.1 and (~in_frame).mean() > 0.03  # occluded, out of frame
    assert iou >= 0.95, iou
    assert not mask[~in_frame].any()


def test_mask_is_scale_invariant(scene_views):
    _, depth_t, _, depth_r = scene_views
    dt, dr, K, Tt, Tr = batch(depth_t, depth_r, K_NP, T_TGT, T_REF)
    base = relate(dt, K, Tt, dr, K, Tr)
    s = 37.5
    scale = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    Tt_s, Tr_s = Tt.clone(), Tr.clone()
    Tt_s[:, :3, 3] *= s
    Tr_s[:, :3, 3] *= s
    scaled = relate(dt * s, K, Tt_s @ scale, dr * s, K, Tr_s @ scale)
    assert torch.equal(base.mask, scaled.mask)
    assert torch.allclose(base.disparity, scaled.disparity, atol=1e-3)


def test_frontal_plane_translation_is_closed_form_shift():
    Z, b = 4.0, 0.3
    shift = FOCAL * b / Z  # reference camera at +b sees the point f·b/Z pixels to the left
    depth = torch.full((1, H, W), Z)
    K = torch.as_tensor(K_NP, dtype=torch.float32)[None]
    Tt = torch.eye(4)[None]
    Tr = torch.as_tensor(pose(0.0, [b, 0, 0]), dtype=torch.float32)[None]
    rel = relate(depth, K, Tt, depth, K, Tr)
    assert torch.allclose(rel.disparity[:, 0], torch.full((1, H, W), -shift), atol=1e-4)
    assert torch.allclose(rel.disparity[:, 1], torch.zeros(1, H, W), atol=1e-4)
    # Mask: trusted exactly where x − shift ≥ 0, i.e. column centres u + 0.5 ≥ shift.
    cols = torch.arange(W) + 0.5
    assert torch.equal(rel.mask[0], (cols >= shift).expand(H, W))
    # Warping a reference that is linear in x: bilinear interpolation is exact, so the warped
    # image is the same linear function at x − shift (this pins the pixel-centre convention).
    ref = (0.01 * cols).expand(1, 1, H, W).contiguous()
    warped = backward_warp(ref, rel.disparity)[0, 0]
    expected = 0.01 * (cols - shift)
    inner = cols >= shift + 1.0
    assert torch.allclose(warped[:, inner], expected[inner].expand(H, -1), atol=1e-5)


def test_pixel_centre_convention():
    img = torch.rand(1, 3, 7, 9)
    assert torch.allclose(backward_warp(img, torch.zeros(1, 2, 7, 9)), img, atol=1e-6)
    one = torch.zeros(1, 2, 7, 9)
    one[:, 0] = 1.0  # sample one pixel to the right
    assert torch.allclose(backward_warp(img, one)[..., :-1], img[..., 1:], atol=1e-6)
    # The centre of pixel (u=2, v=3) is (2.5, 3.5); (2.0, 3.5) is halfway between u=1 and u=2.
    pos = torch.tensor([[[[2.5, 3.5], [2.0, 3.5]]]])
    out = sample(img, pos)[0, :, 0]
    assert torch.allclose(out[:, 0], img[0, :, 3, 2], atol=1e-6)
    assert torch.allclose(out[:, 1], 0.5 * (img[0, :, 3, 1] + img[0, :, 3, 2]), atol=1e-6)


def test_multiscale_divides_by_factor_and_keeps_pixel_centres():
    # A disparity field linear in x: its block mean is its value at the block centre, which is the
    # low-res pixel centre (i + 0.5)·f for whole blocks.
    Hf, Wf = 40, 56
    x = torch.arange(Wf) + 0.5
    disp = torch.zeros(1, 2, Hf, Wf)
    disp[:, 0] = 0.1 * x + 2.0
    disp[:, 1] = -3.0
    mask = torch.ones(1, Hf, Wf, dtype=torch.bool)
    mask[:, :, :5] = False  # 5 untrusted columns
    scales = multiscale(disp, mask, (1, 2, 4, 8, 16))
    for f, (d, m) in scales.items():
        assert d.shape[-2:] == (math.ceil(Hf / f), math.ceil(Wf / f))
        i = torch.arange(d.shape[-1])
        X = (i * f + torch.clamp((i + 1) * f, max=Wf)) / 2  # block centres (last may be partial)
        full = m[0, 0, 0] == 1
        assert torch.allclose(d[0, 0, 0, full], (0.1 * X[full] + 2.0) / f, atol=1e-5)
        assert torch.allclose(d[0, 1, 0, full], torch.full_like(X[full], -3.0 / f))
    _, m4 = scales[4]
    assert torch.allclose(m4[0, 0, 0, :2], torch.tensor([0.0, 0.75]))
    _, m16 = scales[16]
    assert m16.shape[-2:] == (3, 4) and torch.isclose(m16[0, 0, 2, 3], torch.tensor(1.0))
    with pytest.raises(ValueError):
        downsample_relation(disp, mask, 0)


def test_multiscale_warp_agrees_with_full_resolution(scene_views):
    _, depth_t, _, depth_r = scene_views
    dt, dr, K, Tt, Tr = batch(depth_t, depth_r, K_NP, T_TGT, T_REF)
    rel = relate(dt, K, Tt, dr, K, Tr)
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    ref = torch.stack([0.01 * xx, 0.02 * yy])[None]  # smooth reference, linear in pixels
    full = backward_warp(ref, rel.disparity)
    d4, m4 = downsample_relation(rel.disparity, rel.mask, 4)
    low = backward_warp(torch.nn.functional.avg_pool2d(ref, 4), d4)
    full_low = torch.nn.functional.avg_pool2d(full * rel.mask[:, None], 4) / m4.clamp_min(1e-6)
    # Compare away from the reference border, where zero padding fades the low-res samples.
    centres = (torch.arange(W // 4) + 0.5)[None, :], (torch.arange(H // 4) + 0.5)[:, None]
    px, py = centres[0] + d4[:, 0], centres[1] + d4[:, 1]
    interior = (px > 1) & (px < W / 4 - 1) & (py > 1) & (py < H / 4 - 1)
    sel = ((m4[:, 0] == 1) & interior)[:, None].expand_as(low)
    assert sel.sum() > 200
    assert (low[sel] - full_low[sel]).abs().max() < 0.02


def test_forward_splat_matches_ray_cast_and_keeps_nearest(scene_views):
    scene, depth_t, _, depth_r = scene_views
    dt, dr, K, Tt, Tr = batch(depth_t, depth_r, K_NP, T_TGT, T_REF)
    pred, hit = forward_splat(dr, K, Tr, K, Tt, (H, W))
    pred, hit = pred[0].numpy(), hit[0].numpy()
    assert hit.mean() > 0.5
    assert np.all(pred[~hit] == 0)
    rel_err = np.abs(pred[hit] - depth_t[hit]) / depth_t[hit]
    # Splatting rounds to the nearest pixel: the sphere's silhouette can bleed by a pixel.
    assert np.median(rel_err) < 0.01 and np.mean(rel_err < 0.05) > 0.97
    # Z-buffer: two reference pixels of a 1×2 depth land on one target pixel; the nearer wins.
    K1 = torch.tensor([[[1.0, 0, 1.0], [0, 1.0, 0.5], [0, 0, 1]]])
    depth2 = torch.tensor([[[2.0, 1.0]]], requires_grad=True)
    Kt = torch.tensor([[[1e-3, 0, 0.5], [0, 1e-3, 0.5], [0, 0, 1]]])
    eye = torch.eye(4)[None]
    d, h = forward_splat(depth2, K1, eye, Kt, eye, (1, 1))
    assert h.all() and torch.isclose(d[0, 0, 0], torch.tensor(1.0))
    d.sum().backward()
    assert torch.equal(depth2.grad, torch.tensor([[[0.0, 1.0]]]))


def test_disparity_is_differentiable(scene_views):
    _, depth_t, _, depth_r = scene_views
    dt, dr, K, Tt, Tr = batch(depth_t, depth_r, K_NP, T_TGT, T_REF)
    dt.requires_grad_(True)
    rel = relate(dt, K, Tt, dr, K, Tr)
    rel.disparity.square().sum().backward()
    assert torch.isfinite(dt.grad).all() and dt.grad.abs().sum() > 0


def test_batched_equals_single(scene_views):
    _, depth_t, _, depth_r = scene_views
    dt, dr, K, Tt, Tr = batch(depth_t, depth_r, K_NP, T_TGT, T_REF)
    both = relate(torch.cat([dt, dr]), K.repeat(2, 1, 1), torch.cat([Tt, Tr]),
                  torch.cat([dr, dt]), K.repeat(2, 1, 1), torch.cat([Tr, Tt]))
    one = relate(dr, K, Tr, dt, K, Tt)
    assert torch.equal(both.mask[1:], one.mask)
    assert torch.allclose(both.disparity[1:], one.disparity)


def test_bad_inputs_give_empty_masks_without_nan(scene_views):
    _, depth_t, _, depth_r = scene_views
    dt, dr, K, Tt, Tr = batch(depth_t, depth_r, K_NP, T_TGT, T_REF)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no runtime warnings from NaN/inf arithmetic
        # All-invalid target depth, and all-invalid reference depth.
        for a, b in ((torch.zeros_like(dt), dr), (dt, torch.zeros_like(dr))):
            rel = relate(a, K, Tt, b, K, Tr)
            assert not rel.mask.any() and torch.isfinite(rel.disparity).all()
        # NaN/inf entries are invalid, the rest unaffected.
        bad = dt.clone()
        bad[:, :10] = float("nan")
        bad[:, 10:20] = float("inf")
        ok = relate(dt, K, Tt, dr, K, Tr)
        rel = relate(bad, K, Tt, dr, K, Tr)
        assert not rel.mask[:, :20].any() and torch.equal(rel.mask[:, 20:], ok.mask[:, 20:])
        assert torch.isfinite(rel.disparity).all()
        # Reference looking the other way: every point is behind it.
        behind = torch.as_tensor(pose(180.0, [0, 0, -1.0]), dtype=torch.float32)[None]
        rel = relate(dt, K, Tt, dr, K, behind)
        assert not rel.mask.any() and torch.isfinite(rel.disparity).all()
        # Extreme baseline: no overlap.
        far = torch.as_tensor(pose(0.0, [500.0, 0, 0]), dtype=torch.float32)[None]
        rel = relate(dt, K, Tt, dr, K, far)
        assert not rel.mask.any()
        d, m = forward_splat(dr, K, far, K, Tt, (H, W))
        assert not m.any() and not d.any()
        d, m = forward_splat(torch.full_like(dr, float("nan")), K, Tr, K, Tt, (H, W))
        assert not m.any()
    with pytest.raises(ValueError):
        relate(dt, K, Tt, dr, K, Tr, tau=-0.1)
