"""Stage one, geometry: SfM, the Gaussian-splatting fit and per-view depth, as cached stages.

Outputs (inside the work folder):

* ``sfm/images/<stem>.png``  undistorted working images (what lmvic compresses)
* ``sfm/sparse/``            the undistorted COLMAP model (PINHOLE)
* ``sfm/cameras.json``       per registered view: name, image, width, height, K, T (world-to-camera)
* ``sfm/points.npz``         SfM points (xyz float64 [P, 3], rgb uint8 [P, 3])
* ``splat/gaussians.ply``    the fitted Gaussians, standard 3DGS PLY layout
* ``depth/<kind>/<stem>.npy`` float32 [H, W] camera-z depth at the working resolution, kind in
  (median, mean); 0 marks pixels without depth
* ``depth/png/<stem>_<kind>.png`` colour-mapped previews with a colour bar
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from geometry import sfm
from geometry.cameras import camera_centres
from geometry.depth import render_depths, save_depth_png
from geometry.gaussian_fit import FitConfig, FitDiverged, fit_gaussians
from geometry.ply import read_ply, write_ply
from pipelines.cache import atomic_write_json, read_json
from pipelines.errors import LmvicError
from pipelines.scene import read_image
from pipelines.stages import StageContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CameraTable:
    """The registered views of a scene after SfM, in file-name order."""

    names: list[str]
    images: list[Path]  # undistorted working images
    sizes: list[tuple[int, int]]  # (width, height)
    K: np.ndarray  # [N, 3, 3]
    T: np.ndarray  # [N, 4, 4] world-to-camera (OpenCV)

    def __len__(self) -> int:
        return len(self.names)

    def load_images(self) -> list[np.ndarray]:
        """The undistorted images, uint8 [H, W, 3] each."""
        return [read_image(p) for p in self.images]


def load_cameras(sfm_dir: Path) -> CameraTable:
    """Read ``sfm/cameras.json`` of a completed sfm stage."""
    data = read_json(Path(sfm_dir) / "cameras.json")
    views = data["views"]
    return CameraTable(
        names=[v["name"] for v in views],
        images=[Path(sfm_dir) / v["image"] for v in views],
        sizes=[(v["width"], v["height"]) for v in views],
        K=np.array([v["K"] for v in views], dtype=np.float64),
        T=np.array([v["T"] for v in views], dtype=np.float64),
    )


def run_sfm(ctx: StageContext) -> dict:
    config: sfm.SfmConfig = ctx.config
    scene = ctx.scene
    scratch = ctx.out / "scratch"
    working = scratch / "images"
    originals = {v.name: read_image(v.path) for v in scene.views}
    scales = sfm.prepare_images(originals, working, config.max_image_size)
    if scene.colmap_model is not None:
        log.info("using the scene's COLMAP model %s", scene.colmap_model)
        model, source = sfm.load_colmap_model(scene.colmap_model, scales), "sparse/0"
    else:
        model = None
        if scene.transforms is not None:
            log.info("using the cameras of %s; triangulating points", scene.transforms)
            views = sfm.posed_views_from_transforms(scene.transforms, scales)
            try:
                model, source = sfm.triangulate(views, working, scratch, config), "transforms.json"
            except (RuntimeError, ValueError) as exc:  # COLMAP's checks; the cameras are recovered by SfM
                log.warning("triangulating with the poses of transforms.json failed (%s); running SfM instead",
                            str(exc).splitlines()[0][:120])
                (scratch / "database.db").unlink(missing_ok=True)
                model = None
        if model is None:
            log.info("structure from motion on %d views", len(originals))
            names = [sfm.working_name(n) for n in originals]
            model, source = sfm.reconstruct(working, scratch, names, config), "sfm"
    result = sfm.summarize(sfm.undistort(model, working, scratch, ctx.out), list(originals), source)
    shutil.rmtree(scratch)
    if result.excluded:
        log.warning("%d view(s) did not register and are left out: %s", len(result.excluded), ", ".join(result.excluded))
    if len(result.names) < 2:
        raise LmvicError(f"SfM registered {len(result.names)} of {len(originals)} views; at least 2 are needed")
    sfm.require_parallax(camera_centres(result.T), f"the {result.source} cameras")
    if len(result.points) == 0:
        raise LmvicError("SfM produced no 3-D points; the views do not overlap enough")
    atomic_write_json(ctx.out / "cameras.json", {
        "convention": "OpenCV world-to-camera T; pixel centres at +0.5",
        "source": result.source,
        "excluded": result.excluded,
        "views": [{"name": n, "image": f"images/{sfm.working_name(n)}", "width": w, "height": h,
                   "K": K.tolist(), "T": T.tolist()}
                  for n, (w, h), K, T in zip(result.names, result.sizes, result.K, result.T)],
    })
    np.savez(ctx.out / "points.npz", xyz=result.points, rgb=result.colors)
    return {"registered": len(result.names), "total": len(originals), "excluded": result.excluded,
            "points": int(len(result.points)), "source": result.source}


def run_splat(ctx: StageContext) -> dict:
    config: FitConfig = ctx.config
    cameras = load_cameras(ctx.stage_dir("sfm"))
    points = np.load(ctx.stage_dir("sfm") / "points.npz")
    try:
        gaussians = fit_gaussians(points["xyz"], points["rgb"], cameras.load_images(), cameras.K, cameras.T,
                                  config, progress=not ctx.quiet)
    except FitDiverged as exc:
        raise LmvicError(str(exc)) from exc
    write_ply(ctx.out / "gaussians.ply", gaussians)
    return {"gaussians": len(gaussians), "views": len(cameras)}


@dataclass(frozen=True)
class DepthConfig:
    mean_min_alpha: float = field(default=0.5, metadata={"help": "mean depth is valid where the opacity reaches this"})
    previews: bool = field(default=True, metadata={"help": "write colour-mapped PNG previews"})


DEPTH_KINDS = ("median", "mean")


def depth_path(depth_dir: Path, kind: str, name: str) -> Path:
    """Where the depth map of one view (its original file name) is stored."""
    return Path(depth_dir) / kind / f"{Path(name).stem}.npy"


def load_depth(depth_dir: Path, kind: str, name: str) -> np.ndarray:
    """float32 [H, W] camera-z depth of a view; 0 = no depth."""
    return np.load(depth_path(depth_dir, kind, name))


def run_depth(ctx: StageContext) -> dict:
    config: DepthConfig = ctx.config
    cameras = load_cameras(ctx.stage_dir("sfm"))
    gaussians = read_ply(ctx.stage_dir("splat") / "gaussians.ply")
    valid_fraction = {kind: [] for kind in DEPTH_KINDS}
    (ctx.out / "png").mkdir()
    views = zip(cameras.names, cameras.sizes, cameras.K, cameras.T)
    for name, (width, height), K, T in tqdm(list(views), desc="depth", disable=ctx.quiet, unit="view"):
        median, mean, _, _ = render_depths(gaussians, torch.from_numpy(K[None]), torch.from_numpy(T[None]),
                                           width, height, config.mean_min_alpha)
        for kind, depth in zip(DEPTH_KINDS, (median[0].numpy(), mean[0].numpy())):
            path = depth_path(ctx.out, kind, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, depth.astype(np.float32))
            valid_fraction[kind].append(float((depth > 0).mean()))
            if config.previews:
                save_depth_png(ctx.out / "png" / f"{Path(name).stem}_{kind}.png", depth, depth > 0,
                               title=f"{name}: {kind} depth")
        if valid_fraction["median"][-1] == 0.0:
            log.warning("view %s has no valid median depth", name)
    return {kind: {"mean_valid_fraction": float(np.mean(v))} for kind, v in valid_fraction.items()}
