"""Stage two, relations between views: distances, coding order, disparity and trust masks.

:func:`write_relations` is a pure function of its inputs (cameras, depth maps, config) that writes
the stage's files; :func:`run` is the stage-runner entry point that reads stage one's outputs.
Formulas and multi-scale rules: :mod:`geometry.warp`. Files written (``WORK/relations/``)::

    distances.npy              float64 [N, N], d(i, j) = ‖T_j T_i⁻¹ − I‖_F, rows in scene order
    order.json                 {"names": scene order, "order": coding order,
                                "references": {view: its reference or null}, "tau": τ,
                                "factors": [1, 2, 4, 8, 16], "trusted": {kind: {view: fraction}}}
    <kind>/<view>.npz          for every view with a reference, kind in (median, mean):
                               disparity_<f> float32 [2, ceil(H/f), ceil(W/f)] (pixels at 1/f),
                               mask_<f> (f = 1: bool [H, W]; f > 1: float32 trusted fraction)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from geometry.distance import view_distances
from geometry.ordering import OrderError, references, resolve_order
from geometry.warp import Relation, backward_warp, multiscale, relate
from pipelines.cache import atomic_save_npy, atomic_write_bytes, atomic_write_json, read_json, read_meta
from pipelines.errors import LmvicError

log = logging.getLogger(__name__)

DEPTH_KINDS = ("median", "mean")


@dataclass(frozen=True)
class RelationsConfig:
    tau: float = field(default=0.02, metadata={"help": "relative occlusion tolerance τ of the trust mask"})
    order: str = field(default="greedy", metadata={
        "help": "coding order: greedy, sorted, random, or a text file naming every view once",
        "file_content": True})  # the file's content is part of the cache key
    start: str | None = field(default=None, metadata={
        "help": "first view of the greedy order (default: the first by file name)"})
    seed: int = field(default=0, metadata={"help": "seed of the random order"})
    coarsest: int = field(default=16, metadata={
        "help": "coarsest scale factor; disparity and masks are stored at 1, 2, 4, ... up to it"})


def scale_factors(coarsest: int) -> tuple[int, ...]:
    """(1, 2, 4, ..., coarsest); ``coarsest`` must be a power of two."""
    if coarsest < 1 or coarsest & (coarsest - 1):
        raise LmvicError(f"relations.coarsest must be a power of two, got {coarsest}")
    return tuple(2**k for k in range(coarsest.bit_length()))


@dataclass(frozen=True)
class Views:
    """Stage two's inputs: cameras and a depth loader, in scene order.

    names: N view names. K: [N, 3, 3]. T: [N, 4, 4] world-to-camera.
    depth: (kind, index) -> float32 [H, W] camera-z depth, 0 where invalid.
    image: index -> uint8 [H, W, 3] RGB of the same size as the depth (inspection, comparison).
    """

    names: Sequence[str]
    K: np.ndarray
    T: np.ndarray
    depth: Callable[[str, int], np.ndarray]
    image: Callable[[int], np.ndarray] | None = None


def stage_views(work_dir: Path) -> Views:
    """Views from stage one's outputs: ``sfm/cameras.json`` (K, T, working images) and the depth
    stage's per-view median and mean depth."""
    from pipelines.geometry_stage import load_cameras, load_depth
    from pipelines.scene import read_image

    work_dir = Path(work_dir)
    for stage in ("sfm", "depth"):
        if read_meta(work_dir / stage) is None:
            raise LmvicError(f"no {stage} results in {work_dir}; run `lmvic run SCENE --stages geometry` first")
    cams = load_cameras(work_dir / "sfm")
    return Views(names=cams.names, K=cams.K, T=cams.T,
                 depth=lambda kind, i: load_depth(work_dir / "depth", kind, cams.names[i]),
                 image=lambda i: read_image(cams.images[i]))


def views_from_ground_truth(scene_root: Path) -> Views:
    """Views of a scene with ground truth (``gt/cameras.json`` + ``depth_gt/<stem>.npy``, as the
    synthetic scene writes them); both depth kinds are the ground-truth depth."""
    from pipelines.scene import read_image

    root = Path(scene_root)
    cams = read_json(root / "gt" / "cameras.json")["views"]
    names = [c["name"] for c in cams]
    return Views(
        names=names,
        K=np.array([c["K"] for c in cams], np.float64),
        T=np.array([c["T"] for c in cams], np.float64),
        depth=lambda kind, i: np.load(root / "depth_gt" / f"{Path(names[i]).stem}.npy"),
        image=lambda i: read_image(root / "images" / names[i]),
    )


def coding_order(views: Views, config: RelationsConfig) -> tuple[np.ndarray, list[int]]:
    """(distance matrix [N, N], coding order as indices)."""
    distances = view_distances(views.T)
    try:
        order = resolve_order(list(views.names), distances, config.order, config.start, config.seed)
    except OrderError as exc:
        raise LmvicError(str(exc)) from None
    return distances.numpy(), order


