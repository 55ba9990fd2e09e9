"""Structure from motion with pycolmap (COLMAP) on the CPU, undistorted to PINHOLE.

Three ways in, one way out:

* no cameras in the scene: SIFT extraction, exhaustive or sequential matching, incremental mapping;
  the largest model is kept;
* ``sparse/0`` (a COLMAP model): used as it is, rescaled to the working resolution;
* ``transforms.json`` (nerfstudio / instant-ngp, OpenGL camera-to-world, OPENCV distortion):
  converted to a COLMAP model, then 3-D points are triangulated from SIFT matches with the poses
  held fixed.

Whatever the source, the model is undistorted to PINHOLE with COLMAP's undistorter; the result is a
standard COLMAP model (``sparse/``, readable by COLMAP, gsplat's parser and nerfstudio) beside the
undistorted images (``images/``) that every later stage uses.
"""
from __future__ import annotations

import logging
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pycolmap

# pycolmap installs glog's failure-signal handler, SIGTERM included: a terminated lmvic process then
# prints a stack trace and, with worker threads busy, can hang instead of exiting (seen: a killed
# training kept spinning at 60 % CPU). Terminating must just terminate.
try:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
except ValueError:  # imported outside the main thread: the caller owns signal handling
    pass

from geometry.cameras import camera_centres, opengl_c2w_to_opencv_w2c
from pipelines.errors import LmvicError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SfmConfig:
    max_image_size: int = field(default=1280, metadata={"help": "long side of the working images, in pixels"})
    matcher: Literal["auto", "exhaustive", "sequential"] = field(
        default="auto", metadata={"help": "auto = exhaustive up to exhaustive_limit views, sequential above"})
    exhaustive_limit: int = 60
    sequential_overlap: int = 10
    camera_model: Literal["SIMPLE_RADIAL", "SIMPLE_PINHOLE", "PINHOLE", "RADIAL", "OPENCV"] = "SIMPLE_RADIAL"
    single_camera: bool = field(default=True, metadata={"help": "one camera shared by every view"})
    max_num_features: int = 8192
    seed: int = 0


@dataclass(frozen=True)
class SfmResult:
    """Registered views (file names in images/), their K [N, 3, 3] and world-to-camera T [N, 4, 4]."""

    names: list[str]  # original file names of the registered views
    sizes: list[tuple[int, int]]  # (width, height) of the undistorted images
    K: np.ndarray
    T: np.ndarray
    points: np.ndarray  # [P, 3] world points
    colors: np.ndarray  # [P, 3] uint8
    excluded: list[str]  # views that did not register
    source: str


def prepare_images(images: dict[str, np.ndarray], out_dir: Path, max_size: int) -> dict[str, float]:
    """Write the working copies (PNG, long side <= max_size); returns each view's scale factor.

    ``images`` maps original file names to RGB uint8 [H, W, 3] (EXIF orientation applied)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = [Path(n).stem for n in images]
    if len(set(stems)) != len(stems):
        raise LmvicError("two images share a file name stem (e.g. a.jpg and a.png); rename one")
    scales = {}
    for name, rgb in images.items():
        h, w = rgb.shape[:2]
        scale = min(1.0, max_size / max(h, w))
        if scale < 1.0:
            rgb = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(out_dir / working_name(name)), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        scales[name] = scale
    return scales


def _extract_and_match(database: Path, image_dir: Path, names: list[str], config: SfmConfig,
                       camera_mode: pycolmap.CameraMode, camera_model: str) -> None:
    pycolmap.logging.minloglevel = 0 if log.isEnabledFor(logging.DEBUG) else 3  # COLMAP log off; lmvic reports
    log.info("SfM: extracting SIFT features from %d images", len(names))
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = camera_model
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.sift.max_num_features = config.max_num_features
    pycolmap.extract_features(database, image_dir, image_names=names, camera_mode=camera_mode,
                              reader_options=reader, extraction_options=extraction, device=pycolmap.Device.cpu)
    matcher = config.matcher
    if matcher == "auto":
        matcher = "exhaustive" if len(names) <= config.exhaustive_limit else "sequential"
    log.info("SfM: %s matching", matcher)
    if matcher == "exhaustive":
        pycolmap.match_exhaustive(database, device=pycolmap.Device.cpu)
    else:
        pairing = pycolmap.SequentialPairingOptions()
        pairing.overlap = config.sequential_overlap
        pycolmap.match_sequential(database, pairing_options=pairing, device=pycolmap.Device.cpu)


def _mapper_options(config: SfmConfig) -> pycolmap.IncrementalPipelineOptions:
    options = pycolmap.IncrementalPipelineOptions()
    options.random_seed = config.seed
    options.mapper.random_seed = config.seed
    return options


def reconstruct(image_dir: Path, work: Path, names: list[str], config: SfmConfig) -> pycolmap.Reconstruction:
    """Incremental SfM on the working images; the model with the most registered views."""
    database = work / "database.db"
    mode = pycolmap.CameraMode.SINGLE if config.single_camera else pycolmap.CameraMode.PER_IMAGE
    _extract_and_match(database, image_dir, names, config, mode, config.camera_model)
    log.info("SfM: incremental mapping")
    models = pycolmap.incremental_mapping(database, image_dir, work / "mapped", options=_mapper_options(config))
    if not models:
        raise LmvicError("SfM failed: COLMAP could not register any pair of views (too little overlap or texture?)")
    return max(models.values(), key=lambda r: r.num_reg_images())


def working_name(name: str) -> str:
    """File name of a view's working copy: always PNG, so no generation loss is added."""
    return Path(name).stem + ".png"


