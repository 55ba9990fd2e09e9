"""The scene container: one file holding every coded view of a scene, with random access per view.

Layout (fixed-width integers little-endian; ``uv`` = unsigned LEB128 varint, at most 10 bytes;
``str`` = uv byte length + UTF-8)::

    magic          4 bytes  b"LMVC"
    version        u16      lmvic.FORMAT_VERSION
    header_length  u32      bytes of the header body
    header body:
        mode           u8       0 joint, 1 distributed, 2 single
        model_id       str      (< 256 bytes)
        weights        8 bytes  the first 8 bytes of the SHA-256 of the weight file that coded it
                                (all zero: weights that were never shipped, e.g. a training snapshot)
        quality        uv
        view_count     uv       (≥ 1)
        per view:      name str (< 65536 bytes), height uv, width uv,
                       K 6×f32 (its first two rows; the third is 0 0 1),
                       T 12×f32 (world-to-camera, its first three rows; the fourth is 0 0 0 1)
        order          view_count × uv   coding order (a permutation of the view indexes)
        per view:      reference count uv, then that many uv view indexes
        per view:      record length uv  (bytes of that view's record body)
    header CRC32   u32      over every byte from the magic to the end of the header body
    per view, in view-index order:
        record body:
            stream_count  uv
            per stream:   name str (< 256 bytes), ndim u8, ndim × uv shape,
                          chunk_count uv, per chunk: uv length + bytes
        record CRC32  u32  over the record body

Cameras are held at float32 precision (``ViewInfo`` rounds them), what the codecs compute with, so
the encoder's cameras are the decoder's bit for bit. Version 1 stored them as float64 and every
count and length at a fixed width: about 330 bytes per view, 6 % of a fox view at the lowest rate.
Version 3 added the weights digest: re-trained weights keep their model id, and a file coded with
other weights than the decoder's is refused instead of decoding to wrong pixels.

The header CRC covers the record table, so a reader can seek to any view's record, check its own
CRC and decode it without reading the other records (distributed mode decodes any subset). The file
size must equal the end of the last record: truncation anywhere is detected when the file is
opened. Every length is checked against the bytes that remain before anything is read or
allocated, so no field can make the reader allocate or loop beyond the file's size.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Collection, Mapping, Sequence

import numpy as np

from lmvic import FORMAT_VERSION
from pipelines.cache import atomic_write_bytes
from pipelines.errors import LmvicError

MAGIC = b"LMVC"
MODES = ("joint", "distributed", "single")
#: Largest image side and latent dimension a file may declare.
MAX_SIDE = 1 << 16
MAX_NDIM = 8

_PREAMBLE = struct.Struct("<4sHI")
_CRC = struct.Struct("<I")
_MODEL_ID_LIMIT, _VIEW_NAME_LIMIT, _STREAM_NAME_LIMIT = 1 << 8, 1 << 16, 1 << 8
_K_BYTES, _T_BYTES = 6 * 4, 12 * 4  # float32 rows stored per camera


class BitstreamError(LmvicError):
    """A scene file that cannot be read (or a scene that cannot be written), in one line."""


@dataclass(frozen=True, eq=False)
class ViewInfo:
    """One view's name, original image size and camera (``K`` 3×3, world-to-camera ``T`` 4×4), the
    camera rounded to float32 as the file stores it (held as float64 arrays)."""

    name: str
    height: int
    width: int
    intrinsics: np.ndarray
    world_to_camera: np.ndarray

    def __post_init__(self) -> None:
        for field, last_row in (("intrinsics", (0, 0, 1)), ("world_to_camera", (0, 0, 0, 1))):
            value = np.array(getattr(self, field), dtype=np.float64)
            n = len(last_row)
            if value.shape != (n, n):
                raise BitstreamError(f"view {self.name!r}: {field} has shape {value.shape}, expected {(n, n)}")
            if not np.array_equal(value[-1], last_row):
                raise BitstreamError(f"view {self.name!r}: {field}'s last row is {value[-1].tolist()}, "
                                     f"expected {list(last_row)}")
            value = value.astype(np.float32).astype(np.float64)
            value.setflags(write=False)
            object.__setattr__(self, field, value)


_WEIGHTS_BYTES = 8
#: ``SceneHeader.weights`` of weights that were never shipped.
UNSHIPPED = "00" * _WEIGHTS_BYTES


def weights_digest(sha256: str) -> str:
    """The header's identification of weights whose file has the hex SHA-256 ``sha256``."""
    return sha256[: 2 * _WEIGHTS_BYTES]


