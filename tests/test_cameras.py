"""Camera conventions: OpenCV <-> OpenGL round trips and the pinhole helpers, on random poses."""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from geometry.cameras import (camera_centres, crop_intrinsics, intrinsics, invert_rigid, look_at,
                              opencv_w2c_to_opengl_c2w, opengl_c2w_to_opencv_w2c, scale_intrinsics)


def random_poses(n, seed=0):
    rng = np.random.default_rng(seed)
    T = np.tile(np.eye(4), (n, 1, 1))
    T[:, :3, :3] = Rotation.random(n, random_state=seed).as_matrix()
    T[:, :3, 3] = rng.normal(size=(n, 3)) * 3
    return T


def test_invert_rigid_is_the_matrix_inverse():
    T = random_poses(16)
    np.testing.assert_allclose(invert_rigid(T), np.linalg.inv(T), atol=1e-12)


def test_opengl_opencv_round_trips_both_ways():
    T = random_poses(16, seed=1)
    np.testing.assert_allclose(opengl_c2w_to_opencv_w2c(opencv_w2c_to_opengl_c2w(T)), T, atol=1e-12)
    np.testing.assert_allclose(opencv_w2c_to_opengl_c2w(opengl_c2w_to_opencv_w2c(T)), T, atol=1e-12)


def test_opengl_camera_looks_down_its_negative_z():
    """A point straight ahead of an OpenGL camera (-z in its frame) has positive OpenCV depth, and a
    point above it (+y) projects above the image centre (smaller OpenCV v)."""
    c2w_gl = random_poses(1, seed=2)[0]
    ahead = c2w_gl @ np.array([0, 0, -2.0, 1])
    above = c2w_gl @ np.array([0, 1.0, -2.0, 1])
    w2c = opengl_c2w_to_opencv_w2c(c2w_gl)
    assert (w2c @ ahead)[2] == pytest.approx(2.0)
    assert (w2c @ above)[1] == pytest.approx(-1.0)
    np.testing.assert_allclose(camera_centres(w2c), c2w_gl[:3, 3], atol=1e-12)


def test_look_at_puts_the_target_on_the_optical_axis_with_up_at_the_top():
    eye, target = np.array([3.0, 1.0, 4.0]), np.array([0.0, 0.5, 0.0])
    T = look_at(eye, target, up=np.array([0.0, 1.0, 0.0]))
    p = T @ np.append(target, 1)
    np.testing.assert_allclose(p[:2], 0, atol=1e-12)
    assert p[2] == pytest.approx(np.linalg.norm(target - eye))
    assert (T @ np.array([*(target + [0, 1, 0]), 1]))[1] < 0  # world up appears above the centre
    np.testing.assert_allclose(camera_centres(T), eye, atol=1e-12)


def test_scale_and_crop_intrinsics_follow_pixel_centres():
    """A world point projects to the same place in continuous pixel coordinates after a resize
    (scaled) and a crop (shifted), with pixel centres at +0.5."""
    K = intrinsics(500.0, 480.0, 320.0, 240.0)
    X = np.array([0.3, -0.2, 2.0])
    x = K @ X / X[2]
    xs = scale_intrinsics(K, 0.5, 0.25) @ X / X[2]
    np.testing.assert_allclose(xs[:2], x[:2] * [0.5, 0.25])
    xc = crop_intrinsics(K, 100, 40) @ X / X[2]
    np.testing.assert_allclose(xc[:2], x[:2] - [100, 40])
    # the centre of pixel 0 (0.5) of a 2x downscale covers original pixels 0 and 1 (centres 0.5, 1.5)
    assert (0.5 + 1.5) / 2 * 0.5 == pytest.approx(0.5)
