"""A scene that brings ``transforms.json``: its poses are kept and points triangulated with them.

The synthetic scene's ground-truth cameras are written as instant-ngp's transforms.json (OpenGL
camera-to-world); the sfm stage must use them unchanged (no SfM) and triangulate points that lie
on the ground-truth surface.
"""
from __future__ import annotations

import json
import shutil

import numpy as np

from geometry.cameras import opencv_w2c_to_opengl_c2w
from pipelines.geometry_stage import load_cameras
from pipelines.scene import load_scene
from pipelines.stages import default_configs, run, select


def test_transforms_json_poses_are_kept_and_points_lie_on_the_surface(small_scene, tmp_path):
    root = tmp_path / "scene"
    shutil.copytree(small_scene / "images", root / "images")
    gt = json.loads((small_scene / "gt" / "cameras.json").read_text())["views"]
    K = np.array(gt[0]["K"])
    (root / "transforms.json").write_text(json.dumps({
        "w": gt[0]["width"], "h": gt[0]["height"], "fl_x": K[0, 0], "fl_y": K[1, 1], "cx": K[0, 2], "cy": K[1, 2],
        # listed in reverse name order, with a frame whose image is absent (as instant-ngp's fox has)
        "frames": [{"file_path": f"images/{v['name']}", "transform_matrix": opencv_w2c_to_opengl_c2w(np.array(v["T"])).tolist()}
                   for v in reversed(gt)] + [{"file_path": "images/missing.png", "transform_matrix": np.eye(4).tolist()}],
    }))
    scene = load_scene(root)
    work = tmp_path / "work"
    run(scene, work, default_configs(), select(["sfm"]), quiet=True)

    info = json.loads((work / "sfm" / "cameras.json").read_text())
    assert info["source"] == "transforms.json"
    cams = load_cameras(work / "sfm")
    assert cams.names == [v["name"] for v in gt]
    np.testing.assert_allclose(cams.T, np.array([v["T"] for v in gt]), atol=1e-6)
    np.testing.assert_allclose(cams.K, np.broadcast_to(K, cams.K.shape), atol=1e-3)

    xyz = np.load(work / "sfm" / "points.npz")["xyz"]
    assert len(xyz) > 200
    # every point seen in front of view 0 and inside it lies on the ground-truth depth there
    T0 = cams.T[0]
    cam = xyz @ T0[:3, :3].T + T0[:3, 3]
    uv = cam[:, :2] / cam[:, 2:] @ K[:2, :2].T + K[:2, 2]
    inside = (cam[:, 2] > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < gt[0]["width"]) & (uv[:, 1] >= 0) & (uv[:, 1] < gt[0]["height"])
    depth_gt = np.load(small_scene / "depth_gt" / f"{gt[0]['name'][:-4]}.npy")
    px = np.floor(uv[inside]).astype(int)
    rel = np.abs(cam[inside, 2] / depth_gt[px[:, 1], px[:, 0]] - 1)
    assert inside.sum() > 100
    assert np.median(rel) < 0.01  # points behind an occluder from view 0 make the tail, not the median
