"""``lmvic inspect``: pictures of stage one and two a person can look at, and an index page.

For every view (``OUT/views/<view>/``): ``depth.png`` (median and mean depth, colour-mapped, one
colour bar; no-depth pixels black). For every view with a reference, per depth kind:
``mask_<kind>.png`` (the image, untrusted pixels tinted red), ``warped_<kind>.png`` (the reference
warped onto this view with that depth; untrusted pixels as they come), ``error.png`` (absolute
error |target − warped| averaged over RGB, inside the mask, both kinds, one colour bar) and
``sheet.png`` (a contact sheet of the pair). ``OUT/cameras.png``: camera positions seen from above
(projected on the plane orthogonal to the mean camera up vector) with the coding order drawn as a
path. ``OUT/index.html`` links everything.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from geometry.cameras import camera_centres
from pipelines.relations import DEPTH_KINDS, Views, warp_views

ERROR_MAX = 64.0  # colour-bar top of the error maps, in 8-bit levels
TINT = np.array([255, 40, 40], np.float32)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def mask_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]: ``image`` with pixels outside ``mask`` blended half-way to red."""
    out = image.astype(np.float32)
    out[~mask] = 0.5 * out[~mask] + 0.5 * TINT
    return out.astype(np.uint8)


def abs_error(target: np.ndarray, warped: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float [H, W]: mean absolute RGB error in 8-bit levels inside ``mask``, NaN outside."""
    err = np.abs(target.astype(np.float32) - warped.astype(np.float32)).mean(-1)
    return np.where(mask, err, np.nan)


def _depth_range(depths: Sequence[np.ndarray]) -> tuple[float, float]:
    valid = np.concatenate([d[np.isfinite(d) & (d > 0)] for d in depths])
    if valid.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(valid, [2, 98])
    return float(lo), float(max(hi, lo + 1e-6))


def _panels(path: Path, panels: list[tuple[str, np.ndarray, dict]], colorbar: str | None = None,
            columns: int | None = None) -> None:
    """A row (or grid) of images with titles; ``colorbar`` labels one shared bar of the last
    colour-mapped panel. Each panel: (title, array, imshow keywords)."""
    plt = _plt()
    columns = columns or len(panels)
    rows = -(-len(panels) // columns)
    h, w = panels[0][1].shape[:2]
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns + (0.8 if colorbar else 0),
                                                     3.2 * rows * h / w + 0.5), squeeze=False)
    mappable = None
    for ax, (title, img, kw) in zip(axes.flat, panels):
        shown = ax.imshow(img, **kw)
        if "cmap" in kw:
            mappable = shown
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if colorbar and mappable is not None:
        fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.8, label=colorbar)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _depth_kw(lo: float, hi: float) -> dict:
    plt = _plt()
    cmap = plt.get_cmap("turbo").with_extremes(bad="black")
    return {"cmap": cmap, "vmin": lo, "vmax": hi}


def _error_kw() -> dict:
    plt = _plt()
    cmap = plt.get_cmap("magma").with_extremes(bad=(0.5, 0.5, 0.5))
    return {"cmap": cmap, "vmin": 0.0, "vmax": ERROR_MAX}


def _masked_depth(depth: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(depth) & (depth > 0), depth, np.nan)


def top_down_axes(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two orthonormal world directions spanning the plane orthogonal to the mean camera up."""
    up = -T[:, 1, :3].mean(0)  # camera y points down; rows of R are camera axes in world coords
    up = up / max(np.linalg.norm(up), 1e-12)
    forward = T[:, 2, :3].mean(0)
    a = forward - up * (forward @ up)
    if np.linalg.norm(a) < 1e-9:
        a = np.cross(up, [1.0, 0.0, 0.0]) if abs(up[0]) < 0.9 else np.cross(up, [0.0, 1.0, 0.0])
    a = a / np.linalg.norm(a)
    return np.cross(up, a), a


def camera_plot(views: Views, order: Sequence[int], path: Path) -> None:
    """Top-down plot of camera centres and viewing directions, coding order as a path."""
    plt = _plt()
    T = np.asarray(views.T, np.float64)
    centres = camera_centres(T)
    ex, ey = top_down_axes(T)
    xy = np.stack([centres @ ex, centres @ ey], -1)
    look = np.stack([T[:, 2, :3] @ ex, T[:, 2, :3] @ ey], -1)
    spread = max(np.ptp(xy, axis=0).max(), 1e-6)
    fig, ax = plt.subplots(figsize=(7, 7))
    path_xy = xy[list(order)]
    ax.plot(path_xy[:, 0], path_xy[:, 1], "-", color="tab:blue", lw=1.2, label="coding order")
    ax.quiver(xy[:, 0], xy[:, 1], look[:, 0], look[:, 1], angles="xy", scale_units="xy",
              scale=1 / (0.06 * spread), width=0.003, color="tab:gray", label="viewing direction")
    ax.scatter(xy[:, 0], xy[:, 1], s=14, color="tab:blue", zorder=3)
    ax.scatter(*path_xy[0], s=90, marker="*", color="tab:red", zorder=4, label=f"start {views.names[order[0]]}")
    step = max(1, len(order) // 25)
    for rank, i in enumerate(order):
        if rank % step == 0 or rank == len(order) - 1:
            ax.annotate(f"{rank}:{views.names[i]}", xy[i], fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_aspect("equal")
    ax.set_title("cameras from above (plane orthogonal to the mean up vector)")
    ax.legend(fontsize=7, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def view_pictures(views: Views, target: int, reference: int | None, relations, out: Path) -> dict[str, str]:
    """Write one view's pictures into ``out``; returns {label: file name}."""
    files = {}
    depths = [views.depth(kind, target) for kind in DEPTH_KINDS]
    kw = _depth_kw(*_depth_range(depths))
    _panels(out / "depth.png", [(f"{kind} depth", _masked_depth(d), kw) for kind, d in zip(DEPTH_KINDS, depths)],
            colorbar="depth (camera z, SfM units)")
    files["depth"] = "depth.png"
    if reference is None:
        return files
    image, ref_image = views.image(target), views.image(reference)
    sheet = [("target " + views.names[target], image, {}), ("reference " + views.names[reference], ref_image, {})]
    errors = []
    for kind in DEPTH_KINDS:
        _, mask = relations.load(kind, views.names[target])
        warped, _ = warp_views(views, kind, target, reference, relations.info["tau"])
        warped8 = np.clip(np.round(warped * 255), 0, 255).astype(np.uint8)
        overlay = mask_overlay(image, mask)
        save_png(out / f"mask_{kind}.png", overlay)
        save_png(out / f"warped_{kind}.png", warped8)
        files[f"mask ({kind})"] = f"mask_{kind}.png"
        files[f"warped reference ({kind})"] = f"warped_{kind}.png"
        err = abs_error(image, warped8, mask)
        errors.append((f"|error| {kind} (mean {np.nanmean(err) if mask.any() else float('nan'):.1f})", err, _error_kw()))
        sheet += [(f"mask {kind} ({100 * mask.mean():.0f}% trusted)", overlay, {}),
                  (f"warped {kind}", warped8, {})]
    _panels(out / "error.png", errors, colorbar="mean |RGB error| (8-bit levels)")
    files["error"] = "error.png"
    sheet += errors
    _panels(out / "sheet.png", sheet, colorbar="mean |RGB error| (8-bit levels)", columns=4)
    files["contact sheet"] = "sheet.png"
    return files


def write_index(out: Path, views: Views, order: Sequence[int], refs: dict, pictures: dict[int, dict[str, str]]) -> None:
    rows = []
    for rank, i in enumerate(order):
        name = views.names[i]
        ref = refs.get(i)
        links = " ".join(
            f'<a href="views/{html.escape(name)}/{f}"><img src="views/{html.escape(name)}/{f}" '
            f'title="{html.escape(label)}" height="120"></a>'
            for label, f in pictures[i].items())
        rows.append(f"<tr><td>{rank}</td><td>{html.escape(name)}</td>"
                    f"<td>{html.escape(views.names[ref]) if ref is not None else '—'}</td><td>{links}</td></tr>")
    page = ("<!doctype html><meta charset='utf-8'><title>lmvic inspect</title>"
            "<h1>lmvic inspect</h1><p><a href='cameras.png'><img src='cameras.png' height='360'></a></p>"
            "<table border='1' cellpadding='4'><tr><th>#</th><th>view</th><th>reference</th><th>pictures</th></tr>"
            + "".join(rows) + "</table>\n")
    (out / "index.html").write_text(page, encoding="utf-8")


def inspect_report(views: Views, relations, out: Path, progress=None) -> Path:
    """Write every picture and ``index.html`` into ``out``; returns the index path.

    ``relations`` is a :class:`pipelines.relations.StoredRelations`.
    """
    out = Path(out)
    info = relations.info
    index = {n: i for i, n in enumerate(views.names)}
    order = [index[n] for n in info["order"]]
    refs = {index[v]: (index[r] if r is not None else None) for v, r in info["references"].items()}
    camera_plot(views, order, out / "cameras.png")
    pictures = {}
    for i in (progress(order) if progress else order):
        pictures[i] = view_pictures(views, i, refs[i], relations, out / "views" / views.names[i])
    write_index(out, views, order, refs, pictures)
    return out / "index.html"