@dataclass(frozen=True, eq=False)
class SceneHeader:
    """Everything but the coded bytes: mode, model, views, coding order and references.

    ``references[i]`` are the views whose decoded data view ``i`` uses (for ``joint`` they must
    come before ``i`` in ``order``). ``weights``: hex digest prefix of the weights that coded the
    file (:func:`weights_digest`; ``UNSHIPPED`` for weights that were never shipped).
    """

    mode: str
    model_id: str
    quality: int
    views: tuple[ViewInfo, ...]
    order: tuple[int, ...]
    references: tuple[tuple[int, ...], ...]
    weights: str = UNSHIPPED

    def check_weights(self, digest: str) -> None:
        """``BitstreamError`` unless the file was coded with the weights of ``digest`` (or with unshipped ones)."""
        if self.weights not in (UNSHIPPED, digest):
            raise BitstreamError(f"file was coded with other {self.model_id!r} weights ({self.weights}) than this "
                                 f"build's ({digest}): decode it with the lmvic version that wrote it")


@dataclass(frozen=True)
class LatentStream:
    """The coded bytes of one latent (e.g. CompressAI's ``strings`` for ``y``) and its shape."""

    chunks: tuple[bytes, ...]
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Coded bytes of all chunks (what the stream costs, without the container's length fields)."""
        return sum(len(c) for c in self.chunks)

    @staticmethod
    def coded(strings: list[list[bytes]], z_shape: tuple[int, int]) -> "LatentStream":
        """A codec's ``compress`` strings for one image (batch 1) → one chunk per string, with the z shape."""
        return LatentStream(tuple(bytes(s[0]) for s in strings), tuple(z_shape))

    def strings(self) -> list[list[bytes]]:
        """The chunks as a codec's ``decompress`` strings for one image (inverse of :meth:`coded`)."""
        return [[bytes(c)] for c in self.chunks]


#: One view's coded data: named streams such as ``"image.y"``, ``"image.z"``, ``"depth.y"``.
ViewRecord = Mapping[str, LatentStream]


def _check_header(header: SceneHeader, models: Collection[str] | None = None) -> None:
    """Raise ``BitstreamError`` unless the header is consistent (used on writing and reading)."""
    if header.mode not in MODES:
        raise BitstreamError(f"unknown mode {header.mode!r} (expected one of {', '.join(MODES)})")
    if models is not None and header.model_id not in models:
        raise BitstreamError(f"unknown model {header.model_id!r} (known: {', '.join(sorted(models)) or 'none'})")
    if len(header.weights) != 2 * _WEIGHTS_BYTES or header.weights.strip("0123456789abcdef"):
        raise BitstreamError(f"weights digest {header.weights!r}: expected {2 * _WEIGHTS_BYTES} lower-case hex digits")
    if not 0 <= header.quality < 1 << 16:
        raise BitstreamError(f"quality {header.quality} out of range")
    count = len(header.views)
    if not 1 <= count < 1 << 16:
        raise BitstreamError(f"a scene needs 1 to 65535 views, got {count}")
    names = [view.name for view in header.views]
    if len(set(names)) != count:
        raise BitstreamError("view names are not unique")
    for view in header.views:
        if not (1 <= view.height <= MAX_SIDE and 1 <= view.width <= MAX_SIDE):
            raise BitstreamError(f"view {view.name!r}: image size {view.height}×{view.width} out of range")
        if not (np.isfinite(view.intrinsics).all() and np.isfinite(view.world_to_camera).all()):
            raise BitstreamError(f"view {view.name!r}: camera is not finite")
    if sorted(header.order) != list(range(count)):
        raise BitstreamError(f"coding order {list(header.order)} is not a permutation of the {count} views")
    if len(header.references) != count:
        raise BitstreamError(f"{len(header.references)} reference lists for {count} views")
    position = {view: rank for rank, view in enumerate(header.order)}
    for view, refs in enumerate(header.references):
        if len(set(refs)) != len(refs) or any(not 0 <= r < count or r == view for r in refs):
            raise BitstreamError(f"view {view}: invalid references {list(refs)}")
        if header.mode == "joint" and any(position[r] > position[view] for r in refs):
            raise BitstreamError(f"view {view}: a joint-mode reference is coded after the view")


def _check_record(record: ViewRecord) -> None:
    if len(record) >= 1 << 16:
        raise BitstreamError(f"too many streams in one view ({len(record)})")
    for name, stream in record.items():
        if len(stream.shape) > MAX_NDIM or any(not 0 <= d <= MAX_SIDE for d in stream.shape):
            raise BitstreamError(f"stream {name!r}: shape {stream.shape} out of range")
        if len(stream.chunks) >= 1 << 32 or any(len(c) >= 1 << 32 for c in stream.chunks):
            raise BitstreamError(f"stream {name!r}: too many or too long chunks")


def _uv(*values: int) -> bytes:
    """Unsigned LEB128 varints."""
    out = bytearray()
    for value in values:
        if not 0 <= value < 1 << 64:
            raise BitstreamError(f"value {value} does not fit a 64-bit varint")
        while value >= 0x80:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


def _str(text: str, limit: int) -> bytes:
    data = text.encode("utf-8")
    if len(data) >= limit:
        raise BitstreamError(f"name {text[:40]!r}… longer than {limit - 1} bytes")
    return _uv(len(data)) + data


def _encode_record(record: ViewRecord) -> bytes:
    _check_record(record)
    parts = [_uv(len(record))]
    for name, stream in record.items():
        parts += [_str(name, _STREAM_NAME_LIMIT), struct.pack("<B", len(stream.shape)), _uv(*stream.shape),
                  _uv(len(stream.chunks))]
        for chunk in stream.chunks:
            parts += [_uv(len(chunk)), bytes(chunk)]
    return b"".join(parts)


def encode_scene(header: SceneHeader, records: Sequence[ViewRecord]) -> bytes:
    """Serialise a scene (``records[i]`` belongs to ``header.views[i]``) to the container bytes."""
    _check_header(header)
    if len(records) != len(header.views):
        raise BitstreamError(f"{len(records)} view records for {len(header.views)} views")
    bodies = [_encode_record(record) for record in records]
    parts = [struct.pack("<B", MODES.index(header.mode)), _str(header.model_id, _MODEL_ID_LIMIT),
             bytes.fromhex(header.weights), _uv(header.quality, len(header.views))]
    for view in header.views:
        parts += [_str(view.name, _VIEW_NAME_LIMIT), _uv(view.height, view.width),
                  view.intrinsics[:2].astype("<f4").tobytes(), view.world_to_camera[:3].astype("<f4").tobytes()]
    parts.append(_uv(*header.order))
    for refs in header.references:
        parts.append(_uv(len(refs), *refs))
    parts.append(_uv(*(len(body) for body in bodies)))
    body = b"".join(parts)
    head = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(body)) + body
    out = [head, _CRC.pack(zlib.crc32(head))]
    for record in bodies:
        out += [record, _CRC.pack(zlib.crc32(record))]
    return b"".join(out)


