"""Training data: real scene photos decoded once into a uint8 memory-mapped cache, sampled as crops.

The cache is a directory with ``pixels.u8`` (all images' RGB bytes back to back), ``index.npy``
(per image: byte offset, height, width) and ``meta.json`` (sources, settings). Building it is the
only place images are decoded; sampling a crop is a slice of the memmap.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
import torch

from pipelines.cache import atomic_write_json

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
#: Development scenes the lead evaluates on; never used for training.
HELD_OUT_SCENES = ("fox", "sceaux_castle")
CACHE_VERSION = 1


def refuse_held_out(folders: Sequence[Path | str], names: Sequence[str] = HELD_OUT_SCENES) -> None:
    """``ValueError`` naming the ``folders`` of a held-out scene (named like one of ``names``, or directly
    inside one: a scene's ``images/``), if any: the one check every trainer runs before it trains."""
    names = set(names)
    held_out = [f for f in map(Path, folders) if {f.name, f.parent.name} & names]
    if held_out:
        raise ValueError(f"held out for evaluation, not for training: {', '.join(map(str, held_out))}")


def scene_images(scenes_root: Path, include: tuple[str, ...] | None = None,
                 exclude: tuple[str, ...] = HELD_OUT_SCENES) -> list[Path]:
    """Photos under ``scenes_root/<scene>/`` (``images/`` folders and Middlebury views), sorted.

    Disparity maps and occlusion masks are skipped. ``include`` restricts to those scene names.
    """
    paths = []
    for scene in sorted(p for p in scenes_root.iterdir() if p.is_dir()):
        if scene.name in exclude or (include is not None and scene.name not in include):
            continue
        for p in sorted(scene.rglob("*")):
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            rel = p.relative_to(scene)
            if rel.parts[0] == "images" or p.stem.startswith(("view", "im")):
                paths.append(p)
    return paths


def read_rgb(path: Path, max_side: int) -> np.ndarray:
    """Decode ``path`` to (H, W, 3) uint8 RGB, area-downscaled so max(H, W) ≤ ``max_side``."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f"cannot decode image {path}")
    scale = max_side / max(img.shape[:2])
    if scale < 1:
        size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img[:, :, ::-1])


def build_cache(paths: list[Path], out_dir: Path, max_side: int = 768,
                scales: tuple[float, ...] = (1.0, 0.5), min_side: int = 128) -> Path:
    """Decode every path once at each scale (×``max_side``) into ``out_dir``; reuse a matching cache.

    Extra downscaled copies (scale < 1) raise the detail per pixel, closer to photo test sets.
    Images whose short side would fall under ``min_side`` at a scale are skipped at that scale.
    """
    meta = {"version": CACHE_VERSION, "sources": [str(p) for p in paths], "max_side": max_side,
            "scales": list(scales), "min_side": min_side}

    def images() -> Iterator[np.ndarray]:
        for p in paths:
            for s in scales:
                img = read_rgb(p, round(max_side * s))
                if min(img.shape[:2]) >= min_side:
                    yield img

    return write_cache(out_dir, meta, images())


def cache_settings(cache_dir: Path) -> dict | None:
    """The settings a complete cache in ``cache_dir`` was built with (its ``meta.json``), None if there is none."""
    meta_path = Path(cache_dir) / "meta.json"
    return json.loads(meta_path.read_text()).get("settings") if meta_path.exists() else None


def write_cache(out_dir: Path, settings: dict, images: Iterable[np.ndarray]) -> Path:
    """Write (H, W, 3) uint8 ``images`` as a cache in ``out_dir``, unless one with these (JSON)
    ``settings`` is there already (then ``images`` is not consumed). ``meta.json`` is written last,
    atomically: an interrupted build leaves no cache that looks complete."""
    if cache_settings(out_dir) == settings:
        return out_dir
    meta_path = out_dir / "meta.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    index, offset = [], 0
    with open(out_dir / "pixels.u8", "wb") as f:
        for img in images:
            f.write(np.ascontiguousarray(img).tobytes())
            index.append((offset, img.shape[0], img.shape[1]))
            offset += img.nbytes
    np.save(out_dir / "index.npy", np.asarray(index, dtype=np.int64))
    atomic_write_json(meta_path, {"settings": settings, "images": len(index), "bytes": offset})
    return out_dir


class ImageCache:
    """Read-only view of a cache built by ``build_cache``."""

    def __init__(self, cache_dir: Path):
        self.index = np.load(cache_dir / "index.npy")
        self.pixels = np.memmap(cache_dir / "pixels.u8", dtype=np.uint8, mode="r")

    def __len__(self) -> int:
        return len(self.index)

    def image(self, i: int) -> np.ndarray:
        """(H, W, 3) uint8 view of image ``i``."""
        off, h, w = (int(v) for v in self.index[i])
        return self.pixels[off: off + h * w * 3].reshape(h, w, 3)


def gradient_energy(crop: np.ndarray) -> float:
    """Mean absolute horizontal + vertical difference of a (h, w, 3) uint8 crop."""
    c = crop.astype(np.int16)
    return float(np.abs(np.diff(c, axis=0)).mean() + np.abs(np.diff(c, axis=1)).mean())


@dataclass
class CropSampler:
    """Random square crops (source by share, area-weighted image choice, horizontal flips, texture
    preference, optionally permuted colour channels).

    ``caches`` are the sources and ``shares`` the fraction of crops each gives (default: all from
    the first). Each crop is the most textured (``gradient_energy``) of ``candidates`` random draws,
    which biases training towards detailed regions: flat walls and black backgrounds teach little.
    With ``permute_channels`` each crop's RGB channels come in one of the six orders, uniformly: a
    few scenes of beige, grey and brown objects then show the codec every hue.
    """

    caches: Sequence[ImageCache]
    crop: int
    shares: Sequence[float] = (1.0,)
    seed: int = 0
    candidates: int = 2
    permute_channels: bool = False

    def __post_init__(self):
        if len(self.shares) != len(self.caches) or abs(sum(self.shares) - 1) > 1e-6:
            raise ValueError(f"shares {tuple(self.shares)} must sum to 1, one per cache ({len(self.caches)})")
        self.rng = np.random.default_rng(self.seed)
        self.weights = []
        for cache in self.caches:
            sizes = [(h, w) for _, h, w in cache.index]
            ok = np.array([min(h, w) >= self.crop for h, w in sizes])
            if not ok.any():
                raise ValueError(f"no cached image is at least {self.crop} px on its short side")
            area = np.array([h * w for h, w in sizes], dtype=np.float64) * ok
            self.weights.append(area / area.sum())

    def _one(self) -> np.ndarray:
        src = int(self.rng.choice(len(self.caches), p=self.shares))
        img = self.caches[src].image(int(self.rng.choice(len(self.weights[src]), p=self.weights[src])))
        h, w = img.shape[:2]
        best, best_e = None, -1.0
        for _ in range(self.candidates):
            y = int(self.rng.integers(0, h - self.crop + 1))
            x = int(self.rng.integers(0, w - self.crop + 1))
            c = img[y: y + self.crop, x: x + self.crop]
            e = gradient_energy(c)
            if e > best_e:
                best, best_e = c, e
        if self.rng.random() < 0.5:
            best = best[:, ::-1]
        return best[:, :, self.rng.permutation(3)] if self.permute_channels else best

    def batch(self, size: int) -> torch.Tensor:
        """(size, 3, crop, crop) float32 in [0, 1]."""
        arr = np.stack([self._one() for _ in range(size)])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255)


def validation_crops(paths: list[Path], crop: int = 256, max_side: int = 768) -> torch.Tensor:
    """Deterministic centre crops (one per path, after downscaling) → (n, 3, crop, crop) in [0, 1]."""
    out = []
    for p in paths:
        img = read_rgb(p, max_side)
        h, w = img.shape[:2]
        if min(h, w) < crop:
            raise ValueError(f"{p} is smaller than the {crop} px validation crop")
        y, x = (h - crop) // 2, (w - crop) // 2
        out.append(img[y: y + crop, x: x + crop])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div_(255)
