"""Camera conventions, in one place.

lmvic stores every camera the COLMAP/OpenCV way:

* intrinsics ``K`` [..., 3, 3] in pixels; continuous pixel coordinates with the centre of pixel
  (column u, row v) at (u + 0.5, v + 0.5), as COLMAP and gsplat use;
* extrinsics ``T`` [..., 4, 4] world-to-camera, camera axes x right, y down, z forward;
* depth is the camera z coordinate (not the ray length); 0 marks "no depth".

nerfstudio / instant-ngp / Blender (OpenGL) store camera-to-world matrices with y up and z backward.
``opengl_c2w_to_opencv_w2c`` and ``opencv_w2c_to_opengl_c2w`` convert between the two.
"""
from __future__ import annotations

import numpy as np

# Flips the camera's y and z axes: OpenGL camera frame <-> OpenCV camera frame (its own inverse).
_FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])


def invert_rigid(T: np.ndarray) -> np.ndarray:
    """Inverse of rigid transforms [..., 4, 4] (rotation + translation), computed exactly."""
    R = T[..., :3, :3]
    t = T[..., :3, 3:]
    out = np.zeros_like(T)
    Rt = np.swapaxes(R, -1, -2)
    out[..., :3, :3] = Rt
    out[..., :3, 3:] = -Rt @ t
    out[..., 3, 3] = 1.0
    return out


def opengl_c2w_to_opencv_w2c(c2w_gl: np.ndarray) -> np.ndarray:
    """OpenGL camera-to-world [..., 4, 4] -> OpenCV world-to-camera [..., 4, 4]."""
    return invert_rigid(c2w_gl @ _FLIP_YZ)


def opencv_w2c_to_opengl_c2w(w2c_cv: np.ndarray) -> np.ndarray:
    """OpenCV world-to-camera [..., 4, 4] -> OpenGL camera-to-world [..., 4, 4]."""
    return invert_rigid(w2c_cv) @ _FLIP_YZ


def intrinsics(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """The 3x3 pinhole matrix."""
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def scale_intrinsics(K: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """K [..., 3, 3] for an image resized by (sx, sy); exact for the pixel-centre-at-0.5 convention."""
    out = np.array(K, dtype=np.float64, copy=True)
    out[..., 0, :] *= sx
    out[..., 1, :] *= sy
    return out


def crop_intrinsics(K: np.ndarray, x0: float, y0: float) -> np.ndarray:
    """K [..., 3, 3] for the crop whose top-left corner is at pixel (x0, y0) of the original."""
    out = np.array(K, dtype=np.float64, copy=True)
    out[..., 0, 2] -= x0
    out[..., 1, 2] -= y0
    return out


def camera_centres(T: np.ndarray) -> np.ndarray:
    """World positions [..., 3] of the cameras with world-to-camera ``T`` [..., 4, 4]."""
    return invert_rigid(T)[..., :3, 3]


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray = np.array([0.0, -1.0, 0.0])) -> np.ndarray:
    """World-to-camera [4, 4] (OpenCV axes) of a camera at ``eye`` looking at ``target``.

    ``up`` is the world direction that appears at the top of the image (OpenCV's y points down,
    so the camera's y axis is built from ``-up``).
    """
    z = np.asarray(target, float) - np.asarray(eye, float)
    z /= np.linalg.norm(z)
    x = np.cross(-np.asarray(up, float), z)
    norm = np.linalg.norm(x)
    if norm < 1e-9:
        raise ValueError("look_at: the viewing direction is parallel to the up vector")
    x /= norm
    y = np.cross(z, x)
    R = np.stack([x, y, z])  # rows: camera axes in world coordinates
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = -R @ np.asarray(eye, float)
    return T
