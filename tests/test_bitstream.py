"""The scene container (lmvic.bitstream): round trips, random access and every corrupt-file case."""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import lmvic
from lmvic.bitstream import (UNSHIPPED, BitstreamError, LatentStream, SceneHeader, SceneReader, ViewInfo,
                             decode_scene, encode_scene, read_scene, write_scene)
from pipelines.errors import LmvicError

PREAMBLE = 10  # magic (4) + version (2) + header length (4)


def make_scene(views: int = 3, mode: str = "joint", seed: int = 0) -> tuple[SceneHeader, list[dict]]:
    rng = np.random.default_rng(seed)
    infos = []
    for i in range(views):
        k = np.array([[500.0 + i, 0, 320.5], [0, 501.25, 240.125], [0, 0, 1]])
        t = np.eye(4)
        t[:3, :3] = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        t[:3, 3] = rng.normal(size=3)
        infos.append(ViewInfo(f"view_{i:02d}.png", 480 + i, 640 - i, k, t))
    order = tuple(reversed(range(views)))
    rank = {view: r for r, view in enumerate(order)}
    refs = tuple(() if rank[v] == 0 else (order[rank[v] - 1],) for v in range(views))  # previous view
    records = []
    for i in range(views):
        records.append({
            "depth.y": LatentStream((rng.bytes(40 + i),), (30, 40)),
            "depth.z": LatentStream((rng.bytes(7),), (8, 10)),
            "image.y": LatentStream((rng.bytes(90 + 3 * i), b""), (30, 40)),
            "image.z": LatentStream((rng.bytes(11 + i),), (8, 10)),
        })
    return SceneHeader(mode, "lmvic-cpu", 3, tuple(infos), order, refs, "0123456789abcdef"), records


def assert_same_scene(a: SceneHeader, b: SceneHeader) -> None:
    assert (a.mode, a.model_id, a.weights, a.quality, a.order, a.references) == (
        b.mode, b.model_id, b.weights, b.quality, b.order, b.references)
    assert len(a.views) == len(b.views)
    for va, vb in zip(a.views, b.views):
        assert (va.name, va.height, va.width) == (vb.name, vb.height, vb.width)
        assert va.intrinsics.tobytes() == vb.intrinsics.tobytes()
        assert va.world_to_camera.tobytes() == vb.world_to_camera.tobytes()


def test_round_trip_file_and_random_access(tmp_path: Path) -> None:
    header, records = make_scene(4)
    path = tmp_path / "scene.lmv"
    size = write_scene(path, header, records)
    assert size == path.stat().st_size
    got_header, got_records = read_scene(path)
    assert_same_scene(header, got_header)
    assert got_records == records
    with SceneReader(path) as reader:
        assert reader.read_view(2) == records[2]  # one view without reading the others
        assert reader.read_view(0) == records[0]
        assert reader.file_size == size
        header_bytes = size - sum(reader.record_sizes)
        assert header_bytes > PREAMBLE and all(s > 0 for s in reader.record_sizes)
    # encoding is deterministic
    assert encode_scene(header, records) == path.read_bytes()


@pytest.mark.parametrize("mode", ["distributed", "single"])
def test_other_modes_and_unicode_names(mode: str) -> None:
    header, records = make_scene(2, mode=mode)
    header = SceneHeader(mode, "lmvic-cpu-ß", 0, (ViewInfo("vue é", 7, 9, np.eye(3), np.eye(4)),) + header.views[1:],
                         header.order, ((1,), (0,)) if mode == "distributed" else ((), ()))
    got_header, got_records = decode_scene(encode_scene(header, records), models={"lmvic-cpu-ß"})
    assert_same_scene(header, got_header)
    assert got_records == records


def test_truncation_at_every_offset_raises() -> None:
    data = encode_scene(*make_scene(2))
    for n in range(len(data)):
        with pytest.raises(BitstreamError):
            decode_scene(data[:n])
    with pytest.raises(BitstreamError, match="corrupt file"):
        decode_scene(data + b"\0")


def test_every_single_bit_flip_raises() -> None:
    data = bytearray(encode_scene(*make_scene(2)))
    for byte in range(len(data)):
        for bit in range(8):
            data[byte] ^= 1 << bit
            try:
                decode_scene(bytes(data))
            except BitstreamError:
                pass
            else:
                pytest.fail(f"flip of bit {bit} of byte {byte} was not detected")
            finally:
                data[byte] ^= 1 << bit
    decode_scene(bytes(data))  # restored