def load_colmap_model(model_dir: Path, scales: dict[str, float]) -> pycolmap.Reconstruction:
    """A scene's own COLMAP model, checked against its images, renamed to the working copies and
    rescaled to their resolution. ``scales`` maps original file names to working scale factors."""
    try:
        model = pycolmap.Reconstruction(model_dir)
    except Exception as exc:  # pycolmap raises plain RuntimeError/ValueError on malformed files
        raise LmvicError(f"cannot read the COLMAP model in {model_dir}: {exc}") from exc
    unknown = sorted(im.name for im in model.images.values() if im.name not in scales)
    if unknown:
        raise LmvicError(f"the COLMAP model in {model_dir} names images that are not in images/: {', '.join(unknown[:5])}")
    if model.num_reg_images() == 0:
        raise LmvicError(f"the COLMAP model in {model_dir} has no registered images")
    camera_scales: dict[int, set[float]] = {}
    for image in model.images.values():
        camera_scales.setdefault(image.camera_id, set()).add(scales[image.name])
        image.name = working_name(image.name)
    for camera_id, found in camera_scales.items():
        if len(found) > 1:
            raise LmvicError(f"the COLMAP model shares camera {camera_id} between images of different sizes")
        model.cameras[camera_id].rescale(found.pop())
    return model


def _transforms_camera(meta: dict, scale: float) -> str:
    """COLMAP camera line (without the id) of transforms.json intrinsics, scaled to the working size."""
    try:
        w, h = float(meta["w"]), float(meta["h"])
        fx, fy = float(meta["fl_x"]), float(meta.get("fl_y", meta["fl_x"]))
        cx, cy = float(meta.get("cx", w / 2)), float(meta.get("cy", h / 2))
    except (KeyError, TypeError, ValueError) as exc:
        raise LmvicError(f"transforms.json: camera intrinsics missing or malformed ({exc})") from exc
    dist = [float(meta.get(k, 0.0)) for k in ("k1", "k2", "p1", "p2")]
    params = [fx * scale, fy * scale, cx * scale, cy * scale, *dist]
    return f"OPENCV {round(w * scale)} {round(h * scale)} " + " ".join(f"{p:.10g}" for p in params)


@dataclass(frozen=True)
class PosedView:
    """A view with a known pose: working image name, COLMAP camera (model name, width, height,
    parameters) and world-to-camera rotation (w, x, y, z) and translation."""

    name: str
    camera: str
    qvec: tuple[float, ...]
    tvec: tuple[float, ...]


