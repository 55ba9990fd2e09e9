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
from pathlib import Path

import numpy as np
import pytest

import lmvic
from lmvic.bitstream import (BitstreamError, LatentStream, SceneHeader, SceneReader, ViewInfo,
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
    return SceneHeader(mode, "lmvic-cpu", 3, tuple(infos), order, refs), records


def assert_same_scene(a: SceneHeader, b: SceneHeader) -> None:
    assert (a.mode, a.model_id, a.quality, a.order, a.references) == (b.mode, b.model_id, b.quality,
                                                                       b.order, b.references)
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


def one_view_file(record_body: bytes) -> bytes:
    """A valid one-view container whose record body is replaced by ``record_body``, CRCs fixed.

    The record table is the last 8 bytes of the header body, so hostile records can be built that
    pass every checksum and reach the parser.
    """
    header, _ = make_scene(1)
    data = encode_scene(header, [{}])
    (header_length,) = struct.unpack_from("<I", data, 6)
    head = data[:PREAMBLE + header_length - 8] + struct.pack("<Q", len(record_body))
    return (head + struct.pack("<I", zlib.crc32(head)) + record_body
            + struct.pack("<I", zlib.crc32(record_body)))


@pytest.mark.parametrize("record, message", [
    (struct.pack("<H", 0xFFFF), "count 65535 exceeds"),  # stream count
    (struct.pack("<H", 1) + b"\x01a" + struct.pack("<B2II", 2, 4, 4, 0xFFFFFFFF), "count 4294967295"),
    (struct.pack("<H", 1) + b"\x01a" + struct.pack("<B2III", 2, 4, 4, 1, 0xFFFFFFFF), "runs past"),
    (struct.pack("<H", 1) + b"\x01a" + struct.pack("<B2II", 2, 0xFFFFFFFF, 4, 0), "out of range"),
    (struct.pack("<H", 1) + b"\x01a" + struct.pack("<B", 200) + bytes(10), "200-d"),
    (struct.pack("<H", 1) + b"\xff" + bytes(10), "runs past"),  # name longer than the record
    (struct.pack("<H", 0) + b"extra", "unexpected bytes"),
    (struct.pack("<H", 2) + (b"\x01a" + struct.pack("<BI", 0, 0)) * 2, "appears twice"),
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
    header, _ = make_scene(1)
    good = encode_scene(header, [{}])
    (header_length,) = struct.unpack_from("<I", good, 6)
    head = good[:PREAMBLE + header_length - 8] + struct.pack("<Q", 2**64 - 1)
    with pytest.raises(BitstreamError, match="truncated"):
        decode_scene(head + struct.pack("<I", zlib.crc32(head)))


def test_inconsistent_scenes_are_refused_on_writing() -> None:
    header, records = make_scene(3)
    bad = [
        SceneHeader("stereo", header.model_id, 1, header.views, header.order, header.references),
        SceneHeader("joint", header.model_id, 1, header.views, (0, 0, 1), header.references),
        SceneHeader("joint", header.model_id, 1, header.views, (0, 1, 2), ((1,), (), ())),  # ref after
        SceneHeader("joint", header.model_id, 1, header.views, (0, 1, 2), ((), (1,), ())),  # self
        SceneHeader("joint", header.model_id, 1, header.views[:1] * 3, header.order, header.references),
        SceneHeader("joint", header.model_id, 1 << 16, header.views, header.order, header.references),
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
