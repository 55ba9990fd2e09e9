"""Dead-leaves training images and the sources of the crop sampler."""
import json

import numpy as np
import pytest
from scipy import stats

from lmvic.training.data import CropSampler, ImageCache, write_cache
from lmvic.training.dead_leaves import (MINIFY, TILE, build_dead_leaves_cache, dead_leaves, leaf_radii, mirrored,
                                       texture_bank)


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


def test_texture_bank_minifies_photos_within_its_range():
    """A photo of vertical stripes of period 40 px: in a tile (2× painting resolution) the period is 80/m px,
    m ∈ MINIFY, and the tile holds the stripes' colours only (no other source)."""
    x = np.arange(1200)
    stripes = np.where((x // 20) % 2 == 0, 200, 30).astype(np.uint8)
    photo = np.repeat(np.tile(stripes, (800, 1))[:, :, None], 3, axis=2)
    tiles = texture_bank(write_photo_cache(photo), np.random.default_rng(0), count=12)
    assert tiles.shape == (12, TILE, TILE, 3) and tiles.min() >= 30 - 2 and tiles.max() <= 200 + 2
    for tile in tiles:
        profile = tile[:, :, 0].astype(np.float64).mean(axis=0)
        spectrum = np.abs(np.fft.rfft(profile - profile.mean()))
        period = TILE / np.argmax(spectrum)
        assert 80 / MINIFY[1] * 0.9 <= period <= 80 / MINIFY[0] * 1.1, period


def test_photo_leaves_wear_the_tiles():
    """Every leaf wears a tile when ``photo`` is 1 (tiles of one colour: all but the uncovered pixels take it),
    none when it is 0."""
    tiles = np.tile(np.array([7, 77, 177], np.uint8), (4, TILE, TILE, 1))
    palette = np.array([[200, 10, 10], [10, 200, 10]], np.uint8)
    worn = dead_leaves(np.random.default_rng(5), 128, palette, r_min=4, blur=0.0, tiles=tiles, photo=1.0)
    assert (worn == [7, 77, 177]).all(axis=2).mean() > 0.98
    plain = dead_leaves(np.random.default_rng(5), 128, palette, r_min=4, blur=0.0, tiles=tiles, photo=0.0)
    assert not (plain == [7, 77, 177]).all(axis=2).any()


def write_photo_cache(photo: np.ndarray) -> ImageCache:
    import tempfile
    from pathlib import Path

    return ImageCache(write_cache(Path(tempfile.mkdtemp()), {"photo": 1}, [photo]))


def test_mirrored_indexes_fold_without_a_jump():
    i = np.arange(-10, 30)
    folded = mirrored(i, 8)
    assert folded.min() == 0 and folded.max() == 7
    assert (np.abs(np.diff(folded)) <= 1).all()  # neighbours stay neighbours (or the same pixel at a fold)
    assert np.array_equal(folded[10:18], np.arange(8)) and np.array_equal(folded[18:26], np.arange(7, -1, -1))


def test_texture_bank_takes_small_photos_whole():
    """A photo shorter than the region a minification asks for is taken whole (its tile is then less minified)."""
    photo = np.random.default_rng(1).integers(0, 256, (100, 140, 3), dtype=np.uint8)
    tiles = texture_bank(write_photo_cache(photo), np.random.default_rng(0), count=3, candidates=2)
    assert tiles.shape == (3, TILE, TILE, 3)
