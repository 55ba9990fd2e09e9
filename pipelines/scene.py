"""Scene folders: finding, validating and reading the photos of one scene.

A scene folder holds ``images/*.{jpg,jpeg,png}`` and optionally ``sparse/0`` (a COLMAP model),
``transforms.json`` (nerfstudio / instant-ngp cameras) and ``depth_gt/`` + ``gt/cameras.json``
(ground truth, used only for evaluation). Everything lmvic computes goes to the work folder,
``SCENE/.lmvic`` unless the user names another.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.errors import LmvicError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class View:
    """One photo of the scene: its file and its displayed size (EXIF orientation applied)."""

    name: str  # file name inside images/, the view's identity everywhere in lmvic
    path: Path
    width: int
    height: int


@dataclass(frozen=True)
class Scene:
    """A validated scene folder; views sorted by file name."""

    root: Path
    views: tuple[View, ...]

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def colmap_model(self) -> Path | None:
        path = self.root / "sparse" / "0"
        return path if path.is_dir() else None

    @property
    def transforms(self) -> Path | None:
        path = self.root / "transforms.json"
        return path if path.is_file() else None

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.views]

    def default_work_dir(self) -> Path:
        return self.root / ".lmvic"


def read_image(path: Path) -> np.ndarray:
    """The photo as uint8 [H, W, 3] RGB with its EXIF orientation applied; LmvicError if unreadable."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise LmvicError(f"cannot read image {path}: {exc}") from exc


def load_scene(root: Path | str, allow_mixed_sizes: bool = False) -> Scene:
    """Validate ``root`` as a scene folder and list its views (every image is fully decoded once)."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise LmvicError(f"scene folder {root} does not exist")
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise LmvicError(f"{root} has no images/ folder")
    files = sorted(p for p in images_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    photos = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    for ignored in sorted(set(files) - set(photos)):
        log.warning("ignoring %s: not a .jpg/.jpeg/.png file", ignored.name)
    if len(photos) < 2:
        raise LmvicError(f"{images_dir} holds {len(photos)} image(s); lmvic needs at least 2 views of the scene")
    views = []
    for path in photos:
        height, width = read_image(path).shape[:2]
        views.append(View(path.name, path, width, height))
    sizes = sorted({(v.width, v.height) for v in views})
    if len(sizes) > 1 and not allow_mixed_sizes:
        listing = ", ".join(f"{w}x{h}" for w, h in sizes[:4])
        raise LmvicError(f"images have different sizes ({listing}); pass --allow-mixed-sizes if that is intended")
    return Scene(root, tuple(views))
