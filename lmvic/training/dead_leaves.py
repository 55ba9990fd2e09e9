"""Dead-leaves images: a procedural training source with the statistics of natural photographs.

The development scenes are a few objects photographed many times (a can, a plush toy, a plaster
temple); a codec trained on them alone sees little of the variety of edges, textures and scales of
everyday photos. The dead-leaves model (Matheron; Lee, Mumford & Huang 2001) stacks occluding
shapes whose sizes follow p(r) ∝ r⁻³ between ``r_min`` and ``r_max``: the result is scale-invariant,
has a natural image's 1/f² power spectrum and sharp occlusion edges. Here each leaf is a disk,
ellipse or rotated rectangle, coloured from a palette of real photo pixels (so the colour
distribution is a natural one) with some random colours mixed in, and filled flat, with a linear
shading, with stripes of random period (fine periodic texture) or with grain. Leaves are painted front to back at 2× resolution
(each pixel keeps the first leaf that covers it), then area-downsampled (anti-aliased edges) and
sometimes blurred (defocus).

With ``photo`` > 0 that share of the leaves wears a photograph instead: a tile of a development
photo, minified 1.5–4× and turned with the leaf (``texture_bank``). The scenes' photos are mostly
smooth surfaces (a 256-px training crop has a mean absolute pixel difference ``gradient_energy`` of
about 6, a Kodak crop about 18); minified, their textures come close to the detail of a photo of a
whole scene, and the leaves' edges to its occlusions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from lmvic.training.data import ImageCache, gradient_energy, write_cache

#: Probabilities of the leaf shapes (disk, ellipse, rotated rectangle) and fills (flat, shading,
#: stripes, grain).
SHAPES = (0.5, 0.2, 0.3)
FILLS = (0.35, 0.3, 0.2, 0.15)
#: Range of the smallest leaf radius (px), drawn log-uniformly per image: busy to calm images.
R_MIN = (1.5, 10.0)
#: Minification range of the photo tiles leaves wear (photo pixels per output pixel), and the tiles' side
#: at the 2× painting resolution.
MINIFY = (1.5, 4.0)
TILE = 256


def leaf_radii(rng: np.random.Generator, n: int, r_min: float, r_max: float) -> np.ndarray:
    """(n,) radii with density ∝ r⁻³ on [r_min, r_max], by inverting the CDF
    F(r) = (r_min⁻² − r⁻²) / (r_min⁻² − r_max⁻²)."""
    a, b = r_min ** -2.0, r_max ** -2.0
    return (a - rng.random(n) * (a - b)) ** -0.5


def palette_from(cache: ImageCache, rng: np.random.Generator, count: int = 65536, uniform: float = 0.25) -> np.ndarray:
    """(count, 3) uint8 colours: random pixels of random images of ``cache``, and a share
    ``uniform`` of uniformly random colours (saturated hues the development scenes lack)."""
    out = rng.integers(0, 256, (count, 3), dtype=np.uint8)
    picks = np.where(rng.random(count) < uniform, -1, rng.integers(0, len(cache), count))
    for i in np.unique(picks[picks >= 0]):
        img = cache.image(int(i))
        sel = picks == i
        ys = rng.integers(0, img.shape[0], int(sel.sum()))
        xs = rng.integers(0, img.shape[1], int(sel.sum()))
        out[sel] = img[ys, xs]
    return out


def texture_bank(cache: ImageCache, rng: np.random.Generator, count: int = 256, candidates: int = 4) -> np.ndarray:
    """(count, TILE, TILE, 3) uint8 photo tiles at the 2× painting resolution: each the most textured
    (``gradient_energy``) of ``candidates`` random regions of random ``cache`` images, resized so one
    output pixel (after ``dead_leaves``' 2× downsampling) spans m photo pixels, m log-uniform in ``MINIFY``
    (less where the image's short side is shorter than the region m asks for)."""
    tiles = np.empty((count, TILE, TILE, 3), np.uint8)
    for k in range(count):
        m = float(np.exp(rng.uniform(*np.log(MINIFY))))
        best, best_e = None, -1.0
        for _ in range(candidates):
            img = cache.image(int(rng.integers(len(cache))))
            side = min(int(round(TILE * m / 2)), *img.shape[:2])  # the photo region that becomes one tile
            y, x = (int(rng.integers(0, n - side + 1)) for n in img.shape[:2])
            region = img[y: y + side, x: x + side]
            e = gradient_energy(region)
            if e > best_e:
                best, best_e = region, e
        tiles[k] = cv2.resize(best, (TILE, TILE), interpolation=cv2.INTER_AREA if len(best) > TILE else cv2.INTER_LINEAR)
    return tiles


def mirrored(i: np.ndarray, n: int = TILE) -> np.ndarray:
    """Indexes ``i`` (any integers) folded into [0, n) by mirroring: a leaf larger than a tile wears it
    reflected at its borders, without a seam."""
    p = np.mod(i, 2 * n)
    return np.where(p < n, p, 2 * n - 1 - p)


def _leaf_fill(rng: np.random.Generator, colour: np.ndarray, u: np.ndarray, v: np.ndarray, r: float,
               tiles: np.ndarray | None = None, photo: float = 0.0) -> np.ndarray:
    """(..., 3) float32 colours of a leaf's pixels; ``u``, ``v`` (...,) are their coordinates along and
    across the leaf's axis. With probability ``photo`` the leaf wears one of ``tiles`` (turned with it)."""
    if tiles is not None and rng.random() < photo:
        tile = tiles[rng.integers(len(tiles))]
        oy, ox = rng.integers(0, TILE, 2)
        return tile[mirrored(np.floor(v).astype(np.int64) + oy), mirrored(np.floor(u).astype(np.int64) + ox)].astype(np.float32)
    kind = rng.choice(len(FILLS), p=FILLS)
    c = colour.astype(np.float32)
    if kind == 0:
        return np.broadcast_to(c, u.shape + (3,))
    if kind == 1:  # shading across the leaf
        return c + (u / r)[..., None] * rng.normal(0.0, 40.0, 3).astype(np.float32)
    if kind == 2:  # stripes, period from 2 px (at 2×) to the leaf's size
        period = float(np.exp(rng.uniform(np.log(2.0), np.log(max(2.5, 2 * r)))))
        wave = np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
        return c + wave[..., None] * rng.normal(0.0, 30.0, 3).astype(np.float32)
    return c + rng.normal(0.0, rng.uniform(4.0, 20.0), u.shape + (3,)).astype(np.float32)


def dead_leaves(rng: np.random.Generator, size: int, palette: np.ndarray, r_min: float = 1.5,
                r_max: float | None = None, coverage: float = 0.995, blur: float = 0.3,
                tiles: np.ndarray | None = None, photo: float = 0.0) -> np.ndarray:
    """One (size, size, 3) uint8 dead-leaves image.

    Radii are in output pixels (``r_max`` defaults to ``size / 2``). Painting stops once
    ``coverage`` of the pixels have a leaf; the few left take one more palette colour. With
    probability ``blur`` the image is defocused by a Gaussian of σ ∈ [0.4, 1.5] px. A share ``photo``
    of the leaves wears photo ``tiles`` (``texture_bank``) instead of a palette colour's fill.
    """
    ss = 2  # painted at 2× and area-downsampled
    side = size * ss
    lo, hi = r_min * ss, (r_max or size / 2) * ss
    img = np.empty((side, side, 3), np.float32)
    free = np.ones((side, side), bool)
    left = side * side
    while left > (1 - coverage) * side * side:
        radii = leaf_radii(rng, 4096, lo, hi)
        for r in radii:
            cy, cx = rng.uniform(0, side, 2)
            half = int(np.ceil(1.42 * r))
            y0, y1 = max(0, int(cy) - half), min(side, int(cy) + half + 1)
            x0, x1 = max(0, int(cx) - half), min(side, int(cx) + half + 1)
            if not free[y0:y1, x0:x1].any():
                continue
            dy, dx = np.ogrid[y0:y1, x0:x1]
            dy, dx = dy + 0.5 - cy, dx + 0.5 - cx
            t = rng.uniform(0, np.pi)
            u, v = np.cos(t) * dx + np.sin(t) * dy, np.cos(t) * dy - np.sin(t) * dx
            shape, aspect = rng.choice(len(SHAPES), p=SHAPES), rng.uniform(0.2, 1.0)
            if shape == 0:
                inside = u * u + v * v < r * r
            elif shape == 1:
                inside = (u / r) ** 2 + (v / (aspect * r)) ** 2 < 1
            else:
                inside = (np.abs(u) < r) & (np.abs(v) < aspect * r)
            mask = inside & free[y0:y1, x0:x1]
            n = int(mask.sum())
            if n == 0:
                continue
            fill = _leaf_fill(rng, palette[rng.integers(len(palette))], u, v, r, tiles, photo)
            img[y0:y1, x0:x1][mask] = fill[mask]
            free[y0:y1, x0:x1] &= ~mask
            left -= n
            if left <= (1 - coverage) * side * side:
                break
    img[free] = palette[rng.integers(len(palette))]
    out = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    if rng.random() < blur:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.4, 1.5))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def build_dead_leaves_cache(out_dir: Path, palette_cache: ImageCache, count: int = 256, size: int = 512,
                            seed: int = 0, progress: bool = True, photo: float = 0.0) -> Path:
    """``count`` dead-leaves images of ``size`` px (colours, and with ``photo`` > 0 that share of the
    leaves' textures, from ``palette_cache``; smallest radius drawn from ``R_MIN`` per image) as an
    image cache in ``out_dir`` (the ``ImageCache`` format); a cache with the same settings is reused."""
    settings = {"generator": "dead_leaves", "count": count, "size": size, "seed": seed, "r_min": list(R_MIN),
                "palette_images": len(palette_cache), "shapes": list(SHAPES), "fills": list(FILLS)}
    if photo > 0:
        settings.update(photo=photo, minify=list(MINIFY), tile=TILE)

    def generate() -> Iterator[np.ndarray]:  # runs only when the cache is (re)built
        rng = np.random.default_rng(seed)
        palette = palette_from(palette_cache, rng)
        tiles = texture_bank(palette_cache, rng) if photo > 0 else None
        for _ in range(count):
            yield dead_leaves(rng, size, palette, r_min=float(np.exp(rng.uniform(*np.log(R_MIN)))),
                              tiles=tiles, photo=photo)

    images = generate()
    if progress:
        from tqdm import tqdm
        images = tqdm(images, total=count, desc="dead leaves", unit="img")
    return write_cache(out_dir, settings, images)
