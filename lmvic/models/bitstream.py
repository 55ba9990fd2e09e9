"""Byte format of one image coded by the single-view codec (used by ``eval-image``).

Layout (big-endian): magic ``b"LSV"``, version (u8), quality (u8), height, width (u16 each), chunk
count k (u8), the lengths of the first k − 1 chunks (u32 each), then the chunks; the last one runs
to the end. The chunks are the codec's strings: its y parts, then z (``SingleViewCodec.num_strings``).
Every byte counts in the reported bpp.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"LSV"
VERSION = 2
_HEADER = struct.Struct(">3sBBHHB")
_LENGTH = struct.Struct(">I")


class BitstreamError(ValueError):
    """The bytes are not a valid single-view image stream."""


@dataclass(frozen=True)
class ImageStream:
    quality: int
    height: int
    width: int
    chunks: tuple[bytes, ...]

    @property
    def header_bytes(self) -> int:
        """Bytes of the stream that are not chunks."""
        return _HEADER.size + _LENGTH.size * (len(self.chunks) - 1)

    def to_bytes(self) -> bytes:
        if not 1 <= len(self.chunks) < 256:
            raise ValueError("an image stream holds 1 to 255 chunks")
        head = _HEADER.pack(MAGIC, VERSION, self.quality, self.height, self.width, len(self.chunks))
        return head + b"".join(_LENGTH.pack(len(c)) for c in self.chunks[:-1]) + b"".join(self.chunks)

    @staticmethod
    def from_bytes(data: bytes) -> "ImageStream":
        if len(data) < _HEADER.size:
            raise BitstreamError("truncated single-view stream header")
        magic, version, quality, h, w, count = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise BitstreamError("not a single-view lmvic image stream (bad magic)")
        if version != VERSION:
            raise BitstreamError(f"unsupported single-view stream version {version} (this decoder reads {VERSION})")
        start = _HEADER.size + _LENGTH.size * (count - 1)
        if count == 0 or len(data) < start:
            raise BitstreamError("truncated single-view stream header")
        lengths = [_LENGTH.unpack_from(data, _HEADER.size + _LENGTH.size * k)[0] for k in range(count - 1)]
        if start + sum(lengths) > len(data):
            raise BitstreamError("truncated single-view stream")
        chunks = []
        for n in lengths:
            chunks.append(data[start: start + n])
            start += n
        return ImageStream(quality, h, w, (*chunks, data[start:]))
