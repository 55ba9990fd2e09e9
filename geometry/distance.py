"""Distance between camera views: ``d(i, j) = ‖T_j T_i⁻¹ − I‖_F`` (3D-LMVIC, section 3.2.3).

``T`` are world-to-camera extrinsics [4, 4]. ``T_j T_i⁻¹`` maps camera i's frame to camera j's, so
the distance is zero for identical poses and grows with the relative rotation and translation;
for rigid poses it is a metric (the paper's Appendix C). Translation is in the scene's (SfM) units,
so distances are comparable within one scene only.
"""

from __future__ import annotations

import numpy as np
import torch


def view_distances(world_to_cam: torch.Tensor | np.ndarray) -> torch.Tensor:
    """All pairwise distances ``D[i, j] = ‖T_j T_i⁻¹ − I‖_F``.

    Args:
        world_to_cam: [N, 4, 4] world-to-camera extrinsics.

    Returns:
        [N, N] float64 matrix with an exactly zero diagonal.
    """
    T = torch.as_tensor(world_to_cam, dtype=torch.float64)
    if T.ndim != 3 or T.shape[-2:] != (4, 4):
        raise ValueError(f"expected extrinsics of shape [N, 4, 4], got {tuple(T.shape)}")
    relative = T[None, :, :, :] @ torch.linalg.inv(T)[:, None, :, :]  # [i, j] = T_j T_i⁻¹
    eye = torch.eye(4, dtype=torch.float64)
    D = torch.linalg.matrix_norm(relative - eye, ord="fro")
    D.fill_diagonal_(0.0)
    return D
