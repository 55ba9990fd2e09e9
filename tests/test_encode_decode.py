"""`lmvic encode` / `lmvic decode` with the shipped single-view weights: another process decodes the
file to exactly the pixels the encoder reconstructed; corrupt files get a one-line error."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from lmvic.bitstream import encode_scene, read_scene
from pipelines.codec_io import encode, view_summary
from conftest import run_lmvic


@pytest.fixture(scope="module")
def coded(small_scene_work, tmp_path_factory):
    path = tmp_path_factory.mktemp("coded") / "scene.lmv"
    size, decoded = encode("single", small_scene_work, path, quality=3)
    return path, size, decoded


def test_decode_in_another_process_is_bit_exact(coded, tmp_path, small_scene_work):
    from pipelines.geometry_stage import load_cameras

    path, size, decoded = coded
    assert size == path.stat().st_size
    result = run_lmvic("decode", path, "-o", tmp_path)
    assert result.returncode == 0, result.stderr
    cams = load_cameras(small_scene_work / "sfm")
    originals = cams.load_images()
    for name, original in zip(cams.names, originals):
        out = np.asarray(Image.open(tmp_path / f"{name.rsplit('.', 1)[0]}.png"))
        np.testing.assert_array_equal(out, decoded.images[name])
        assert out.shape == original.shape
        mse = np.mean((out.astype(np.float64) - original) ** 2)
        assert 10 * np.log10(255 ** 2 / mse) > 22.0  # a real reconstruction, not noise
    pixels = sum(im.shape[0] * im.shape[1] for im in originals)
    assert 0.02 < 8 * size / pixels < 2.0


def test_view_summary_lists_every_view_in_coding_order(coded):
    from lmvic.bitstream import SceneReader

    path, size, decoded = coded
    lines = view_summary(path).splitlines()
    with SceneReader(path) as reader:
        order = [decoded.header.views[i].name for i in reader.header.order]
        sizes = [reader.record_sizes[i] for i in reader.header.order]
    assert [line.split()[0] for line in lines[1:]] == order
    assert [int(line.split()[2]) for line in lines[1:]] == sizes
    assert min(sizes) > 0 and sum(sizes) < size  # the rest is the header (cameras, order) and the index


def test_any_subset_decodes(coded, tmp_path):
    path, _, decoded = coded
    names = list(decoded.images)
    result = run_lmvic("decode", path, "-o", tmp_path, "--views", f"{names[3]},{names[0]}")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n.rsplit('.', 1)[0]}.png" for n in names[:4:3])


@pytest.mark.parametrize("damage", ["truncate", "flip", "version", "weights"])
def test_corrupt_files_are_refused_with_one_line(coded, tmp_path, damage):
    path, _, _ = coded
    data = bytearray(path.read_bytes())
    if damage == "weights":  # a valid file, but coded with other weights of the same model id
        header, records = read_scene(path)
        data = bytearray(encode_scene(replace(header, weights="f" * 16), records))
    elif damage == "truncate":
        data = data[: len(data) * 2 // 3]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        data[4] ^= 0x7F  # the format version field follows the 4 magic bytes
    bad = tmp_path / "bad.lmv"
    bad.write_bytes(bytes(data))
    result = run_lmvic("decode", bad, "-o", tmp_path / "out")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmvic: error:"), result.stderr
    assert damage != "weights" or "other 'single_view_cpu' weights (ffffffffffffffff)" in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_refinement_is_refused_where_the_encoder_cannot_use_it(small_scene_work, tmp_path):
    """A distributed encoder sees its own view only, and steps are counted from zero: clear errors, no file."""
    from pipelines.errors import LmvicError

    for mode, steps in (("distributed", 3), ("single", -1)):
        with pytest.raises(LmvicError, match="refinement"):
            encode(mode, small_scene_work, tmp_path / "s.lmv", quality=3, refine_steps=steps)
    assert not (tmp_path / "s.lmv").exists()
