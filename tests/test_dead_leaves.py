"""Dead-leaves training images and the sources of the crop sampler."""
import json

import numpy as np
import pytest
from scipy import stats

from lmvic.training.data import CropSampler, ImageCache, write_cache
from lmvic.training.dead_leaves import build_dead_leaves_cache, dead_leaves, leaf_radii


def test_leaf_radii_follow_the_inverse_cube_law():
    a, b = 2.0, 300.0
    r = leaf_radii(np.random.default_rng(0), 50_000, a, b)
    assert r.min() >= a and r.max() <= b
    cdf = lambda x: (a ** -2 - np.clip(x, a, b) ** -2) / (a ** -2 - b ** -2)  # closed form of ∝ r⁻³
    assert stats.kstest(r, cdf).pvalue > 0.01
    assert stats.kstest(r, lambda x: np.clip((x - a) / (b - a), 0, 1)).pvalue < 1e-6  # not just any law


def radial_spectrum_slope(img: np.ndarray) -> float:
    """Slope of log power against log frequency (4 to size/4 cycles), grey level."""
    g = img.astype(np.float64).mean(axis=2)
    power = np.abs(np.fft.fftshift(np.fft.fft2(g - g.mean()))) ** 2
    n = g.shape[0]
    y, x = np.indices(power.shape) - n // 2
    ring = np.hypot(x, y).astype(int).ravel()
    profile = np.bincount(ring, power.ravel()) / np.bincount(ring)
    f = np.arange(4, n // 4)
    return float(np.polyfit(np.log(f), np.log(profile[f]), 1)[0])


def test_dead_leaves_have_the_power_spectrum_of_natural_images():
    """Natural photos (and the dead-leaves model) have power ∝ 1/f²; white noise has a flat spectrum."""
    palette = np.random.default_rng(0).integers(0, 256, (1000, 3), dtype=np.uint8)
    for seed in range(2):
        img = dead_leaves(np.random.default_rng(seed), 256, palette, blur=0.0)
        assert img.shape == (256, 256, 3) and img.dtype == np.uint8
        assert -2.4 < radial_spectrum_slope(img) < -1.6
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3))
    assert abs(radial_spectrum_slope(noise)) < 0.2


def test_dead_leaves_are_reproducible_and_use_the_palette():
    palette = np.array([[200, 10, 10], [10, 200, 10]], dtype=np.uint8)
    one = dead_leaves(np.random.default_rng(3), 128, palette, r_min=6, blur=0.0)
    assert np.array_equal(one, dead_leaves(np.random.default_rng(3), 128, palette, r_min=6, blur=0.0))
    assert not np.array_equal(one, dead_leaves(np.random.default_rng(4), 128, palette, r_min=6, blur=0.0))
    assert np.median(one[..., 2]) < 40  # every leaf starts from a palette colour with no blue


def flat_cache(path, value, n=3):
    return ImageCache(write_cache(path, {"value": value}, (np.full((96, 96, 3), value, np.uint8) for _ in range(n))))


def test_crop_sampler_draws_each_source_by_its_share(tmp_path):
    dark, bright = flat_cache(tmp_path / "dark", 0), flat_cache(tmp_path / "bright", 255)
    x = CropSampler([dark, bright], 64, shares=(0.25, 0.75), seed=0).batch(800)
    assert x.shape == (800, 3, 64, 64)
    assert abs(float((x[:, 0, 0, 0] == 1).float().mean()) - 0.75) < 0.05
    assert float(CropSampler([dark, bright], 64, shares=(1.0, 0.0)).batch(50).max()) == 0.0
    with pytest.raises(ValueError, match="sum to 1"):
        CropSampler([dark, bright], 64, shares=(0.5, 0.6))


def test_an_interrupted_cache_build_is_rebuilt(tmp_path):
    def failing():
        yield np.zeros((96, 96, 3), np.uint8)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_cache(tmp_path / "c", {"k": 1}, failing())
    assert not (tmp_path / "c" / "meta.json").exists()
    cache = flat_cache(tmp_path / "c", 7, n=2)
    assert len(cache) == 2 and cache.image(1)[0, 0, 0] == 7


def test_dead_leaves_cache_is_reused_with_the_same_settings(tmp_path):
    palette_source = flat_cache(tmp_path / "src", 90)
    out = build_dead_leaves_cache(tmp_path / "leaves", palette_source, count=2, size=64, seed=1, progress=False)
    cache = ImageCache(out)
    assert len(cache) == 2 and cache.image(0).shape == (64, 64, 3)
    stamp = (out / "pixels.u8").stat().st_mtime_ns
    build_dead_leaves_cache(out, palette_source, count=2, size=64, seed=1, progress=False)
    assert (out / "pixels.u8").stat().st_mtime_ns == stamp
    assert json.loads((out / "meta.json").read_text())["settings"]["count"] == 2
