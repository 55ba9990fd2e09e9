"""The stage runner: which stages exist, in which order, and how a run decides what to (re)compute.

Stages form one chain. Each declares its config dataclass, the scene files it reads and a ``run``
function that writes its results into ``ctx.out`` and returns a small JSON-able summary. A stage's
cache key (``pipelines.cache.StageKey``) includes the key of the stage before it, so a change
anywhere re-runs that stage and every later one. Stages are grouped (``geometry`` = sfm + splat +
depth) so users can name a group or a single stage.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lmvic import __version__
from pipelines import cache
from pipelines.errors import LmvicError
from pipelines.scene import Scene

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageContext:
    """What a stage's ``run`` function gets."""

    scene: Scene
    work_dir: Path
    out: Path  # temporary folder the stage writes into; renamed into place on success
    config: Any
    device: str
    quiet: bool = False

    def stage_dir(self, name: str) -> Path:
        """The completed output folder of an earlier stage."""
        return self.work_dir / name


def _scene_images(scene: Scene) -> list[Path]:
    files = [v.path for v in scene.views]
    for extra in (scene.colmap_model, scene.transforms):
        if extra is not None:
            files += [p for p in sorted(extra.rglob("*")) if p.is_file()] if extra.is_dir() else [extra]
    return files


def _no_scene_files(scene: Scene) -> list[Path]:
    return []


@dataclass(frozen=True)
class Stage:
    name: str
    group: str
    config: str  # "module:ConfigClass", a frozen dataclass
    run: str  # "module:function", called as function(ctx) -> summary dict
    scene_inputs: Callable[[Scene], list[Path]] = field(default=_no_scene_files)
    description: str = ""

    def config_type(self) -> type:
        return _resolve(self.config)

    def run_fn(self) -> Callable[[StageContext], dict]:
        return _resolve(self.run)


def _resolve(ref: str) -> Any:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


STAGES: tuple[Stage, ...] = (
    Stage("sfm", "geometry", "geometry.sfm:SfmConfig", "pipelines.geometry_stage:run_sfm", _scene_images,
          "COLMAP structure-from-motion (pycolmap), undistorted to PINHOLE"),
    Stage("splat", "geometry", "geometry.gaussian_fit:FitConfig", "pipelines.geometry_stage:run_splat",
          description="3D Gaussian Splatting fit on the CPU; gaussians.ply"),
    Stage("depth", "geometry", "pipelines.geometry_stage:DepthConfig", "pipelines.geometry_stage:run_depth",
          description="median and mean depth of every view"),
    Stage("relations", "relations", "pipelines.relations:RelationsConfig", "pipelines.relations:run",
          description="view distances, coding order, disparity and trust masks at every scale"),
)
GROUPS = ("geometry", "relations", "compress")


def stage_names() -> list[str]:
    return [s.name for s in STAGES]


def select(names: list[str]) -> int:
    """Index of the last stage that ``names`` (stage or group names) asks for."""
    last = -1
    for name in names:
        hits = [i for i, s in enumerate(STAGES) if name in (s.name, s.group)]
        if not hits:
            if name in GROUPS:
                raise LmvicError(f"stage group '{name}' is not available in this version of lmvic")
            raise LmvicError(f"unknown stage '{name}'; known: {', '.join(stage_names() + list(GROUPS))}")
        last = max(last, max(hits))
    return last


def default_configs() -> dict[str, Any]:
    return {s.name: s.config_type()() for s in STAGES}


@dataclass(frozen=True)
class StageState:
    stage: Stage
    key: cache.StageKey
    reason: str | None  # None = cached and valid


def plan(scene: Scene, work_dir: Path, configs: dict[str, Any], upto: int, force: str | None = None,
         stages: tuple[Stage, ...] = STAGES) -> list[StageState]:
    """The state of stages 0..upto: valid, or why each must run."""
    names = [s.name for s in stages]
    if force and force not in names:
        raise LmvicError(f"--force: unknown stage '{force}'; known: {', '.join(names)}")
    force_from = names.index(force) if force else None
    states, upstream, upstream_runs = [], "", False
    for i, stage in enumerate(stages[: upto + 1]):
        inputs = cache.files_digest(stage.scene_inputs(scene), scene.root)
        key = cache.StageKey.make(configs[stage.name], inputs, upstream)
        meta = cache.read_meta(work_dir / stage.name)
        if force_from is not None and i >= force_from:
            reason = "forced"
        elif meta is None:
            reason = "not computed yet"
        else:
            reason = key.why_stale(meta) or ("an earlier stage re-runs" if upstream_runs else None)
        states.append(StageState(stage, key, reason))
        upstream, upstream_runs = key.digest, upstream_runs or reason is not None
    return states


@dataclass(frozen=True)
class StageResult:
    name: str
    ran: bool
    seconds: float
    path: Path
    note: str


def run(scene: Scene, work_dir: Path, configs: dict[str, Any], upto: int, force: str | None = None,
        device: str = "cpu", quiet: bool = False, stages: tuple[Stage, ...] = STAGES) -> list[StageResult]:
    """Bring stages 0..upto up to date under the work-folder lock; returns what ran and what was cached."""
    results = []
    with cache.work_lock(work_dir):
        for leftover in cache.clean_interrupted(work_dir):
            log.warning("removed %s left by an interrupted run", leftover.name)
        for state in plan(scene, work_dir, configs, upto, force, stages):
            stage, out = state.stage, work_dir / state.stage.name
            if state.reason is None:
                results.append(StageResult(stage.name, False, 0.0, out, "cached"))
                continue
            log.info("stage %s: running (%s)", stage.name, state.reason)
            start = time.perf_counter()
            with cache.staging_dir(out) as tmp:
                ctx = StageContext(scene, work_dir, tmp, configs[stage.name], device, quiet)
                summary = stage.run_fn()(ctx)
                seconds = time.perf_counter() - start
                cache.atomic_write_json(tmp / "meta.json", {
                    "stage": stage.name,
                    "key": dataclasses.asdict(state.key),
                    "config": dataclasses.asdict(configs[stage.name]),
                    "summary": summary,
                    "seconds": round(seconds, 3),
                    "lmvic_version": __version__,
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                })
            results.append(StageResult(stage.name, True, seconds, out, state.reason))
    return results