def write_scene(path: str | os.PathLike, header: SceneHeader, records: Sequence[ViewRecord]) -> int:
    """Write the container atomically (``pipelines.cache.atomic_write_bytes``); returns its size."""
    data = encode_scene(header, records)
    atomic_write_bytes(Path(path), data)
    return len(data)


class _Cursor:
    """Bounds-checked reads from one checksummed block; any overrun is a ``BitstreamError``."""

    def __init__(self, data: bytes, what: str):
        self.data, self.what, self.pos = data, what, 0

    def take(self, size: int) -> bytes:
        if size > len(self.data) - self.pos:
            raise BitstreamError(f"corrupt {self.what}: a field runs past its end")
        self.pos += size
        return self.data[self.pos - size: self.pos]

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def varint(self) -> int:
        value = 0
        for shift in range(0, 70, 7):
            (byte,) = self.take(1)
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if value >= 1 << 64:
                    break
                return value
        raise BitstreamError(f"corrupt {self.what}: a varint longer than 64 bits")

    def count(self, min_item_size: int) -> int:
        """Read an item count and refuse it if that many items cannot fit in what remains."""
        n = self.varint()
        if n * min_item_size > len(self.data) - self.pos:
            raise BitstreamError(f"corrupt {self.what}: count {n} exceeds the remaining bytes")
        return n

    def text(self, limit: int) -> str:
        n = self.varint()
        if n >= limit:
            raise BitstreamError(f"corrupt {self.what}: a name of {n} bytes (at most {limit - 1})")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BitstreamError(f"corrupt {self.what}: a name is not UTF-8") from exc

    def done(self) -> None:
        if self.pos != len(self.data):
            raise BitstreamError(f"corrupt {self.what}: {len(self.data) - self.pos} unexpected bytes at its end")


