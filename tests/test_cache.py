"""The stage runner and cache: hits, misses, invalidation, atomicity, the lock, and a killed run."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines import cache
from pipelines.errors import LmvicError
from pipelines.scene import load_scene
from pipelines.stages import Stage, plan, run
from conftest import run_lmvic


@dataclass(frozen=True)
class ToyConfig:
    value: int = 1


def first(ctx) -> dict:
    (ctx.out / "count.txt").write_text(str(len(ctx.scene.views) * ctx.config.value))
    return {"views": len(ctx.scene.views)}


def second(ctx) -> dict:
    n = int((ctx.stage_dir("first") / "count.txt").read_text())
    if ctx.config.value < 0:
        (ctx.out / "partial.txt").write_text("half")
        raise LmvicError("second stage failed on purpose")
    (ctx.out / "double.txt").write_text(str(2 * n))
    return {}


def _images(scene):
    return [v.path for v in scene.views]


TOY = (Stage("first", "g1", f"{__name__}:ToyConfig", f"{__name__}:first", _images),
       Stage("second", "g2", f"{__name__}:ToyConfig", f"{__name__}:second"))


def toy_run(scene, work, a=1, b=1, force=None):
    configs = {"first": ToyConfig(a), "second": ToyConfig(b)}
    return {r.name: r.ran for r in run(scene, work, configs, 1, force, stages=TOY)}


@pytest.fixture
def scene_copy(tmp_path, small_scene):
    root = tmp_path / "scene"
    (root / "images").mkdir(parents=True)
    for p in sorted((small_scene / "images").iterdir())[:3]:
        (root / "images" / p.name).write_bytes(p.read_bytes())
    return load_scene(root)


def test_hit_miss_and_invalidation(scene_copy, tmp_path):
    work = tmp_path / "work"
    assert toy_run(scene_copy, work) == {"first": True, "second": True}
    assert toy_run(scene_copy, work) == {"first": False, "second": False}
    assert toy_run(scene_copy, work, b=2) == {"first": False, "second": True}
    assert toy_run(scene_copy, work, b=2) == {"first": False, "second": False}
    assert toy_run(scene_copy, work, a=3, b=2) == {"first": True, "second": True}
    assert (work / "second" / "double.txt").read_text() == "18"
    assert toy_run(scene_copy, work, a=3, b=2, force="second") == {"first": False, "second": True}
    # an input file's content changes (same size and name): the first stage and all after it re-run
    image = scene_copy.views[0].path
    data = bytearray(image.read_bytes())
    data[-20] ^= 0xFF
    image.write_bytes(bytes(data))
    states = plan(scene_copy, work, {"first": ToyConfig(3), "second": ToyConfig(2)}, 1, stages=TOY)
    assert [s.reason for s in states] == ["its input files changed", "an earlier stage changed"]


def test_cache_of_another_format_version_is_rerun(scene_copy, tmp_path):
    work = tmp_path / "work"
    toy_run(scene_copy, work)
    meta_path = work / "first" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["key"]["format_version"] = 0
    meta_path.write_text(json.dumps(meta))
    states = plan(scene_copy, work, {"first": ToyConfig(1), "second": ToyConfig(1)}, 1, stages=TOY)
    assert "format version 0" in states[0].reason
    assert toy_run(scene_copy, work) == {"first": True, "second": True}


def test_a_failing_stage_leaves_nothing_behind(scene_copy, tmp_path):
    work = tmp_path / "work"
    toy_run(scene_copy, work)
    before = (work / "second" / "double.txt").read_text()
    with pytest.raises(LmvicError, match="on purpose"):
        toy_run(scene_copy, work, b=-1)
    assert (work / "second" / "double.txt").read_text() == before  # the old valid result survives
    assert not (work / "second" / "partial.txt").exists()
    assert not list(work.glob(".tmp-*"))


def test_a_locked_work_folder_is_refused(scene_copy, tmp_path):
    work = tmp_path / "work"
    with cache.work_lock(work):
        with pytest.raises(LmvicError, match="locked by a running lmvic"):
            toy_run(scene_copy, work)
    assert toy_run(scene_copy, work)["first"]  # released afterwards


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "x.json"
    cache.atomic_write_json(path, {"a": 1})
    cache.atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_large_files_are_hashed_by_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "SAMPLE_THRESHOLD", 1024)
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(4 << 20))
    d1 = cache.file_digest(path)
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    assert cache.file_digest(path) != d1


@pytest.mark.slow
def test_killed_run_resumes(small_scene, tmp_path):
    """SIGKILL `lmvic run` in the middle of SfM: no half-written stage is trusted, the next run
    cleans up and completes, and the one after that is fully cached."""
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(small_scene), "--work-dir", str(work),
           "--stages", "sfm", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(work.glob(".tmp-sfm-*")) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(work.glob(".tmp-sfm-*")), "the run should have been killed inside the sfm stage"
    assert not (work / "sfm").exists()
    status = run_lmvic("status", small_scene, "--work-dir", work)
    assert "not computed yet" in status.stdout and "interrupted run" in status.stdout
    again = run_lmvic("run", small_scene, "--work-dir", work, "--stages", "sfm", "--quiet")
    assert again.returncode == 0, again.stderr
    assert not list(work.glob(".tmp-*"))
    meta = json.loads((work / "sfm" / "meta.json").read_text())
    assert meta["summary"]["registered"] == 10
    third = run_lmvic("run", small_scene, "--work-dir", work, "--stages", "sfm")
    assert "cached" in third.stdout


def test_fields_marked_cache_false_do_not_change_the_key():
    from geometry.gaussian_fit import FitConfig

    assert cache.config_digest(FitConfig(threads=1)) == cache.config_digest(FitConfig(threads=2))
    assert cache.config_digest(FitConfig(iterations=10)) != cache.config_digest(FitConfig(iterations=11))


def test_an_order_file_is_keyed_by_its_content(tmp_path):
    from pipelines.relations import RelationsConfig

    order = tmp_path / "order.txt"
    order.write_text("a.png\nb.png\n")
    first = cache.config_digest(RelationsConfig(order=str(order)))
    assert cache.config_digest(RelationsConfig(order=str(order))) == first
    order.write_text("b.png\na.png\n")  # same path, another order: the relations stage must re-run
    assert cache.config_digest(RelationsConfig(order=str(order))) != first
    assert cache.config_digest(RelationsConfig(order="greedy")) != cache.config_digest(RelationsConfig(order="sorted"))
