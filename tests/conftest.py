"""Shared fixtures: small generated scenes and a CLI runner."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does (pipelines/cli.py); before torch loads

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmvic  # noqa: F401  (makes compressai/torchvision importable, see lmvic.compat)
from scenes.synthetic import ArcCameras, generate

# Tests check correctness, not speed: one intra-op thread avoids oversubscribing the CPU when the
# suite shares the machine with other work (two threads on a loaded 2-core machine ran ~10x slower).
torch.set_num_threads(1)

SHARED_SCENES = Path(__file__).resolve().parents[2] / "shared" / "scenes"


@pytest.fixture(scope="session")
def small_scene(tmp_path_factory) -> Path:
    """A 10-view 320x240 synthetic scene with ground truth (generated once per test session)."""
    return generate(tmp_path_factory.mktemp("scenes") / "small", ArcCameras(n_views=10, arc_degrees=50.0), seed=3)


def run_lmvic(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed CLI in a separate process, as a user would."""
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def shared_scene(name: str) -> Path:
    path = SHARED_SCENES / name
    if not path.is_dir():
        pytest.skip(f"the development scenes are not present at {SHARED_SCENES}")
    return path


@pytest.fixture(scope="session")
def small_scene_work(small_scene) -> Path:
    """``small_scene`` with its sfm stage computed once (work folder ``small_scene/.lmvic``)."""
    from pipelines.scene import load_scene
    from pipelines.stages import default_configs, run, select

    scene = load_scene(small_scene)
    run(scene, scene.default_work_dir(), default_configs(), select(["sfm"]), quiet=True)
    return scene.default_work_dir()