def _camera_rows(data: bytes, rows: int) -> np.ndarray:
    """Stored float32 rows of a camera matrix → the (n, n) float64 matrix with its fixed last row."""
    top = np.frombuffer(data, dtype="<f4").reshape(rows, rows + 1).astype(np.float64)
    return np.vstack([top, np.eye(rows + 1)[-1:]])


def _parse_header(body: bytes) -> tuple[SceneHeader, tuple[int, ...]]:
    cur = _Cursor(body, "header")
    (mode,) = cur.unpack("B")
    if mode >= len(MODES):
        raise BitstreamError(f"corrupt header: unknown mode code {mode}")
    model_id = cur.text(_MODEL_ID_LIMIT)
    weights = cur.take(_WEIGHTS_BYTES).hex()
    quality = cur.varint()
    count = cur.count(3 + _K_BYTES + _T_BYTES)
    views = []
    for _ in range(count):
        name = cur.text(_VIEW_NAME_LIMIT)
        height, width = cur.varint(), cur.varint()
        k = _camera_rows(cur.take(_K_BYTES), 2)
        t = _camera_rows(cur.take(_T_BYTES), 3)
        if not 1 <= height <= MAX_SIDE or not 1 <= width <= MAX_SIDE:
            raise BitstreamError(f"corrupt header: view {name!r} of size {height}×{width}")
        views.append(ViewInfo(name, height, width, k, t))
    order = tuple(cur.varint() for _ in range(count))
    references = tuple(tuple(cur.varint() for _ in range(cur.count(1))) for _ in range(count))
    lengths = tuple(cur.varint() for _ in range(count))
    cur.done()
    return SceneHeader(MODES[mode], model_id, quality, tuple(views), order, references, weights), lengths


def _parse_record(body: bytes, name: str) -> dict[str, LatentStream]:
    cur = _Cursor(body, f"record of view {name!r}")
    streams: dict[str, LatentStream] = {}
    for _ in range(cur.count(3)):
        key = cur.text(_STREAM_NAME_LIMIT)
        (ndim,) = cur.unpack("B")
        if ndim > MAX_NDIM:
            raise BitstreamError(f"corrupt record of view {name!r}: {ndim}-d latent shape")
        shape = tuple(cur.varint() for _ in range(ndim))
        if any(d > MAX_SIDE for d in shape):
            raise BitstreamError(f"corrupt record of view {name!r}: latent shape {shape} out of range")
        chunks = tuple(cur.take(cur.varint()) for _ in range(cur.count(1)))
        if key in streams:
            raise BitstreamError(f"corrupt record of view {name!r}: stream {key!r} appears twice")
        streams[key] = LatentStream(chunks, shape)
    cur.done()
    return streams


