"""Per-view depth from fitted Gaussians: median and mean depth (camera z) with validity masks.

* median depth: z of the first Gaussian (front to back) after which the transmittance drops below
  0.5; invalid (0) where it never does.
* mean depth: sum_k z_k a_k T_k / sum_k a_k T_k (3DGS's expected depth); valid where the
  accumulated alpha is at least ``mean_min_alpha`` (default 0.5, the median's coverage rule).

Also a colour-map helper that writes a PNG with a colour bar (matplotlib, atomic write).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from geometry.gaussian_fit import Gaussians, render


@torch.no_grad()
def render_depths(
    gaussians: Gaussians,
    Ks: Tensor | np.ndarray,  # [C, 3, 3] at (width, height)
    viewmats: Tensor | np.ndarray,  # [C, 4, 4] world-to-camera
    width: int,
    height: int,
    mean_min_alpha: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(median [C,H,W], mean [C,H,W], median_valid [C,H,W] bool, mean_valid [C,H,W] bool), float32.

    Views are rendered one at a time (bounded memory); invalid pixels hold 0.
    """
    Ks = torch.as_tensor(np.asarray(Ks) if not isinstance(Ks, Tensor) else Ks).float()
    viewmats = torch.as_tensor(np.asarray(viewmats) if not isinstance(viewmats, Tensor) else viewmats).float()
    medians, means, alphas = [], [], []
    for i in range(len(Ks)):
        depth, alpha, meta = render(gaussians, Ks[i:i + 1], viewmats[i:i + 1], width, height, render_mode="ED")
        medians.append(meta["median_depths"][0, ..., 0])
        means.append(depth[0, ..., 0])
        alphas.append(alpha[0, ..., 0])
    median, mean, alpha = torch.stack(medians), torch.stack(means), torch.stack(alphas)
    median_valid = median > 0
    mean_valid = (alpha >= mean_min_alpha) & (mean > 0)
    return median * median_valid, mean * mean_valid, median_valid, mean_valid


def save_depth_png(
    path: str | Path,
    depth: np.ndarray | Tensor,  # [H, W]
    valid: np.ndarray | Tensor,  # [H, W] bool
    vmin: float | None = None,
    vmax: float | None = None,
    title: str | None = None,
    cmap: str = "turbo",
) -> None:
    """Colour-mapped depth with a colour bar (camera z); invalid pixels black. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = np.asarray(depth, dtype=np.float32)
    valid = np.asarray(valid, dtype=bool)
    values = depth[valid]
    lo = vmin if vmin is not None else (float(np.percentile(values, 1)) if values.size else 0.0)
    hi = vmax if vmax is not None else (float(np.percentile(values, 99)) if values.size else 1.0)
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="black")
    h, w = depth.shape
    fig, ax = plt.subplots(figsize=(6.0 * w / max(h, w) + 1.2, 6.0 * h / max(h, w)), dpi=max(100, w // 5))
    im = ax.imshow(np.ma.masked_where(~valid, depth), cmap=colormap, vmin=lo, vmax=max(hi, lo + 1e-6),
                   interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="depth (camera z)")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
