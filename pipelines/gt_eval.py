"""Accuracy of stage one against a scene's ground truth (``gt/cameras.json`` + ``depth_gt/``).

SfM recovers cameras up to a similarity; the reconstructed camera centres are aligned to the true
ones (Umeyama), which fixes the scale used to compare depth. Depth metrics use the pixels where
both the estimate and the ground truth have depth: AbsRel = mean |d - d*| / d*, δ<1.05 = fraction
with max(d/d*, d*/d) < 1.05.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from geometry.cameras import camera_centres
from geometry.similarity import umeyama
from pipelines.cache import read_json
from pipelines.errors import LmvicError
from pipelines.geometry_stage import DEPTH_KINDS, load_cameras, load_depth


def geometry_accuracy(scene_root: Path, work_dir: Path) -> dict:
    """Camera-centre error (relative to the camera spread) and depth accuracy per depth kind."""
    gt_path = Path(scene_root) / "gt" / "cameras.json"
    if not gt_path.is_file():
        raise LmvicError(f"{scene_root} has no gt/cameras.json")
    gt = {v["name"]: v for v in read_json(gt_path)["views"]}
    cams = load_cameras(Path(work_dir) / "sfm")
    names = [n for n in cams.names if n in gt]
    est_c = camera_centres(cams.T[[cams.names.index(n) for n in names]])
    gt_c = camera_centres(np.array([gt[n]["T"] for n in names]))
    s, R, t = umeyama(est_c, gt_c)
    err = np.linalg.norm(s * est_c @ R.T + t - gt_c, axis=1)
    spread = np.linalg.norm(gt_c - gt_c.mean(0), axis=1).max()
    out = {"views": len(names), "camera_centre_error_rel": float(err.mean() / spread), "scale": s}
    for kind in DEPTH_KINDS:
        ratios, valid_frac = [], []
        for name in names:
            est = load_depth(Path(work_dir) / "depth", kind, name) * s
            ref = np.load(Path(scene_root) / "depth_gt" / f"{Path(name).stem}.npy")
            if est.shape != ref.shape:
                raise LmvicError(f"depth of {name} is {est.shape}, ground truth {ref.shape}: compare at the same size")
            both = (est > 0) & (ref > 0)
            ratios.append(est[both] / ref[both])
            valid_frac.append(float((est > 0).mean()))
        r = np.concatenate(ratios)
        out[kind] = {"abs_rel": float(np.abs(r - 1).mean()), "delta_1.05": float((np.maximum(r, 1 / r) < 1.05).mean()),
                     "valid_fraction": float(np.mean(valid_frac))}
    return out
