"""2-D alignment baselines for the alignment comparison (the paper's Table 2).

Each method estimates, for every target pixel centre, the continuous position in the reference
image that shows the same content (the pixel convention of :mod:`geometry.warp`: centres at
u + 0.5). :func:`align` turns those positions into a warped reference and a valid mask (position
inside the reference image) with the same bilinear sampler as the depth-based warp, so every
method is resampled identically.

- ``homography``: SIFT features, Lowe ratio test, RANSAC homography (OpenCV). Fewer than
  ``MIN_MATCHES`` good matches or a failed fit leaves no valid pixel (a warning says why).
- ``dis``: OpenCV DIS dense optical flow (preset MEDIUM) from target to reference.
- ``farneback``: OpenCV Farnebäck dense optical flow from target to reference.

OpenCV puts pixel centres at integer coordinates; positions are shifted by 0.5 on the way in and
out (flows are differences, so they need no shift).
"""

from __future__ import annotations

import warnings
from typing import Callable

import cv2
import numpy as np
import torch

from geometry.warp import inside, pixel_centres, sample

MIN_MATCHES = 12
RATIO = 0.75
RANSAC_PX = 3.0


def _gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)


def _grid(height: int, width: int) -> np.ndarray:
    """[H, W, 2] float64 pixel centres (x, y)."""
    return pixel_centres(height, width, torch.empty(0, dtype=torch.float64)).numpy()


def homography_positions(target: np.ndarray, reference: np.ndarray) -> np.ndarray | None:
    """Reference positions [H, W, 2] of the target pixels under a RANSAC homography, or None."""
    sift = cv2.SIFT_create(nfeatures=8000)
    kp_t, des_t = sift.detectAndCompute(_gray(target), None)
    kp_r, des_r = sift.detectAndCompute(_gray(reference), None)
    if des_t is None or des_r is None or len(kp_t) < 2 or len(kp_r) < 2:
        warnings.warn("homography: too few SIFT features")
        return None
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(des_t, des_r, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
    if len(good) < MIN_MATCHES:
        warnings.warn(f"homography: only {len(good)} good SIFT matches (< {MIN_MATCHES})")
        return None
    pts_t = np.float64([kp_t[m.queryIdx].pt for m in good])
    pts_r = np.float64([kp_r[m.trainIdx].pt for m in good])
    Hm, _ = cv2.findHomography(pts_t, pts_r, cv2.RANSAC, RANSAC_PX)  # target -> reference
    if Hm is None:
        warnings.warn("homography: RANSAC found no model")
        return None
    h, w = target.shape[:2]
    grid = _grid(h, w) - 0.5  # OpenCV coordinates
    mapped = np.concatenate([grid, np.ones_like(grid[..., :1])], -1) @ Hm.T
    z = mapped[..., 2:]
    with np.errstate(divide="ignore", invalid="ignore"):
        pos = np.where(np.abs(z) > 1e-12, mapped[..., :2] / z, np.nan) + 0.5
    return pos


def _flow_positions(flow: np.ndarray) -> np.ndarray:
    h, w = flow.shape[:2]
    return _grid(h, w) + flow


def dis_positions(target: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Reference positions [H, W, 2] from DIS optical flow (target → reference)."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return _flow_positions(dis.calc(_gray(target), _gray(reference), None))


def farneback_positions(target: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Reference positions [H, W, 2] from Farnebäck optical flow (target → reference)."""
    flow = cv2.calcOpticalFlowFarneback(
        _gray(target), _gray(reference), None,
        pyr_scale=0.5, levels=6, winsize=21, iterations=5, poly_n=7, poly_sigma=1.5, flags=0,
    )
    return _flow_positions(flow)


METHODS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray | None]] = {
    "homography": homography_positions,
    "dis": dis_positions,
    "farneback": farneback_positions,
}


def warp_to_positions(reference: np.ndarray, positions: np.ndarray | None, size: tuple[int, int]):
    """Bilinear samples of ``reference`` [Hr, Wr, 3] uint8 at ``positions`` [H, W, 2].

    Returns:
        (warped [H, W, 3] float32 in [0, 1], valid [H, W] bool: position inside the reference).
        ``positions=None`` (a failed method) gives zeros and no valid pixel.
    """
    h, w = size
    if positions is None:
        return np.zeros((h, w, 3), np.float32), np.zeros((h, w), bool)
    ref = torch.tensor(np.asarray(reference), dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
    pos = torch.from_numpy(np.asarray(positions, np.float32))[None]
    warped = sample(ref, pos)[0].permute(1, 2, 0).numpy()
    valid = (inside(pos, *reference.shape[:2]) & torch.isfinite(pos).all(-1))[0].numpy()
    return warped, valid


def align(method: str, target: np.ndarray, reference: np.ndarray):
    """Warp ``reference`` onto ``target`` (both uint8 RGB [H, W, 3]) with a 2-D baseline.

    Returns:
        (warped [H, W, 3] float32 in [0, 1], valid [H, W] bool).
    """
    if method not in METHODS:
        raise ValueError(f"unknown alignment method {method!r}; known: {', '.join(METHODS)}")
    source = reference
    if method != "homography" and target.shape != reference.shape:
        # dense flow needs one size: the reference on a canvas of the target's size, anchored at the
        # top-left corner (so canvas pixels are reference pixels); positions off the reference are invalid
        source = np.zeros_like(target)
        h, w = min(target.shape[0], reference.shape[0]), min(target.shape[1], reference.shape[1])
        source[:h, :w] = reference[:h, :w]
    return warp_to_positions(reference, METHODS[method](target, source), target.shape[:2])
