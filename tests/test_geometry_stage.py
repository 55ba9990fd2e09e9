"""Stage one end to end on the synthetic scene: real pycolmap SfM, the CPU 3DGS fit and depth,
checked against the scene's ground truth (cameras and per-pixel depth)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from geometry.ply import read_ply
from pipelines.geometry_stage import load_cameras, load_depth
from pipelines.gt_eval import geometry_accuracy
from pipelines.scene import load_scene
from pipelines.stages import default_configs, run, select


@pytest.mark.slow
def test_geometry_stage_matches_ground_truth(small_scene, small_scene_work):
    scene = load_scene(small_scene)
    configs = default_configs()
    configs["splat"] = dataclasses.replace(configs["splat"], iterations=400)
    results = run(scene, small_scene_work, configs, select(["geometry"]), quiet=True)
    assert [r.name for r in results] == ["sfm", "splat", "depth"]
    cams = load_cameras(small_scene_work / "sfm")
    assert len(cams) == 10
    assert len(read_ply(small_scene_work / "splat" / "gaussians.ply")) > 1000
    depth = load_depth(small_scene_work / "depth", "median", cams.names[0])
    assert depth.shape == cams.load_images()[0].shape[:2]
    acc = geometry_accuracy(small_scene, small_scene_work)
    assert acc["camera_centre_error_rel"] < 0.01
    assert acc["median"]["abs_rel"] < 0.06 and acc["median"]["valid_fraction"] > 0.9
    again = run(scene, small_scene_work, configs, select(["geometry"]), quiet=True)
    assert not any(r.ran for r in again)