def posed_views_from_transforms(path: Path, scales: dict[str, float]) -> list[PosedView]:
    """The views of nerfstudio / instant-ngp ``transforms.json`` that exist in images/.

    Frames whose image is absent are skipped (instant-ngp's fox lists 67 frames for 50 images);
    per-frame intrinsics override the global ones.
    """
    import json

    try:
        meta = json.loads(path.read_text())
        frames = meta["frames"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LmvicError(f"malformed {path}: {exc}") from exc
    views, centres = [], []
    for frame in frames:
        name = Path(str(frame.get("file_path", ""))).name
        if name not in scales:
            matches = [n for n in scales if Path(n).stem == Path(name).stem]
            if len(matches) != 1:
                continue
            name = matches[0]
        try:
            c2w = np.asarray(frame["transform_matrix"], dtype=np.float64)
        except (KeyError, ValueError, TypeError) as exc:
            raise LmvicError(f"transforms.json: frame {name} has no valid transform_matrix ({exc})") from exc
        if c2w.shape != (4, 4) or not np.isfinite(c2w).all():
            raise LmvicError(f"transforms.json: frame {name} has a transform_matrix that is not a finite 4x4 matrix")
        w2c = opengl_c2w_to_opencv_w2c(c2w)
        centres.append(camera_centres(w2c))
        views.append(PosedView(working_name(name), _transforms_camera(meta | frame, scales[name]),
                               tuple(_quaternion_wxyz(w2c[:3, :3])), tuple(w2c[:3, 3])))
    if len(views) < 2:
        raise LmvicError(f"transforms.json names {len(views)} of the images in images/; need at least 2")
    require_parallax(np.stack(centres), "transforms.json")
    return sorted(views, key=lambda v: v.name)


def require_parallax(centres: np.ndarray, source: str, tolerance: float = 1e-6) -> None:
    """``LmvicError`` if the camera centres [V, 3] coincide (all views from one position).

    Without a baseline nothing can be triangulated and depth is undefined; the spread is compared
    with the centres' distance from the origin (``tolerance`` relative, at least absolute).
    """
    spread = float(np.linalg.norm(centres - centres.mean(0), axis=1).max())
    if spread <= tolerance * max(1.0, float(np.linalg.norm(centres, axis=1).max())):
        raise LmvicError(f"{source}: all {len(centres)} cameras are at the same position (no parallax); "
                         "depth cannot be recovered from these views")


def write_posed_model(views: list[PosedView], out: Path,
                      ids: dict[str, tuple[int, int]] | None = None) -> pycolmap.Reconstruction:
    """A COLMAP model without points from posed views; ``ids`` maps a name to its (image id, camera
    id) (default: 1, 2, ... for both, one camera per view)."""
    ids = ids or {v.name: (i + 1, i + 1) for i, v in enumerate(views)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "cameras.txt").write_text("".join(f"{ids[v.name][1]} {v.camera}\n" for v in views))
    (out / "images.txt").write_text("".join(
        f"{ids[v.name][0]} {' '.join(f'{x:.12g}' for x in (*v.qvec, *v.tvec))} {ids[v.name][1]} {v.name}\n\n"
        for v in views))
    (out / "points3D.txt").write_text("")
    return pycolmap.Reconstruction(out)


def _quaternion_wxyz(R: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) of a rotation matrix (Shepperd's method)."""
    m = R
    trace = np.trace(m)
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    else:
        i = int(np.argmax(np.diag(m)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + m[i, i] - m[j, j] - m[k, k])
        q = [0.0] * 4
        q[0] = (m[k, j] - m[j, k]) / s
        q[1 + i] = 0.25 * s
        q[1 + j] = (m[j, i] + m[i, j]) / s
        q[1 + k] = (m[k, i] + m[i, k]) / s
    q = np.asarray(q)
    return q / np.linalg.norm(q)


def triangulate(views: list[PosedView], image_dir: Path, work: Path, config: SfmConfig) -> pycolmap.Reconstruction:
    """3-D points for views with known poses: SIFT matches triangulated with the poses fixed.

    The model is written with the database's image and camera ids (feature extraction numbers them
    in the order its threads finish) and the same camera model, as COLMAP requires.
    """
    database = work / "database.db"
    models = {v.camera.split()[0] for v in views}
    if len(models) != 1:
        raise LmvicError(f"the given cameras mix camera models {sorted(models)}; lmvic expects one")
    _extract_and_match(database, image_dir, [v.name for v in views], config, pycolmap.CameraMode.PER_IMAGE,
                       models.pop())
    with pycolmap.Database.open(database) as db:
        ids = {im.name: (im.image_id, im.camera_id) for im in db.read_all_images()}
    model = write_posed_model(views, work / "posed", ids)
    out = work / "triangulated"
    out.mkdir(parents=True, exist_ok=True)
    return pycolmap.triangulate_points(model, database, image_dir, out, options=_mapper_options(config))


def undistort(model: pycolmap.Reconstruction, image_dir: Path, work: Path, out: Path) -> pycolmap.Reconstruction:
    """Undistort to PINHOLE: writes ``out/images`` and ``out/sparse`` and returns the new model."""
    distorted = work / "distorted"
    distorted.mkdir(parents=True, exist_ok=True)
    model.write(distorted)
    log.info("SfM: undistorting %d images to PINHOLE", model.num_reg_images())
    pycolmap.undistort_images(out, distorted, image_dir)
    shutil.rmtree(out / "stereo", ignore_errors=True)
    for script in out.glob("run-*.sh"):
        script.unlink()
    return pycolmap.Reconstruction(out / "sparse")


def summarize(model: pycolmap.Reconstruction, all_names: list[str], source: str) -> SfmResult:
    """Per-view K, T and sizes from an undistorted model, views in file-name order.

    ``all_names`` are the scene's original file names; the model names their working copies."""
    original = {working_name(n): n for n in all_names}
    by_name = {original[im.name]: im for im in model.images.values() if im.has_pose}
    names = sorted(by_name)
    K, T, sizes = [], [], []
    for name in names:
        image = by_name[name]
        camera = model.cameras[image.camera_id]
        K.append(camera.calibration_matrix())
        w2c = np.eye(4)
        w2c[:3] = image.cam_from_world().matrix()
        T.append(w2c)
        sizes.append((camera.width, camera.height))
    points = model.points3D
    xyz = np.array([p.xyz for p in points.values()], dtype=np.float64).reshape(-1, 3)
    rgb = np.array([p.color for p in points.values()], dtype=np.uint8).reshape(-1, 3)
    excluded = [n for n in all_names if n not in by_name]
    return SfmResult(names, sizes, np.array(K), np.array(T), xyz, rgb, excluded, source)
