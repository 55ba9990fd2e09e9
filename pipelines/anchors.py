"""Traditional-codec anchors: real bytes out, decoded 8-bit RGB views back.

Every anchor satisfies :class:`pipelines.rd.Codec` (``name``, ``description``, ``qualities``,
``encode_decode(views, quality) -> Coded``); views are uint8 [H, W, 3] RGB of one size, given in
coding order.

* ``x265-ldp`` — HEVC low-delay P, the papers' anchor: the views are the frames of one sequence in
  coding order; one I frame (keyint larger than the view count, no scene-cut I frames),
  ``bframes=0``, ``ref=4``, fixed QP, preset medium, YCbCr 4:4:4 10-bit full range (BT.709
  matrix, signalled in the VUI). ``x265-intra`` is the same with every frame an I frame.
  Colour conversion is done here, not by ffmpeg's scaler: 8-bit RGB → 10-bit YCbCr
  (H.273 full range: Y = round(1023·E'Y), C = round(1023·E'C + 512)) → ffmpeg/libx265 raw
  ``yuv444p10le`` in and out → 8-bit RGB. Without coding this conversion is near-exact (see tests).
  Bytes: the raw Annex-B ``.hevc`` elementary stream, no container; x265's informational SEI
  (its settings string) is switched off (``info=0``). Per-view bytes come from splitting the stream
  into access units (parameter sets are counted with the first picture); they sum to the file.
* ``jpeg`` (libjpeg-turbo, 4:4:4, optimised Huffman tables), ``webp`` (libwebp lossy, always
  4:2:0 by design of the format), ``avif`` (libavif/aom, 4:4:4, 8-bit, speed 6) and ``jxl`` (libjxl,
  effort 7, quality levels mapped by libjxl to a butteraugli distance): each view coded alone
  through ``imagecodecs``; bytes are the encoded buffers.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipelines.errors import LmvicError
from pipelines.rd import Codec, Coded

# ------------------------------------------------------------------ colour conversion (BT.709)
KR, KB = 0.2126, 0.0722
KG = 1.0 - KR - KB
_RGB_TO_YCC = np.array([
    [KR, KG, KB],
    [-KR / (2 * (1 - KB)), -KG / (2 * (1 - KB)), 0.5],
    [0.5, -KG / (2 * (1 - KR)), -KB / (2 * (1 - KR))],
])
_YCC_TO_RGB = np.linalg.inv(_RGB_TO_YCC)


def rgb_to_ycbcr10(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] RGB → uint16 [..., 3] full-range 10-bit Y, Cb, Cr (BT.709 matrix)."""
    ycc = (rgb.astype(np.float64) / 255.0) @ _RGB_TO_YCC.T
    ycc[..., 1:] += 512.0 / 1023.0
    return np.clip(np.rint(ycc * 1023.0), 0, 1023).astype(np.uint16)


