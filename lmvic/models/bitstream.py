"""Byte format of one image coded by the single-view codec (used by ``eval-image``).

Layout (big-endian): magic ``b"LSV"``, version (u8), quality (u8), height, width (u16 each),
z length (u32), z string, y string (to the end). Every byte counts in the reported bpp.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"LSV"
VERSION = 1
_HEADER = struct.Struct(">3sBBHHI")
HEADER_BYTES = _HEADER.size


class BitstreamError(ValueError):
    """The bytes are not a valid single-view image stream."""


@dataclass(frozen=True)
class ImageStream:
    quality: int
    height: int
    width: int
    y_string: bytes
    z_string: bytes

    def to_bytes(self) -> bytes:
        head = _HEADER.pack(MAGIC, VERSION, self.quality, self.height, self.width, len(self.z_string))
        return head + self.z_string + self.y_string

    @staticmethod
    def from_bytes(data: bytes) -> "ImageStream":
        if len(data) < _HEADER.size:
            raise BitstreamError("truncated single-view stream header")
        magic, version, quality, h, w, nz = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise BitstreamError("not a single-view lmvic image stream (bad magic)")
        if version != VERSION:
            raise BitstreamError(f"unsupported single-view stream version {version}")
        if len(data) < _HEADER.size + nz:
            raise BitstreamError("truncated single-view stream")
        z = data[_HEADER.size: _HEADER.size + nz]
        return ImageStream(quality, h, w, data[_HEADER.size + nz:], z)
