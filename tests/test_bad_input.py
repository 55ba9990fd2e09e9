"""Every bad input of a scene folder gets a one-line error, a non-zero exit, and leaves nothing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines import cache
from pipelines.cli import main
from conftest import run_lmvic


def make_scene(tmp_path: Path, small_scene: Path, n: int = 3) -> Path:
    root = tmp_path / "scene"
    (root / "images").mkdir(parents=True)
    for p in sorted((small_scene / "images").iterdir())[:n]:
        shutil.copy(p, root / "images" / p.name)
    return root


def fails(capsys, *argv) -> str:
    """Run the CLI in-process; assert exit code 2 and a one-line 'lmvic: error:' message."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("lmvic: error: "), err
    return err[0]


def test_missing_folder(tmp_path, capsys):
    assert "does not exist" in fails(capsys, "status", tmp_path / "nowhere")


def test_no_images_folder_and_empty_images(tmp_path, capsys):
    assert "no images/ folder" in fails(capsys, "run", tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    assert "holds 0 image(s)" in fails(capsys, "run", tmp_path)


def test_single_image(tmp_path, small_scene, capsys):
    root = make_scene(tmp_path, small_scene, n=1)
    assert "at least 2 views" in fails(capsys, "run", root)


def test_truncated_image(tmp_path, small_scene, capsys):
    root = make_scene(tmp_path, small_scene)
    victim = sorted((root / "images").iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:200])
    assert f"cannot read image {victim}" in fails(capsys, "run", root)
    assert not (root / ".lmvic" / "sfm").exists()


def test_mixed_sizes_refused_unless_allowed(tmp_path, small_scene, capsys):
    from PIL import Image

    root = make_scene(tmp_path, small_scene)
    first = sorted((root / "images").iterdir())[0]
    Image.open(first).resize((100, 80)).save(first)
    assert "--allow-mixed-sizes" in fails(capsys, "status", root)
    assert main(["status", str(root), "--allow-mixed-sizes"]) == 0


def test_malformed_transforms_json(tmp_path, small_scene, capsys):
    root = make_scene(tmp_path, small_scene)
    (root / "transforms.json").write_text('{"frames": [ {"file_path": ')
    assert "malformed" in fails(capsys, "run", root, "--stages", "sfm")
    assert not (root / ".lmvic" / "sfm").exists() and not list((root / ".lmvic").glob(".tmp-*"))


def test_malformed_colmap_model(tmp_path, small_scene, capsys):
    root = make_scene(tmp_path, small_scene)
    model = root / "sparse" / "0"
    model.mkdir(parents=True)
    for name in ("cameras.bin", "images.bin", "points3D.bin"):
        (model / name).write_bytes(b"\x07garbage")
    assert "cannot read the COLMAP model" in fails(capsys, "run", root, "--stages", "sfm")
    assert not (root / ".lmvic" / "sfm").exists()


def test_locked_scene(tmp_path, small_scene, capsys):
    root = make_scene(tmp_path, small_scene)
    with cache.work_lock(root / ".lmvic"):
        assert "locked by a running lmvic" in fails(capsys, "run", root, "--stages", "sfm")


def test_unknown_stage(tmp_path, small_scene, capsys):
    root = make_scene(tmp_path, small_scene)
    assert "unknown stage 'colour'" in fails(capsys, "run", root, "--stages", "colour")


@pytest.mark.parametrize("command", ["train-joint", "train-distributed"])
def test_trainers_refuse_a_held_out_scene(tmp_path, capsys, command):
    """fox is an evaluation scene: a trainer given its folder (or its images/) stops before it trains."""
    for folder in (tmp_path / "fox", tmp_path / "fox" / "images"):
        folder.mkdir(parents=True, exist_ok=True)
        err = fails(capsys, command, tmp_path / "run", folder)
        assert "held out for evaluation, not for training" in err and str(folder) in err
    assert not (tmp_path / "run").exists()


def test_joint_training_refuses_a_held_out_scene_from_the_library_too(tmp_path):
    """``lmvic.joint_training.train_joint`` called without the CLI: the same refusal, nothing created."""
    from lmvic.joint_training import JointTrainConfig, train_joint

    (tmp_path / "sceaux_castle").mkdir()
    with pytest.raises(ValueError, match="held out for evaluation, not for training"):
        train_joint(JointTrainConfig(str(tmp_path / "run"), (str(tmp_path / "sceaux_castle"),)))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("scales, message", [("1,x", "comma-separated numbers"), ("1,0", "must be in (0, 1]"),
                                            ("1.5", "must be in (0, 1]")])
def test_train_refuses_bad_cache_scales(tmp_path, capsys, scales, message):
    (tmp_path / "scenes").mkdir()
    assert message in fails(capsys, "train", tmp_path / "run", "--scenes", tmp_path / "scenes", "--scales", scales)
    assert not (tmp_path / "run").exists()


def test_train_refuses_leaf_photos_without_dead_leaves(tmp_path, capsys, small_scene):
    scenes = tmp_path / "scenes"
    make_scene(scenes, small_scene)
    assert "needs --dead-leaves" in fails(capsys, "train", tmp_path / "run", "--scenes", scenes, "--leaf-photos", "0.5")
    assert not (tmp_path / "run").exists()


def test_console_script_exit_code(tmp_path):
    """The same in a separate process: non-zero exit and one line on stderr."""
    result = run_lmvic("run", tmp_path / "absent")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr


def test_views_without_overlap_fail_sfm_cleanly(tmp_path, capsys):
    """Two unrelated noise images: real pycolmap finds no registrable pair; one-line error, nothing cached."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    message = fails(capsys, "run", tmp_path, "--stages", "sfm")
    assert "SfM" in message
    assert not (tmp_path / ".lmvic" / "sfm").exists() and not list((tmp_path / ".lmvic").glob(".tmp-*"))


def test_identical_views_fail_sfm_cleanly(tmp_path, small_scene, capsys):
    """Every view the same photo (one camera position): real SfM cannot initialise; one-line error."""
    (tmp_path / "images").mkdir()
    source = sorted((small_scene / "images").iterdir())[0]
    for i in range(3):
        shutil.copy(source, tmp_path / "images" / f"{i}{source.suffix}")
    message = fails(capsys, "run", tmp_path, "--stages", "sfm")
    assert "SfM" in message
    assert not (tmp_path / ".lmvic" / "sfm").exists() and not list((tmp_path / ".lmvic").glob(".tmp-*"))


def test_cameras_at_one_position_are_refused(tmp_path, small_scene, capsys):
    """transforms.json giving every view the same pose: refused before triangulation, nothing cached."""
    shutil.copytree(small_scene / "images", tmp_path / "images")
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    (tmp_path / "transforms.json").write_text(json.dumps({
        "w": 320, "h": 240, "fl_x": 300.0, "fl_y": 300.0, "cx": 160.0, "cy": 120.0,
        "frames": [{"file_path": f"images/{n}", "transform_matrix": np.eye(4).tolist()} for n in names]}))
    message = fails(capsys, "run", tmp_path, "--stages", "sfm")
    assert "same position" in message
    assert not (tmp_path / ".lmvic" / "sfm").exists()


def test_sigterm_terminates_without_glog_stack_trace(tmp_path):
    """pycolmap installs glog's SIGTERM handler; lmvic restores the default so `kill` just ends a run."""
    import signal
    import subprocess
    import sys
    import time

    script = "import geometry.sfm, time; print('ready', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.readline().strip() == "ready"
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == -signal.SIGTERM and time.monotonic() - start < 5
    assert "Aborted" not in err and "stack trace" not in err
