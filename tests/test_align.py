"""Alignment baselines and the masked metrics of the alignment comparison."""

from __future__ import annotations

import numpy as np
import pytest

from geometry.align_baselines import METHODS, align, homography_positions

W, H = 256, 192


def texture(x: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
    """An analytic RGB texture (Gaussian blobs on waves) evaluable at any continuous position."""
    rng = np.random.default_rng(seed)
    n = 400
    cx, cy = rng.uniform(-40, W + 40, n), rng.uniform(-40, H + 40, n)
    s = rng.uniform(1.5, 5.0, n)
    amp = rng.uniform(-1, 1, (n, 3))
    out = 0.5 + 0.1 * np.stack([np.sin(0.11 * x + 0.05 * y), np.cos(0.07 * y - 0.03 * x),
                                np.sin(0.05 * (x + y))], -1)
    for k in range(n):
        g = np.exp(-((x - cx[k]) ** 2 + (y - cy[k]) ** 2) / (2 * s[k] ** 2))
        out += 0.35 * g[..., None] * amp[k]
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def centres():
    return np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)


@pytest.fixture(scope="module")
def reference():
    return texture(*centres())


def apply_h(Hm, x, y):
    p = np.stack([x, y, np.ones_like(x)], -1) @ Hm.T
    return p[..., 0] / p[..., 2], p[..., 1] / p[..., 2]


def test_homography_recovers_known_mapping(reference):
    # Target pixel q shows the reference content at Hm(q) (continuous, centres at +0.5).
    Hm = np.array([[1.08, 0.04, -9.0], [-0.03, 1.05, 4.0], [1e-4, -5e-5, 1.0]])
    xt, yt = apply_h(Hm, *centres())
    target = texture(xt, yt)
    pos = homography_positions(target, reference)
    err = np.hypot(pos[..., 0] - xt, pos[..., 1] - yt)
    assert np.median(err) < 0.25 and err.max() < 1.5
    warped, valid = align("homography", target, reference)
    inside = (xt >= 0) & (xt <= W) & (yt >= 0) & (yt <= H)
    assert (valid == inside).mean() > 0.995
    mse = np.mean((warped[valid] - target[valid] / 255.0) ** 2)
    assert -10 * np.log10(mse) > 28


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_flow_recovers_translation(reference, method):
    dx, dy = 3.0, -2.0
    x, y = centres()
    target = texture(x + dx, y + dy)  # target(q) = reference(q + (dx, dy))
    warped, valid = align(method, target, reference)
    interior = (x > 20) & (x < W - 20) & (y > 20) & (y < H - 20)
    assert valid[interior].all()
    mse = np.mean((warped[interior] - target[interior] / 255.0) ** 2)
    assert -10 * np.log10(mse) > 27
    pos = METHODS[method](target, reference)
    err = np.hypot(pos[..., 0] - (x + dx), pos[..., 1] - (y + dy))
    assert np.median(err[interior]) < 0.3
    # Valid means "the estimated position lies inside the reference".
    px, py = pos[..., 0], pos[..., 1]
    assert np.array_equal(valid, (px >= 0) & (px <= W) & (py >= 0) & (py <= H))
    if method == "dis":  # DIS extrapolates the shift to the border: the last column leaves the image
        assert not valid[:, -1].any()


def test_failures_are_reported_not_raised(reference):
    flat = np.full_like(reference, 128)
    with pytest.warns(UserWarning, match="homography"):
        warped, valid = align("homography", flat, reference)
    assert not valid.any() and not warped.any()
    with pytest.raises(ValueError, match="unknown"):
        align("sift-flow", reference, reference)


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_flow_with_a_reference_of_another_size(reference, method):
    # per-image cameras undistort to slightly different sizes: the reference's pixels keep their
    # coordinates (top-left anchor), so the flow still recovers the shift where both images overlap
    x, y = centres()
    target = texture(x + 2.0, y + 1.0)
    small = reference[: H - 8, : W - 6]
    warped, valid = align(method, target, small)
    assert warped.shape == target.shape and valid.shape == target.shape[:2]
    inner = (x > 20) & (x < W - 30) & (y > 20) & (y < H - 30)
    assert valid[inner].all()
    assert -10 * np.log10(np.mean((warped[inner] - target[inner] / 255.0) ** 2)) > 27


