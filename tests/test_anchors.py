"""Traditional anchors: real bytes, exact colour conversion, stream structure, round trips."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from pipelines.anchors import ANCHORS, X265, access_unit_sizes, make_anchor, rgb_to_ycbcr10, ycbcr10_to_rgb
from pipelines.errors import LmvicError
from pipelines.metrics import psnr
from scenes.synthetic import ArcCameras, SceneSpec, SolidNoise, render_view

SIZE = 192


@pytest.fixture(scope="module")
def views() -> list[np.ndarray]:
    """Three 192×192 views of the synthetic scene: one rendering seen through a window panning by
    12 px per view (a camera translation parallel to the image plane, far scene)."""
    cams = ArcCameras(n_views=1, width=SIZE + 24, height=SIZE)
    K, T = cams.matrices()
    image, _ = render_view(K, T[0], cams.width, cams.height, SceneSpec(), SolidNoise(1), supersample=1)
    return [np.ascontiguousarray(image[:, 12 * i: 12 * i + SIZE]) for i in range(3)]


def test_colour_conversion_closed_form_and_near_exact():
    # Full-range 10-bit BT.709: white (1023, 512, 512), black (0, 512, 512), red per the matrix.
    ycc = rgb_to_ycbcr10(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0]], np.uint8))
    red_cb = round(-0.2126 / (2 * (1 - 0.0722)) * 1023 + 512)
    assert ycc.tolist() == [[1023, 512, 512], [0, 512, 512], [round(0.2126 * 1023), red_cb, 1023]]
    rgb = np.random.default_rng(0).integers(0, 256, (200_000, 3), dtype=np.uint8)
    back = ycbcr10_to_rgb(rgb_to_ycbcr10(rgb))
    err = np.abs(back.astype(int) - rgb)
    assert err.max() <= 1 and (err > 0).mean() < 1e-3


def _nal(nal_type: int, payload: bytes, four_byte: bool = False) -> bytes:
    return (b"\x00" if four_byte else b"") + b"\x00\x00\x01" + bytes([nal_type << 1, 1]) + payload


def test_access_unit_sizes_split_and_sum():
    first = [_nal(32, b"v" * 10, True), _nal(33, b"s" * 20, True), _nal(34, b"p" * 5, True),
             _nal(39, b"e" * 7, True), _nal(19, b"\x80" + b"x" * 100, True), _nal(40, b"z" * 3)]
    second = [_nal(1, b"\x80" + b"y" * 50, True), _nal(1, b"\x00" + b"w" * 30)]  # two slice segments
    third = [_nal(35, b"a"), _nal(1, b"\xc0" + b"u" * 9)]
    stream = b"".join(first + second + third)
    sizes = access_unit_sizes(stream)
    assert sizes == [sum(map(len, first)), sum(map(len, second)), sum(map(len, third))]
    assert sum(sizes) == len(stream)
    with pytest.raises(ValueError):
        access_unit_sizes(b"no start code")


def _probe(stream: bytes, tmp_path) -> tuple[dict, list[str], list[int]]:
    """ffprobe's view of a stream: stream info, picture types, packet (access unit) sizes."""
    path = tmp_path / "s.hevc"
    path.write_bytes(stream)
    out = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-show_frames", "-show_packets", "-of", "json",
                          str(path)], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    items = data["packets_and_frames"]
    return (data["streams"][0], [f["pict_type"] for f in items if f["type"] == "frame"],
            [int(p["size"]) for p in items if p["type"] == "packet"])


@pytest.mark.parametrize("intra", [False, True])
def test_x265_stream_configuration(views, tmp_path, intra):
    codec = X265(intra=intra)
    stream = codec.encode(views, 32)
    info, picture_types, packets = _probe(stream, tmp_path)
    assert (info["codec_name"], info["pix_fmt"], info["color_range"]) == ("hevc", "yuv444p10le", "pc")
    assert picture_types == (["I"] * 3 if intra else ["I", "P", "P"])
    sizes = access_unit_sizes(stream)
    assert sum(sizes) == sum(packets) == len(stream)
    # ffmpeg's parser may give a 4-byte start code's leading zero to the previous packet.
    assert np.abs(np.array(sizes) - np.array(packets)).max() <= 1


@pytest.mark.parametrize("intra", [False, True])
def test_x265_near_lossless(views, intra):
    coded = X265(intra=intra).encode_decode(views, 2)
    assert min(psnr(v, d) for v, d in zip(views, coded.decoded)) > 45


def test_jpeg_near_lossless(views):
    coded = make_anchor("jpeg").encode_decode(views, 100)
    assert min(psnr(v, d) for v, d in zip(views, coded.decoded)) > 40


@pytest.mark.parametrize("name", list(ANCHORS))
def test_round_trip_quality_rises(views, name):
    codec = make_anchor(name)
    low, high = codec.qualities[0], codec.qualities[-1]
    results = []
    for q in (low, high):
        coded = codec.encode_decode(views, q)
        assert len(coded.num_bytes) == len(coded.decoded) == len(views)
        assert all(b > 0 for b in coded.num_bytes)
        assert all(d.shape == views[0].shape and d.dtype == np.uint8 for d in coded.decoded)
        results.append((sum(coded.num_bytes), np.mean([psnr(v, d) for v, d in zip(views, coded.decoded)])))
    (bytes_low, psnr_low), (bytes_high, psnr_high) = results
    assert bytes_high > bytes_low
    assert psnr_high > psnr_low + 3
    assert psnr_low > 18  # a real picture, not noise


def test_x265_ldp_predicts_from_previous_views(views):
    """The P frames of a panning sequence cost far less than coding each view as an I frame."""
    ldp = X265(intra=False).encode_decode(views, 32)
    intra = X265(intra=True).encode_decode(views, 32)
    assert ldp.num_bytes[0] == pytest.approx(intra.num_bytes[0], rel=0.1)
    assert sum(ldp.num_bytes[1:]) < 0.8 * sum(intra.num_bytes[1:])


def test_missing_ffmpeg_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LmvicError, match="ffmpeg is not installed"):
        X265()
    with pytest.raises(LmvicError, match="ffmpeg"):
        make_anchor("x265-ldp")


def test_unknown_anchor():
    with pytest.raises(LmvicError, match="unknown codec"):
        make_anchor("bpg")


def test_x265_tune_psnr_raises_psnr(views):
    """tune=psnr switches x265's psycho-visual optimisations off: higher PSNR at the same QP."""
    default = X265().encode_decode(views, 32).decoded
    tuned = X265(tune="psnr").encode_decode(views, 32).decoded
    assert np.mean([psnr(v, d) for v, d in zip(views, tuned)]) > np.mean([psnr(v, d) for v, d in zip(views, default)])