class SceneReader:
    """Random-access reader of a scene container.

    Opening reads and checks the header only (magic, version, CRC, model, consistency, file
    length); ``read_view(i)`` reads and checks one view's record. Works on a path or on an open
    seekable binary file. ``models``: model ids this build can decode (``None`` skips the check).
    """

    def __init__(self, source: str | os.PathLike | BinaryIO, models: Collection[str] | None = None):
        self._owned = not hasattr(source, "read")
        self._file: BinaryIO = open(source, "rb") if self._owned else source  # type: ignore[arg-type]
        try:
            self._open(models)
        except BaseException:
            self.close()
            raise

    def _read_exact(self, offset: int, size: int, what: str) -> bytes:
        self._file.seek(offset)
        data = self._file.read(size)
        if len(data) != size:
            raise BitstreamError(f"truncated file: {what} ends at byte {offset + size}, file has {self._size}")
        return data

    def _open(self, models: Collection[str] | None) -> None:
        self._size = self._file.seek(0, io.SEEK_END)
        preamble = self._read_exact(0, _PREAMBLE.size, "the preamble")
        magic, version, header_length = _PREAMBLE.unpack(preamble)
        if magic != MAGIC:
            raise BitstreamError(f"not an lmvic scene file (magic {magic!r}, expected {MAGIC!r})")
        if version != FORMAT_VERSION:
            raise BitstreamError(f"unsupported format version {version} (this build reads {FORMAT_VERSION})")
        if _PREAMBLE.size + header_length + _CRC.size > self._size:
            raise BitstreamError(f"truncated file: header of {header_length} bytes, file has {self._size}")
        rest = self._read_exact(_PREAMBLE.size, header_length + _CRC.size, "the header")
        body, (crc,) = rest[:-_CRC.size], _CRC.unpack(rest[-_CRC.size:])
        if zlib.crc32(preamble + body) != crc:
            raise BitstreamError("header checksum mismatch: the file is corrupt")
        self.header, lengths = _parse_header(body)
        _check_header(self.header, models)
        self._offsets = []
        offset = _PREAMBLE.size + header_length + _CRC.size
        for length in lengths:
            self._offsets.append(offset)
            offset += length + _CRC.size
        if offset != self._size:
            state = "truncated file" if offset > self._size else "corrupt file"
            raise BitstreamError(f"{state}: records end at byte {offset}, file has {self._size}")
        self._lengths = lengths

    @property
    def record_sizes(self) -> tuple[int, ...]:
        """Bytes each view occupies in the file (record and its checksum), in view-index order."""
        return tuple(length + _CRC.size for length in self._lengths)

    @property
    def file_size(self) -> int:
        return self._size

    def read_view(self, index: int) -> dict[str, LatentStream]:
        """The named streams of view ``index`` (its record's CRC checked)."""
        if not 0 <= index < len(self.header.views):
            raise IndexError(f"view {index} not in a scene of {len(self.header.views)} views")
        name = self.header.views[index].name
        data = self._read_exact(self._offsets[index], self._lengths[index] + _CRC.size, f"view {name!r}")
        body, (crc,) = data[:-_CRC.size], _CRC.unpack(data[-_CRC.size:])
        if zlib.crc32(body) != crc:
            raise BitstreamError(f"checksum mismatch in the record of view {name!r}: the file is corrupt")
        return _parse_record(body, name)

    def close(self) -> None:
        if self._owned:
            self._file.close()

    def __enter__(self) -> SceneReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_scene(source: str | os.PathLike | BinaryIO,
               models: Collection[str] | None = None) -> tuple[SceneHeader, list[dict[str, LatentStream]]]:
    """Read a whole container: the header and every view's record (view-index order)."""
    with SceneReader(source, models) as reader:
        return reader.header, [reader.read_view(i) for i in range(len(reader.header.views))]


def decode_scene(data: bytes,
                 models: Collection[str] | None = None) -> tuple[SceneHeader, list[dict[str, LatentStream]]]:
    """``read_scene`` on bytes in memory."""
    return read_scene(io.BytesIO(data), models)