def _batch(x) -> torch.Tensor:
    """[1, ...] float32 tensor (a copy) of an array."""
    return torch.tensor(np.asarray(x), dtype=torch.float32)[None]


def relate_views(views: Views, kind: str, target: int, reference: int, tau: float) -> Relation:
    """:func:`geometry.warp.relate` from view ``target`` to view ``reference`` with ``kind`` depth."""
    return relate(_batch(views.depth(kind, target)), _batch(views.K[target]), _batch(views.T[target]),
                  _batch(views.depth(kind, reference)), _batch(views.K[reference]), _batch(views.T[reference]),
                  tau=tau)


def warp_views(views: Views, kind: str, target: int, reference: int, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """(reference image warped onto the target [H, W, 3] float32 in [0, 1], trust mask [H, W])."""
    rel = relate_views(views, kind, target, reference, tau)
    ref = _batch(views.image(reference)).permute(0, 3, 1, 2) / 255.0
    return backward_warp(ref, rel.disparity)[0].permute(1, 2, 0).numpy(), rel.mask[0].numpy()


def relate_pair(views: Views, kind: str, target: int, reference: int, config: RelationsConfig):
    """{factor: (disparity [2, h, w], mask [h, w])} from ``target`` to ``reference`` (NumPy)."""
    rel = relate_views(views, kind, target, reference, config.tau)
    scales = multiscale(rel.disparity, rel.mask, scale_factors(config.coarsest))
    return {f: (d[0].numpy(), (rel.mask[0].numpy() if f == 1 else m[0, 0].numpy())) for f, (d, m) in scales.items()}


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)  # uncompressed: disparities compress by only ~1/3 and zlib is slow
    return buf.getvalue()


def write_relations(views: Views, config: RelationsConfig, out: Path) -> dict:
    """Compute every relation and write the stage's files into ``out``; returns a summary."""
    out = Path(out)
    distances, order = coding_order(views, config)
    names = list(views.names)
    refs = references(order)
    atomic_save_npy(out / "distances.npy", distances)
    trusted: dict[str, dict[str, float]] = {}
    for kind in DEPTH_KINDS:
        trusted[kind] = {}
        for target in order[1:]:
            scales = relate_pair(views, kind, target, refs[target], config)
            mask = scales[1][1]
            trusted[kind][names[target]] = float(mask.mean())
            if not mask.any():
                log.warning("relations: %s has no pixel it can take from %s with %s depth (empty mask)",
                            names[target], names[refs[target]], kind)
            arrays = {}
            for f, (disp, m) in scales.items():
                arrays[f"disparity_{f}"] = disp.astype(np.float32)
                arrays[f"mask_{f}"] = m
            atomic_write_bytes(out / kind / f"{names[target]}.npz", _npz_bytes(arrays))
    summary = {
        "names": names,
        "order": [names[i] for i in order],
        "references": {names[v]: (names[r] if r is not None else None) for v, r in refs.items()},
        "tau": config.tau,
        "factors": list(scale_factors(config.coarsest)),
        "trusted": trusted,
    }
    atomic_write_json(out / "order.json", summary)
    return summary


def finished_relations(work_dir: Path) -> "StoredRelations":
    """The completed relations stage of ``work_dir``; a clear error when it has not run."""
    root = Path(work_dir) / "relations"
    if read_meta(root) is None:
        raise LmvicError(f"no relations results in {work_dir}; run `lmvic run SCENE --stages relations` first")
    return StoredRelations(root)


@dataclass(frozen=True)
class StoredRelations:
    """Reader of a finished relations folder."""

    root: Path

    @property
    def info(self) -> dict:
        return read_json(self.root / "order.json")

    def distances(self) -> np.ndarray:
        return np.load(self.root / "distances.npy")

    def pairs(self) -> list[tuple[str, str]]:
        """(target, reference) for every view with a reference, in coding order."""
        refs = self.info["references"]
        return [(v, refs[v]) for v in self.info["order"] if refs[v] is not None]

    def load(self, kind: str, name: str, factor: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(disparity [2, h, w], mask [h, w]) of view ``name`` at 1/factor."""
        path = self.root / kind / f"{name}.npz"
        if not path.is_file():
            raise LmvicError(f"no {kind}-depth relation stored for view {name!r} in {self.root}")
        with np.load(path) as data:
            return data[f"disparity_{factor}"], data[f"mask_{factor}"]


def run(ctx) -> dict:
    """Stage-runner entry point (``pipelines.stages``): read stage one's outputs from
    ``ctx.work_dir``, write this stage's files into ``ctx.out``, return a short summary."""
    summary = write_relations(stage_views(ctx.work_dir), ctx.config, ctx.out)
    return {
        "order": summary["order"],
        "mean_trusted": {kind: (float(np.mean(list(v.values()))) if v else 0.0)
                         for kind, v in summary["trusted"].items()},
        "empty_masks": {kind: sorted(n for n, frac in v.items() if frac == 0.0)
                        for kind, v in summary["trusted"].items()},
    }