def test_masked_metrics_match_the_whole_image_ones_and_respect_the_region():
    from pipelines.align_compare import masked_ms_ssim, masked_psnr
    from pipelines.metrics import ms_ssim, psnr

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (200, 230, 3), dtype=np.uint8)
    b = np.clip(a + rng.normal(scale=25, size=a.shape), 0, 255).astype(np.uint8)
    everywhere = np.ones(a.shape[:2], bool)
    assert masked_ms_ssim(a, b, everywhere) == pytest.approx(ms_ssim(a, b), abs=1e-5)
    assert masked_psnr(a, b, everywhere) == pytest.approx(psnr(a, b), abs=1e-9)
    region = np.zeros(a.shape[:2], bool)
    region[:, :115] = True
    c = b.copy()
    c[:, :115] = a[:, :115]  # identical inside the region, noisy outside
    assert masked_ms_ssim(a, c, region) == pytest.approx(1.0) and ms_ssim(a, c) < 0.98
    assert ms_ssim(a, b) < masked_ms_ssim(a, b, ~region) < 0.99
    assert np.isnan(masked_ms_ssim(a, c, ~everywhere))
    assert np.isnan(masked_ms_ssim(a[:150], c[:150], everywhere[:150]))  # too small for five scales
    # PSNR inside a region: 10·log10(255² / mean squared error over the region).
    d = a.astype(np.int16)
    d[:, 115:] += np.where(d[:, 115:] < 128, 10, -10)
    d = d.astype(np.uint8)
    assert masked_psnr(a, d, region) == np.inf
    assert masked_psnr(a, d, ~region) == pytest.approx(10 * np.log10(255**2 / 100))
    assert np.isnan(masked_psnr(a, d, ~everywhere))


def test_align_compare_on_a_plane_seen_by_two_translated_cameras(tmp_path):
    import json

    from pipelines.align_compare import align_compare
    from pipelines.relations import Views

    f, b, Z = 120.0, 0.5, 5.0
    shift = f * b / Z + 0.4  # 12.4 px: target x shows reference content at x − shift
    b = shift * Z / f
    x, y = centres()
    images = [texture(x, y), texture(x - shift, y)]  # view 0 = reference, view 1 = target
    K = np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]])
    T_ref, T_tgt = np.eye(4), np.eye(4)
    T_tgt[0, 3] = b  # target camera at −b: a point at x_ref appears at x_ref + shift in the target
    views = Views(names=["ref.png", "tgt.png"], K=np.stack([K, K]), T=np.stack([T_ref, T_tgt]),
                  depth=lambda kind, i: np.full((H, W), Z, np.float32), image=lambda i: images[i])
    table = align_compare(views, [(1, 0)], tau=0.02, out=tmp_path)
    by = {r["method"]: r for r in table}
    for kind in ("median", "mean"):
        assert by[kind]["coverage"] == pytest.approx(np.mean(x >= shift), abs=1e-9)
        assert by[kind]["psnr_valid"] > 35 and by[kind]["msssim_valid"] > 0.99
    assert by["dis"]["psnr_valid"] > 27
    assert {"homography", "farneback"} <= set(by)
    stored = json.loads((tmp_path / "table.json").read_text())
    assert [r["method"] for r in stored["table"]] == [r["method"] for r in table]
    assert (tmp_path / "table.csv").read_text().startswith("method,pairs,psnr_all")
    assert (tmp_path / "figure.png").stat().st_size > 10_000