def ycbcr10_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """uint16 [..., 3] full-range 10-bit Y, Cb, Cr → uint8 [..., 3] RGB (inverse of :func:`rgb_to_ycbcr10`)."""
    f = ycc.astype(np.float64) / 1023.0
    f[..., 1:] -= 512.0 / 1023.0
    return np.clip(np.rint((f @ _YCC_TO_RGB.T) * 255.0), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ HEVC Annex-B access units
_SUFFIX_NAL_TYPES = {36, 37, 38, 40}  # end of sequence, end of bitstream, filler data, suffix SEI


def access_unit_sizes(stream: bytes) -> list[int]:
    """Bytes of each picture of an HEVC Annex-B stream, in decoding order; they sum to ``len(stream)``.

    Non-VCL NAL units that precede a picture (VPS, SPS, PPS, AUD, prefix SEI) count towards it;
    suffix NAL units count towards the picture before them. A picture starts at a VCL NAL unit
    whose ``first_slice_segment_in_pic_flag`` is set.
    """
    starts, i = [], stream.find(b"\x00\x00\x01")
    while i >= 0:
        starts.append(i)
        i = stream.find(b"\x00\x00\x01", i + 3)
    if not starts:
        raise ValueError("no HEVC start code in the stream")
    bounds = [s - 1 if s > 0 and stream[s - 1] == 0 else s for s in starts]
    bounds[0] = 0
    sizes: list[int] = []
    pending = 0
    for k, (begin, code) in enumerate(zip(bounds, starts)):
        end = bounds[k + 1] if k + 1 < len(bounds) else len(stream)
        nal_type = (stream[code + 3] >> 1) & 0x3F if code + 3 < len(stream) else 63
        if nal_type < 32 and code + 5 < len(stream) and stream[code + 5] & 0x80:
            sizes.append(pending + end - begin)
            pending = 0
        elif (nal_type < 32 or nal_type in _SUFFIX_NAL_TYPES) and sizes:
            sizes[-1] += end - begin
        else:
            pending += end - begin
    if not sizes:
        raise ValueError("no picture in the HEVC stream")
    sizes[-1] += pending
    return sizes


# ------------------------------------------------------------------ x265 through ffmpeg
def ffmpeg_executable() -> str:
    """Path of ``ffmpeg``; LmvicError if it is not installed."""
    path = shutil.which("ffmpeg")
    if path is None:
        raise LmvicError("ffmpeg is not installed (needed for the x265 anchors): apt-get install -y ffmpeg")
    return path


def _run_ffmpeg(args: list[str]) -> None:
    cmd = [ffmpeg_executable(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise LmvicError(f"ffmpeg failed ({reason}); command: {' '.join(cmd)}")


@dataclass(frozen=True)
class X265:
    """HEVC via ffmpeg/libx265: low-delay P (``intra=False``) or all-intra, fixed QP per rate point."""

    intra: bool = False
    qualities: tuple[int, ...] = (42, 37, 32, 27, 22)  # QPs, in order of increasing rate
    preset: str = "medium"
    refs: int = 4
    threads: int = 1
    tune: str | None = None  # e.g. "psnr" (switches psy-rd off: ≈ +1 dB at +5 % bits on fox); None = preset only

    def __post_init__(self) -> None:
        ffmpeg_executable()  # fail before any work when ffmpeg is missing

    @property
    def name(self) -> str:
        return "x265-intra" if self.intra else "x265-ldp"

    @property
    def description(self) -> str:
        gop = "all-intra" if self.intra else f"low-delay P, one I frame, bframes=0, ref={self.refs}"
        tune = f", tune {self.tune}" if self.tune else ""
        return (f"x265 (ffmpeg libx265) {gop}, fixed QP, preset {self.preset}{tune}, YCbCr 4:4:4 10-bit full "
                "range BT.709; bytes of the raw .hevc stream")

    def x265_params(self, qp: int, n_frames: int) -> str:
        keyint = 1 if self.intra else n_frames + 1
        params = {
            "qp": qp, "keyint": keyint, "min-keyint": keyint, "scenecut": 0, "bframes": 0, "ref": self.refs,
            "info": 0, "log-level": "error", "pools": self.threads, "frame-threads": 1,
            "range": "full", "colorprim": "bt709", "transfer": "bt709", "colormatrix": "bt709",
        }
        return ":".join(f"{k}={v}" for k, v in params.items())

    def encode(self, views: Sequence[np.ndarray], qp: int) -> bytes:
        """uint8 [H, W, 3] views (coding order) → the raw HEVC Annex-B stream at fixed ``qp``."""
        h, w = views[0].shape[:2]
        with tempfile.TemporaryDirectory(prefix="lmvic-x265-") as tmp:
            raw, stream = Path(tmp) / "in.yuv", Path(tmp) / "out.hevc"
            # yuv444p10le: per frame the Y, Cb and Cr planes, little-endian 16-bit samples.
            planes = np.stack([rgb_to_ycbcr10(v).transpose(2, 0, 1) for v in views])
            raw.write_bytes(planes.astype("<u2").tobytes())
            _run_ffmpeg(["-f", "rawvideo", "-pix_fmt", "yuv444p10le", "-s", f"{w}x{h}", "-r", "25", "-i", str(raw),
                         "-c:v", "libx265", "-preset", self.preset, *(["-tune", self.tune] if self.tune else []),
                         "-x265-params", self.x265_params(qp, len(views)),
                         "-pix_fmt", "yuv444p10le", "-f", "hevc", str(stream)])
            return stream.read_bytes()

    @staticmethod
    def decode(stream: bytes, count: int, height: int, width: int) -> list[np.ndarray]:
        """HEVC stream of ``count`` 4:4:4 10-bit pictures → uint8 [height, width, 3] RGB views."""
        with tempfile.TemporaryDirectory(prefix="lmvic-x265-") as tmp:
            src, decoded = Path(tmp) / "in.hevc", Path(tmp) / "dec.yuv"
            src.write_bytes(stream)
            _run_ffmpeg(["-i", str(src), "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "yuv444p10le",
                         str(decoded)])
            samples = np.frombuffer(decoded.read_bytes(), "<u2")
        if samples.size != count * 3 * height * width:
            raise LmvicError(f"the x265 stream decoded to {samples.size} samples, expected {count} pictures of "
                             f"{width}x{height} 4:4:4")
        frames = samples.reshape(count, 3, height, width).transpose(0, 2, 3, 1)
        return [ycbcr10_to_rgb(f) for f in frames]

    def encode_decode(self, views: Sequence[np.ndarray], quality: int) -> Coded:
        t0 = time.perf_counter()
        stream = self.encode(views, int(quality))
        t1 = time.perf_counter()
        decoded = self.decode(stream, len(views), *views[0].shape[:2])
        t2 = time.perf_counter()
        sizes = access_unit_sizes(stream)
        if len(sizes) != len(views):
            raise LmvicError(f"the x265 stream holds {len(sizes)} pictures for {len(views)} views")
        return Coded(sizes, decoded, t1 - t0, t2 - t1)


# ------------------------------------------------------------------ per-view image codecs
@dataclass(frozen=True)
class ImageCodec:
    """A still-image codec applied to each view alone; ``quality`` is the library's quality level."""

    name: str
    description: str
    qualities: tuple[int, ...]
    encode: Callable[[np.ndarray, int], bytes]
    decode: Callable[[bytes], np.ndarray]

    def encode_decode(self, views: Sequence[np.ndarray], quality: int) -> Coded:
        t0 = time.perf_counter()
        streams = [bytes(self.encode(np.ascontiguousarray(v), int(quality))) for v in views]
        t1 = time.perf_counter()
        decoded = [np.asarray(self.decode(s))[..., :3] for s in streams]
        t2 = time.perf_counter()
        return Coded([len(s) for s in streams], decoded, t1 - t0, t2 - t1)


def jpeg() -> ImageCodec:
    import imagecodecs as ic

    return ImageCodec("jpeg", f"JPEG 4:4:4, optimised Huffman (libjpeg-turbo {ic.jpeg8_version()})",
                      (10, 20, 35, 50, 70, 85, 95),
                      lambda x, q: ic.jpeg8_encode(x, level=q, subsampling="444", optimize=True), ic.jpeg8_decode)


def webp() -> ImageCodec:
    import imagecodecs as ic

    return ImageCodec("webp", f"WebP lossy, 4:2:0 (libwebp {ic.webp_version()})", (0, 10, 30, 50, 70, 85, 95),
                      lambda x, q: ic.webp_encode(x, level=q, lossless=False), ic.webp_decode)


def avif() -> ImageCodec:
    import imagecodecs as ic

    return ImageCodec("avif", f"AVIF 4:4:4 8-bit, speed 6 ({ic.avif_version()})", (10, 20, 30, 40, 55, 70, 80),
                      lambda x, q: ic.avif_encode(x, level=q, pixelformat="444", speed=6, numthreads=1),
                      ic.avif_decode)


def jxl() -> ImageCodec:
    import imagecodecs as ic

    return ImageCodec("jxl", f"JPEG XL, effort 7 ({ic.jpegxl_version()})", (10, 25, 40, 55, 70, 85, 92),
                      lambda x, q: ic.jpegxl_encode(x, level=q, effort=7, numthreads=1), ic.jpegxl_decode)


#: Every anchor by name (the ``--codecs`` names of ``lmvic eval``); x265-ldp is the BD-rate reference.
ANCHORS: dict[str, Callable[[], Codec]] = {
    "x265-ldp": lambda: X265(intra=False),
    "x265-intra": lambda: X265(intra=True),
    "jpeg": jpeg,
    "webp": webp,
    "avif": avif,
    "jxl": jxl,
}


def make_anchor(name: str) -> Codec:
    """The anchor called ``name``; LmvicError for an unknown name."""
    if name not in ANCHORS:
        raise LmvicError(f"unknown codec {name!r}; known: {', '.join(ANCHORS)}")
    return ANCHORS[name]()