def test_random_multi_bit_flips_raise_bitstream_error_only() -> None:
    original = encode_scene(*make_scene(3))
    rng = random.Random(11)
    for _ in range(300):
        data = bytearray(original)
        for _ in range(rng.randint(2, 16)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        if bytes(data) == original:
            continue
        with pytest.raises(BitstreamError):
            decode_scene(bytes(data))


def test_errors_are_lmvic_errors_with_one_line_messages() -> None:
    data = encode_scene(*make_scene(2))
    with pytest.raises(LmvicError) as info:
        decode_scene(b"JUNK" + data[4:])
    assert "magic" in str(info.value) and "\n" not in str(info.value)


def test_wrong_version_and_unknown_model() -> None:
    data = bytearray(encode_scene(*make_scene(2)))
    data[4:6] = struct.pack("<H", lmvic.FORMAT_VERSION + 1)
    with pytest.raises(BitstreamError, match=f"unsupported format version {lmvic.FORMAT_VERSION + 1}"):
        decode_scene(bytes(data))
    good = encode_scene(*make_scene(2))
    with pytest.raises(BitstreamError, match="unknown model 'lmvic-cpu'"):
        decode_scene(good, models={"lmvic-paper"})
    decode_scene(good, models={"lmvic-cpu", "lmvic-paper"})


def uv(*values: int) -> bytes:
    """Unsigned LEB128 varints, written independently of the module under test."""
    out = b""
    for value in values:
        while True:
            low, value = value & 0x7F, value >> 7
            out += bytes([low | (0x80 if value else 0)])
            if not value:
                break
    return out


def one_view_head(record_length: int) -> bytes:
    """A valid one-view container's preamble, header and header CRC whose record table (the last
    varint of the header body: 1 byte for an empty record) says ``record_length``."""
    header, _ = make_scene(1)
    data = encode_scene(header, [{}])
    (header_length,) = struct.unpack_from("<I", data, 6)
    body = data[PREAMBLE:PREAMBLE + header_length - 1] + uv(record_length)
    head = data[:6] + struct.pack("<I", len(body)) + body
    return head + struct.pack("<I", zlib.crc32(head))


def one_view_file(record_body: bytes) -> bytes:
    """A one-view container whose record body is ``record_body``, CRCs fixed: hostile records that
    pass every checksum and reach the parser."""
    return one_view_head(len(record_body)) + record_body + struct.pack("<I", zlib.crc32(record_body))


def test_hostile_record_helper_builds_a_valid_file() -> None:
    record = uv(1) + b"\x01a" + struct.pack("<B", 2) + uv(4, 300) + uv(2, 1) + b"x" + uv(0)
    _, records = decode_scene(one_view_file(record))
    assert records == [{"a": LatentStream((b"x", b""), (4, 300))}]


@pytest.mark.parametrize("record, message", [
    (uv(0xFFFF), "count 65535 exceeds"),  # stream count
    (uv(1) + b"\x01a" + struct.pack("<B", 2) + uv(4, 4, 0xFFFFFFFF), "count 4294967295"),  # chunk count
    (uv(1) + b"\x01a" + struct.pack("<B", 2) + uv(4, 4, 1, 0xFFFFFFFF), "runs past"),  # chunk length
    (uv(1) + b"\x01a" + struct.pack("<B", 2) + uv(0xFFFFFFFF, 4, 0), "out of range"),
    (uv(1) + b"\x01a" + struct.pack("<B", 200) + bytes(10), "200-d"),
    (uv(1) + uv(200) + bytes(10), "runs past"),  # name longer than the record
    (uv(1) + uv(300) + bytes(300), "a name of 300 bytes"),  # longer than a stream name may be
    (b"\xff" * 11, "longer than 64 bits"),
    (uv(0) + b"extra", "unexpected bytes"),
    (uv(2) + (b"\x01a" + struct.pack("<B", 0) + uv(0)) * 2, "appears twice"),
])
def test_absurd_lengths_fail_fast(record: bytes, message: str) -> None:
    data = one_view_file(record)
    start = time.perf_counter()
    with pytest.raises(BitstreamError, match=message):
        decode_scene(data)
    assert time.perf_counter() - start < 0.5


def test_absurd_header_lengths_fail_fast() -> None:
    data = bytearray(encode_scene(*make_scene(2)))
    data[6:10] = struct.pack("<I", 0xFFFFFFFF)
    with pytest.raises(BitstreamError, match="truncated"):
        decode_scene(bytes(data))
    # a record length of 2^64−1 with a valid header checksum
    with pytest.raises(BitstreamError, match="truncated"):
        decode_scene(one_view_head(2**64 - 1))


def test_cameras_are_stored_at_float32_precision() -> None:
    """The decoder's cameras are the encoder's ViewInfo cameras bit for bit (both rounded to
    float32), and a camera whose last row is not that of K or of a rigid transform is refused."""
    k = np.array([[500.123456789, 0, 320.987654321], [0, 501.1, 240.3], [0, 0, 1]])
    t = np.eye(4)
    t[:3, 3] = (0.1, 1e-9, -3.3)
    view = ViewInfo("v", 8, 8, k, t)
    assert np.array_equal(view.intrinsics, k.astype(np.float32)) and np.array_equal(view.world_to_camera,
                                                                                     t.astype(np.float32))
    got, _ = decode_scene(encode_scene(SceneHeader("single", "m", 0, (view,), (0,), ((),)), [{}]))
    assert got.views[0].intrinsics.tobytes() == view.intrinsics.tobytes()
    assert got.views[0].world_to_camera.tobytes() == view.world_to_camera.tobytes()
    bad_t = t.copy()
    bad_t[3, 0] = 1e-3
    for intrinsics, world_to_camera in ((np.ones((3, 3)), t), (k, bad_t)):
        with pytest.raises(BitstreamError, match="last row"):
            ViewInfo("v", 8, 8, intrinsics, world_to_camera)


def test_a_file_of_other_weights_is_refused() -> None:
    header, _ = make_scene(2)
    header.check_weights("0123456789abcdef")
    with pytest.raises(BitstreamError, match=r"other 'lmvic-cpu' weights \(0123456789abcdef\) than this build's "
                                             r"\(fedcba9876543210\)"):
        header.check_weights("fedcba9876543210")
    replace(header, weights=UNSHIPPED).check_weights("fedcba9876543210")  # weights that were never shipped


def test_inconsistent_scenes_are_refused_on_writing() -> None:
    header, records = make_scene(3)
    bad = [
        SceneHeader("stereo", header.model_id, 1, header.views, header.order, header.references),
        SceneHeader("joint", header.model_id, 1, header.views, (0, 0, 1), header.references),
        SceneHeader("joint", header.model_id, 1, header.views, (0, 1, 2), ((1,), (), ())),  # ref after
        SceneHeader("joint", header.model_id, 1, header.views, (0, 1, 2), ((), (1,), ())),  # self
        SceneHeader("joint", header.model_id, 1, header.views[:1] * 3, header.order, header.references),
        SceneHeader("joint", header.model_id, 1 << 16, header.views, header.order, header.references),
        SceneHeader("joint", header.model_id, 1, header.views, header.order, header.references, "0123"),
        SceneHeader("joint", header.model_id, 1, header.views, header.order, header.references, "0123456789ABCDEF"),
    ]
    for h in bad:
        with pytest.raises(BitstreamError):
            encode_scene(h, records)
    with pytest.raises(BitstreamError):
        encode_scene(header, records[:2])
    with pytest.raises(BitstreamError):
        ViewInfo("v", 4, 4, np.eye(4), np.eye(4))
    with pytest.raises(BitstreamError):
        encode_scene(SceneHeader("single", "m", 0, (ViewInfo("v", 4, 4, np.full((3, 3), np.nan), np.eye(4)),),
                                 (0,), ((),)), [{}])


def test_write_is_atomic(tmp_path: Path) -> None:
    header, records = make_scene(2)
    path = tmp_path / "scene.lmv"
    write_scene(path, header, records)
    before = path.read_bytes()
    broken = SceneHeader("joint", header.model_id, 1, header.views, (0, 0), header.references)
    with pytest.raises(BitstreamError):
        write_scene(path, broken, records)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["scene.lmv"]


READER = r"""
import json, sys
from lmvic.bitstream import read_scene
header, records = read_scene(sys.argv[1])
print(json.dumps({
    "mode": header.mode, "model": header.model_id, "quality": header.quality,
    "order": header.order, "references": header.references,
    "views": [[v.name, v.height, v.width, v.intrinsics.tobytes().hex(), v.world_to_camera.tobytes().hex()]
              for v in header.views],
    "records": [{k: [[c.hex() for c in s.chunks], list(s.shape)] for k, s in r.items()} for r in records],
}))
"""


def test_another_process_reads_the_same_bytes(tmp_path: Path) -> None:
    header, records = make_scene(3, mode="distributed")
    header = SceneHeader("distributed", header.model_id, header.quality, header.views, header.order,
                         ((1, 2), (0, 2), (0, 1)))
    path = tmp_path / "scene.lmv"
    write_scene(path, header, records)
    result = subprocess.run([sys.executable, "-c", READER, str(path)], capture_output=True, text=True,
                            check=True, timeout=120)
    got = json.loads(result.stdout)
    assert (got["mode"], got["model"], got["quality"]) == ("distributed", header.model_id, header.quality)
    assert tuple(got["order"]) == header.order
    assert tuple(map(tuple, got["references"])) == header.references
    assert got["views"] == [[v.name, v.height, v.width, v.intrinsics.tobytes().hex(),
                             v.world_to_camera.tobytes().hex()] for v in header.views]
    assert got["records"] == [{k: [[c.hex() for c in s.chunks], list(s.shape)] for k, s in r.items()}
                              for r in records]
