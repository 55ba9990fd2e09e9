"""Distributed mode with the shipped weights: views encoded alone, any subset decoded by another
process to exactly the in-process pixels; the encoder is the single-view encoder, byte for byte."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import lmvic  # noqa: F401
from lmvic.bitstream import SceneReader, ViewInfo
from lmvic.distributed_codec import MODEL_IDS, decode_distributed_file, encode_distributed_file, neighbours_in_order
from lmvic.models.distributed import load_distributed
from lmvic.exact import fixed_threads
from lmvic.separate_codec import encode_separate_file
from lmvic.zoo import WEIGHTS_DIR, WeightsError
from lmvic.training.data import read_rgb
from conftest import run_lmvic, shared_scene

QUALITY = 4
HEIGHT, WIDTH = 70, 100  # not multiples of 64: padded and cropped back


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with fixed_threads(1):
        yield


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """Three consecutive frames of the beer scene (a training scene), cropped small, coded at ``QUALITY``."""
    frames = sorted((shared_scene("beer") / "images").iterdir())[:3]
    images = [np.ascontiguousarray(read_rgb(p, 256)[60: 60 + HEIGHT, 20: 20 + WIDTH]) for p in frames]
    infos = [ViewInfo(f"v{v}.png", HEIGHT, WIDTH, np.eye(3), np.eye(4)) for v in range(3)]
    path = tmp_path_factory.mktemp("distributed") / "scene.lmv"
    size, header_only = encode_distributed_file(path, "distributed-cpu", infos, images, (0, 1, 2), QUALITY)
    return path, size, header_only, images, infos


def _decode_in_another_process(path, out_dir, views: str | None = None) -> dict[str, np.ndarray]:
    args = ["decode", path, "-o", out_dir] + (["--views", views] if views else [])
    result = run_lmvic(*args)
    assert result.returncode == 0, result.stderr
    return {f"{p.stem}.png": np.asarray(Image.open(p)) for p in out_dir.iterdir()}


def test_another_process_decodes_every_view_bit_exactly(scene, tmp_path) -> None:
    path, size, header_only, images, _ = scene
    assert size == path.stat().st_size and header_only.header.mode == "distributed" and not header_only.images
    expected = decode_distributed_file(path).images
    other = _decode_in_another_process(path, tmp_path)
    assert sorted(other) == sorted(expected)
    for name, image in zip(sorted(expected), images):
        np.testing.assert_array_equal(other[name], expected[name])
        assert other[name].shape == (HEIGHT, WIDTH, 3)
        mse = np.mean((other[name].astype(np.float64) - image) ** 2)
        assert 10 * np.log10(255 ** 2 / mse) > 25.0  # a real reconstruction


def test_any_subset_decodes_with_only_its_views_as_side_information(scene, tmp_path) -> None:
    path = scene[0]
    subset = decode_distributed_file(path, ["v2.png", "v0.png"]).images
    assert sorted(subset) == ["v0.png", "v2.png"]
    np.testing.assert_array_equal(_decode_in_another_process(path, tmp_path, "v2.png,v0.png")["v0.png"],
                                  subset["v0.png"])
    alone = decode_distributed_file(path, ["v1.png"]).images["v1.png"]
    together = decode_distributed_file(path).images["v1.png"]
    assert alone.shape == together.shape == (HEIGHT, WIDTH, 3)
    assert np.abs(alone.astype(int) - together).max() > 0  # the other views are its side information


def test_encoder_is_the_single_view_encoder(scene, tmp_path) -> None:
    """Each camera codes alone: the streams equal the single mode's, byte for byte."""
    path, _, _, images, infos = scene
    encode_separate_file(tmp_path / "single.lmv", "single_view_cpu", infos, images, (0, 1, 2), QUALITY)
    with SceneReader(path) as distributed, SceneReader(tmp_path / "single.lmv") as single:
        for v in range(3):
            assert distributed.read_view(v) == single.read_view(v)
        assert distributed.header.references == ((1, 2), (0, 2), (1, 0))


def test_side_views_are_the_nearest_in_coding_order() -> None:
    # order 2, 0, 3, 1: positions 2→0, 0→1, 3→2, 1→3; ties go to the earlier position
    assert neighbours_in_order([2, 0, 3, 1], 1) == ((2,), (3,), (0,), (0,))
    assert neighbours_in_order([2, 0, 3, 1], 2) == ((2, 3), (3, 0), (0, 3), (0, 1))
    assert neighbours_in_order([0], 3) == ((),)


def test_both_shipped_models_load_and_differ_in_fusion() -> None:
    fusions = {name: type(load_distributed(name).fusions[0]).__name__ for name in MODEL_IDS}
    assert fusions == {"distributed-cpu": "ParallaxFusion", "distributed-average-cpu": "AverageFusion"}


def test_weights_of_another_base_are_refused(tmp_path) -> None:
    for name in ("single_view_cpu", "distributed-cpu"):
        for suffix in (".pt", ".json"):
            shutil.copy(WEIGHTS_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    meta = json.loads((tmp_path / "single_view_cpu.json").read_text())
    meta["sha256"] = "0" * 64
    (tmp_path / "single_view_cpu.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="other 'single_view_cpu' weights"):
        load_distributed("distributed-cpu", tmp_path)


def test_shipped_opam_recovers_a_known_shift_on_a_held_out_view() -> None:
    """The shipped OPAM (distributed-cpu, finest fusion: 8 px blocks) on two crops of a held-out
    view (sceaux_castle was never trained on), the side one moved by a known (o_y, o_x): where the
    match lies inside the side crop, the attention's mean correspondence has a median error under
    1.5 blocks, the consistency marks many positions valid, and the aligned pixels are much closer
    to the main view there than the unaligned side view."""
    from pipelines.align_compare import OPAM_VALID

    image = read_rgb(sorted((shared_scene("sceaux_castle") / "images").iterdir())[0], 512)  # 384×512
    oy, ox, size, y, x = 8, -40, 256, 64, 128
    crops = [image[y: y + size, x: x + size], image[y - oy: y - oy + size, x - ox: x - ox + size]]
    main, side = (torch.from_numpy(np.ascontiguousarray(c)).permute(2, 0, 1)[None].float() / 255 for c in crops)
    codec = load_distributed("distributed-cpu")
    coords = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")).float()[None]
    matched, validity = codec.align_side_image(main, side, 6, values=coords)
    aligned, _ = codec.align_side_image(main, side, 6)
    inside = (slice(max(0, -oy), size - max(0, oy)), slice(max(0, -ox), size - max(0, ox)))
    truth = coords + torch.tensor([oy, ox], dtype=torch.float32)[None, :, None, None]
    error = (matched - truth).norm(dim=1)[0][inside]
    # measured (session 5, OPAM re-trained on the session-4 base with the known-shift sharpness loss,
    # weights chosen on fox crops, not on this view): median 8.0 px (a facade of repeated windows: off
    # by one 8 px block at places), 51 % valid, aligned error 0.35 × unaligned. Session-4 re-stage
    # (cross-entropy training): 13.3 px, 36 %, 0.34; session 3 on its base: 8.3 px, 44 %, 0.30; before
    # any alignment training: 41 px, 21 %, 0.60
    assert float(error.median()) < 12.0
    assert float((validity[0, 0][inside] >= OPAM_VALID).float().mean()) > 0.3
    aligned_err = (aligned - main).abs()[..., inside[0], inside[1]].mean()
    assert float(aligned_err) < 0.45 * float((side - main).abs()[..., inside[0], inside[1]].mean())
