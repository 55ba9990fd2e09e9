"""Joint-mode scene coding: depth then image per view, in coding order, into one container file.

For view i with reference r (the previous view in the coding order; none for the first):

1. depth: CVDP splats the *decoded* reference depth D̂_r into view i; the depth codec codes the
   normalised depth of view i with that prediction (``lmvic.models.depth_codec``), at 1/16 of the
   image resolution (``DEPTH_FACTOR``: mean of 16×16 blocks of normalised inverse depth, edge-padded
   to a multiple of 64; the decoded map is upsampled bilinearly). The resolution sets how many
   latent vectors the depth codec's four stride-2 stages give a view: at 1/64 a fox view's map was
   two, its median depth error 6.7 % (sceaux_castle 22 %, too far off for the trust mask); at 1/16
   fifteen, 2.1 % (6.1 %) for 2.5x (1.8x) the bytes, after retraining. The depth codec always
   codes at its lowest rate point (``DEPTH_QUALITY``), whatever the image quality;
2. image: disparity and trust mask from the *decoded* depths D̂_i and D̂_r
   (``geometry.warp.relate`` with ``TRUST_TOLERANCE``, then ``multiscale`` at 1/2…1/16); the image
   codec codes x_i with the decoded reference image, its decoder features and that relation
   (``lmvic.models.joint``). The encoder also codes x_i with the reference in the entropy model
   only (no ICT fusion: the backbone's latent and reconstruction, made cheaper by the reference
   prior; on fox at q5 ICT cost 1.0 dB for 7 % fewer bits than this, session 11) and as the
   single-view backbone alone would (its own entropy model, no reference), and chooses every view's
   mode, as a video encoder decides between intra and inter, for the lowest RD cost of the scene:
   bits + λ_q·255²·SSE (``rd_cost``) summed over the views, the depth streams only the reference
   path needs included (``choose_modes``). The record says which by the name of its image stream
   (``IMAGE_STREAMS``: ``image``, ``image.prior`` or ``image.intra``), so a view the reference path
   would make worse is never coded worse than the single-view codec codes it;
3. depth streams nobody uses are dropped: a view keeps its depth only if its image or its
   successor's is coded with the reference (``encode_scene``'s second pass). A view whose
   reference has no depth codes its depth with CVDP off, as the first view does.

The encoder builds every reference exactly as the decoder does (same functions, ``EXACT_THREADS``
threads, float64 entropy parameters), so decoding in another process is bit-exact. Views are
padded (edge replication) to multiples of 64 on the right and bottom — the principal point does
not move — and cropped back after decoding.

Streams per view (``lmvic.bitstream.LatentStream``): ``depth`` (if kept) and ``image``, each with five
chunks — the range-coded QPEM steps y0…y3 and the hyper-latent z — and the shape of z ((H/64, W/64)
for the image; for the depth that of its padded 1/``DEPTH_FACTOR`` map; ``image.prior`` alike), or
``image.intra`` instead of ``image``: the backbone's own strings (its y parts and z,
``SingleViewCodec.num_strings``); the first coded view also holds ``scene.depth_range`` (two float64
and a u16: near, far, ``DEPTH_FACTOR``).
Two streams per view keep the container's per-stream overhead small.

Model ids are ``joint-<size>``; weights are ``lmvic/weights/<model id>.pt`` with a SHA-256 sidecar.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Collection, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import lmvic  # noqa: F401  (torchvision shim before compressai)
from compressai.models import CompressionModel

from geometry.warp import Relation, multiscale, relate
from lmvic.bitstream import (UNSHIPPED, BitstreamError, LatentStream, SceneHeader, SceneReader, ViewInfo, ViewRecord,
                             write_scene)
from lmvic.models.depth_codec import DepthCodec, DepthRange, build_depth_codec, cross_view_prediction
from lmvic.models.joint import JointImageCodec, Side, build_joint_image
from lmvic.exact import EXACT_THREADS, fixed_threads
from lmvic.models.single_view import DEFAULT_LAMBDAS, SIZES, SingleViewCodec, build_recorded
from lmvic.precision import float32
from lmvic.zoo import (WEIGHTS_DIR, WeightsError, base_reference, load_base, load_named, read_weights, weights_id,
                       write_weights)
from pipelines.errors import LmvicError

PAD = 64
WEIGHT_FORMAT = 4  # 2: depth coded at 1/64, aligned-latent QPEM context; 3: depth at 1/16; 4: QPEM reference anchor
# 8 until session 5: on full fox frames 1/16 cut the depth stream 4.6x, image bytes -0.6 %; 16 until session 9:
# on the first 6 views of fox and sceaux_castle at q1, 1/64 cut it 3.9x and 2.5x, image bytes +0.3 % and -0.1 %,
# same PSNR (the depth codec of then could not code its maps at any resolution); 64 until session 14: the 4-stage
# depth codec gave a whole 1/64 map two latent vectors (median depth error fox 6.7 %, sceaux 22 %); at 1/16 it
# has 15–20 (benchmarks/results/depth_codec.txt). 1/8, retrained in session 16, fixed sceaux_castle's depth (median error 6.1 %
# → 3.0 %) but the image codec saved ~1 % of fox's image bits for twice its depth bytes (BD-rate vs x265 LDP +97.3 → +101.7 %,
# sceaux +29.7 → +29.3 %): not shipped
DEPTH_FACTOR = 16
DEPTH_QUALITY = 1
#: Changes when the encoder codes the same input differently (2: unused depth streams dropped; 3: depth
#: at 1/64; 4: trust tolerance 0.15 and the prior mode; 5: depth at 1/16); ``lmvic eval`` then measures again
#: instead of reusing its results.
ENCODER_REVISION = 5
#: Relative occlusion tolerance τ of the codec's trust mask on *decoded* depths (``geometry.warp.relate``).
#: The relations stage's 0.02 suits the stage-one depth; the depth codec's 1/64 maps of session 11 were off by
#: ~7 % (median, fox) and τ = 0.02 trusted 66 % of fox's latent against 91 % with the same maps uncoded. τ = 0.15: 95 %,
#: estimated image bits with/without reference 0.742 → 0.679 (q1), 0.826 → 0.795 (q6); 0.4 gained nothing more
#: (session 11, ``benchmarks/reference_latent.py``).
TRUST_TOLERANCE = 0.15
MODEL_IDS = tuple(f"joint{variant}-{size}" for variant in ("", "-concat") for size in SIZES)
RANGE_STREAM = "scene.depth_range"
INTRA_STREAM = "image.intra"  # the view's image coded by the single-view backbone alone
PRIOR_STREAM = "image.prior"  # coded with the reference in the entropy model only (no ICT fusion)
#: The image stream of each image mode (``JointCodec.encode_image``).
IMAGE_STREAMS = {"inter": "image", "prior": PRIOR_STREAM, "intra": INTRA_STREAM}
_RANGE = struct.Struct("<2dH")  # near, far, DEPTH_FACTOR
_RELATION_FACTORS = (1, 2, 4, 8, 16)


@dataclass
class DecodedView:
    """What a later view needs from a decoded one (padded size H×W).

    image (B, 3, H, W) in [0, 1]; features: image decoder features at 1/8, 1/4, 1/2 (both None
    when only the depth codec runs, in depth-only training); depth (B, H, W) metric (None when the
    view's depth was not coded); K (B, 3, 3); T (B, 4, 4) world-to-camera.
    """

    image: Tensor | None
    features: list[Tensor] | None
    depth: Tensor | None
    K: Tensor
    T: Tensor


class JointCodec(CompressionModel):
    """The joint-mode pair: ``depth`` (DepthCodec) and ``image`` (JointImageCodec), one model id.

    A ``CompressionModel`` so that ``update``, ``aux_loss`` and ``load_state_dict`` (CDF buffers
    of any size) cover both codecs. ``aligned=False`` is the paper's *Concatenation* ablation: the
    ICT modules (and the QPEM's reference latent) take the reference unwarped (zero disparity; the
    trust mask and the depth codec's CVDP are kept), model id ``joint-concat-<size>``.
    """

    def __init__(self, image: JointImageCodec, depth: DepthCodec, size: str, aligned: bool = True):
        super().__init__()
        if image.num_qualities != depth.num_qualities:
            raise ValueError("image and depth codecs must have the same quality levels")
        self.image, self.depth, self.size, self.aligned = image, depth, size, aligned
        self.weights = UNSHIPPED  # the container's digest of these weights (``load_joint_file`` sets it)

    @property
    def model_id(self) -> str:
        return f"joint-{self.size}" if self.aligned else f"joint-concat-{self.size}"

    @property
    def num_qualities(self) -> int:
        return self.image.num_qualities

    # ---- depth resolution -------------------------------------------------------------------
    @staticmethod
    def coarse_depth(normalised: Tensor) -> Tensor:
        """Normalised depth (B, 1, H, W), H and W multiples of ``DEPTH_FACTOR`` → the map the depth
        codec codes: block means, edge-padded to multiples of 64 (B, 1, h, w)."""
        return pad(F.avg_pool2d(normalised, DEPTH_FACTOR))

    @staticmethod
    def unpadded(coarse: Tensor, size: tuple[int, int]) -> Tensor:
        """A coarse map (B, 1, h, w) without its padding: the samples of an image of ``size``."""
        return coarse[..., : size[0] // DEPTH_FACTOR, : size[1] // DEPTH_FACTOR]

    @classmethod
    def fine_depth(cls, coded: Tensor, size: tuple[int, int]) -> Tensor:
        """Decoded coarse map (B, 1, h, w) → normalised depth (B, 1, H, W) at the image size."""
        return F.interpolate(cls.unpadded(coded, size), size=size, mode="bilinear", align_corners=False)

    # ---- reference path (shared by training and coding) -------------------------------------
    def depth_side(self, ref: DecodedView | None, K: Tensor, T: Tensor, size: tuple[int, int],
                   depth_range: DepthRange) -> Side | None:
        """CVDP side information of the depth codec for its coded map of ``size`` (None without a
        reference or when the reference's depth was not coded)."""
        if ref is None or ref.depth is None:
            return None
        prediction, hit = float32(cross_view_prediction)(ref.depth, ref.K, ref.T, coarse_intrinsics(K), T, size, depth_range)
        return self.depth.prediction_side(prediction, hit)

    def relation(self, ref: DecodedView, depth_hat: Tensor, K: Tensor, T: Tensor) -> Relation:
        """Disparity to the reference and the codec's trust mask (``TRUST_TOLERANCE``) from the decoded
        depths of both views: ``depth_hat`` (B, H, W) and ``ref.depth``."""
        # pixel coordinates: never bf16
        return float32(relate)(depth_hat, K, T, ref.depth, ref.K, ref.T, TRUST_TOLERANCE)

    def image_side(self, ref: DecodedView | None, depth_hat: Tensor, K: Tensor, T: Tensor) -> Side | None:
        """ICT side information from the decoded depths of both views (None without reference)."""
        if ref is None:
            return None
        rel = self.relation(ref, depth_hat, K, T)
        disparity = rel.disparity if self.aligned else torch.zeros_like(rel.disparity)
        return self.image.reference_side(ref.image, ref.features,
                                         multiscale(disparity, rel.mask, _RELATION_FACTORS))

    # ---- training path ----------------------------------------------------------------------
    def forward_view(self, image: Tensor, depth: Tensor, K: Tensor, T: Tensor, quality: float | Tensor,
                     depth_range: DepthRange, ref: DecodedView | None, with_image: bool = True
                     ) -> tuple[dict[str, object], DecodedView]:
        """One view of a clip (B, 3, H, W), depth (B, H, W) → ({"depth": out, "image": out}, DecodedView).

        Each ``out`` is the codec's ``forward`` dict; the depth output ``x_hat`` is the decoded
        normalised depth upsampled to the image size (B, 1, H, W), ``coarse`` and ``coarse_hat`` the
        map the depth codec coded and its decoding (B, 1, h, w), padded.
        ``with_image=False`` runs the depth codec only (its CVDP chain needs only decoded depths):
        the image output and the decoded image are None.
        """
        size = tuple(image.shape[-2:])
        coarse = self.coarse_depth(depth_range.normalise(depth))
        d_out = self.depth(coarse, DEPTH_QUALITY, self.depth_side(ref, K, T, tuple(coarse.shape[-2:]), depth_range))
        d_out = {**d_out, "x_hat": self.fine_depth(d_out["x_hat"], size), "coarse": coarse, "coarse_hat": d_out["x_hat"]}
        depth_hat = depth_range.denormalise(d_out["x_hat"])
        if not with_image:
            return {"depth": d_out, "image": None}, DecodedView(None, None, depth_hat, K, T)
        i_out = self.image(image, quality, self.image_side(ref, depth_hat, K, T))
        decoded = DecodedView(i_out["x_hat"].clamp(0, 1), i_out["features"], depth_hat, K, T)
        return {"depth": d_out, "image": i_out}, decoded

    def forward(self, images: Tensor, depths: Tensor, K: Tensor, T: Tensor, quality: float | Tensor,
                depth_range: DepthRange, with_image: bool = True) -> list[dict[str, object]]:
        """A clip in coding order: images (B, L, 3, H, W), depths (B, L, H, W), K (B, L, 3, 3),
        T (B, L, 4, 4) → per view the ``forward_view`` outputs (the first view has no reference)."""
        ref, outs = None, []
        for t in range(images.shape[1]):
            out, ref = self.forward_view(images[:, t], depths[:, t], K[:, t], T[:, t], quality, depth_range, ref,
                                         with_image)
            outs.append(out)
        return outs

    # ---- coding -----------------------------------------------------------------------------
    def encode_depth(self, depth: Tensor, K: Tensor, T: Tensor, depth_range: DepthRange,
                     ref: DecodedView | None) -> tuple[LatentStream, Tensor]:
        """Code one padded view's depth (1, H, W) → (stream ``depth``, the decoder's metric depth
        (1, H, W)); CVDP predicts it from the reference's decoded depth when the reference has one."""
        coarse = self.coarse_depth(depth_range.normalise(depth))
        d_side = _exact(self.depth_side, ref, K, T, tuple(coarse.shape[-2:]), depth_range)
        strings, shape, y_hat = self.depth.encode(coarse, DEPTH_QUALITY, d_side)
        return LatentStream.coded(strings, shape), self._decoded_depth(y_hat, d_side, tuple(depth.shape[-2:]),
                                                                       depth_range)

    def encode_depth_chain(self, depths: Sequence[Tensor], K: Tensor, T: Tensor, depth_range: DepthRange
                           ) -> tuple[list[LatentStream], list[Tensor]]:
        """Code padded depths (1, H, W) of views in coding order, each predicted by CVDP from the previous
        view's decoded depth (the first without reference), K (V, 3, 3), T (V, 4, 4) → (streams, the
        decoder's metric depths (1, H, W)): the depth codec alone, as ``encode_scene`` codes a chain of
        views that all keep their depth."""
        streams, decoded = [], []
        for i, depth in enumerate(depths):
            ref = DecodedView(None, None, decoded[-1], K[i - 1:i], T[i - 1:i]) if decoded else None
            stream, depth_hat = self.encode_depth(depth, K[i:i + 1], T[i:i + 1], depth_range, ref)
            streams.append(stream)
            decoded.append(depth_hat)
        return streams, decoded

    def encode_image(self, image: Tensor, quality: int, mode: str, side: Side | None,
                     depth_hat: Tensor | None, K: Tensor, T: Tensor, refine_steps: int = 0,
                     valid: tuple[int, int] | None = None) -> tuple[LatentStream, DecodedView, Tensor]:
        """Code one padded image (1, 3, H, W) → (stream, the decoder's DecodedView with depth ``depth_hat``,
        ŷ: ``decoded_view`` of it with the same side rebuilds that view). ``refine_steps``: encoder-side
        latent refinement (``lmvic.refine``) of the image's top-left ``valid`` (height, width).

        ``side``: ``image_side`` of the view's reference (computed by ``_exact``; None without one).
        ``mode`` (stream ``IMAGE_STREAMS[mode]``): ``inter`` the joint image codec with ``side`` (ICT and
        entropy model); ``prior`` the same reference for the entropy model only (``Side.entropy_only``:
        the backbone's latent and reconstruction, made cheaper); ``intra`` the backbone alone."""
        if mode == "intra":
            strings, shape, y_hat = self.image.backbone.encode_latent(image, quality, None, refine_steps, valid)
            return LatentStream.coded(strings, shape), self.decoded_view(y_hat, quality, None, depth_hat, K, T), y_hat
        i_side = _side_of(mode, side)
        strings, shape, y_hat = self.image.encode(image, quality, i_side, refine_steps, valid)
        return LatentStream.coded(strings, shape), self.decoded_view(y_hat, quality, i_side, depth_hat, K, T), y_hat

    def rd_cost(self, nbytes: int, decoded: Tensor, image: Tensor, quality: int) -> float:
        """The training loss's RD cost of coding ``image`` (1, 3, H, W) in ``nbytes`` bytes decoding
        to ``decoded``, times its pixels (so that views add up): bits + λ_quality·255²·MSE·H·W."""
        lam = float(self.image.backbone.lambdas[quality - 1])
        return 8 * nbytes + lam * 255**2 * float(F.mse_loss(decoded, image)) * image.shape[-2] * image.shape[-1]

    def decode_view(self, streams: ViewRecord, K: Tensor, T: Tensor, size: tuple[int, int], quality: int,
                    depth_range: DepthRange, ref: DecodedView | None) -> DecodedView:
        """Inverse of ``encode_depth`` (if the record has a ``depth`` stream) then ``encode_image``
        for a padded size (H, W)."""
        depth_hat = None
        if "depth" in streams:
            coarse = coarse_size(size)
            d_side = _exact(self.depth_side, ref, K, T, coarse, depth_range)
            y_hat = self.depth.decode_latent(*_strings(streams, "depth", coarse), DEPTH_QUALITY, d_side)
            depth_hat = self._decoded_depth(y_hat, d_side, size, depth_range)
        modes = _image_modes(streams)
        if len(modes) != 1:
            raise BitstreamError("a view record must hold exactly one of the streams "
                                 + ", ".join(map(repr, IMAGE_STREAMS.values())))
        if modes == ["intra"]:
            backbone = self.image.backbone
            y_hat = backbone.decode_latent(*_strings(streams, INTRA_STREAM, size, backbone.num_strings), quality)
            return self.decoded_view(y_hat, quality, None, depth_hat, K, T)
        if ref is not None and (depth_hat is None or ref.depth is None):
            raise BitstreamError("a view coded with its reference needs the depth streams of both views")
        i_side = _side_of(modes[0], _exact(self.image_side, ref, depth_hat, K, T))
        y_hat = self.image.decode_latent(*_strings(streams, IMAGE_STREAMS[modes[0]], size), quality, i_side)
        return self.decoded_view(y_hat, quality, i_side, depth_hat, K, T)

    def _decoded_depth(self, y_hat: Tensor, side: Side | None, size: tuple[int, int],
                       depth_range: DepthRange) -> Tensor:
        """Depth latent → metric depth (B, H, W) at the padded image size, as encoder and decoder see it."""
        coded = self.depth.reconstruct(y_hat, DEPTH_QUALITY, side)[-1]
        with fixed_threads(EXACT_THREADS), torch.no_grad():
            return depth_range.denormalise(self.fine_depth(coded, size))

    def decoded_view(self, y_hat: Tensor, quality: int, side: Side | None, depth_hat: Tensor | None,
                     K: Tensor, T: Tensor) -> DecodedView:
        """Image latent ŷ (gained, as coded) with ``side`` → the view as the decoder rebuilds it."""
        feats = self.image.reconstruct(y_hat, quality, side)
        return DecodedView(feats[-1].clamp(0, 1), feats[:-1], depth_hat, K, T)


def _side_of(mode: str, side: Side | None) -> Side | None:
    """The image codec's side information in mode ``inter`` (``side``) or ``prior`` (its entropy part)."""
    return side.entropy_only() if mode == "prior" and side is not None else side


def _exact(fn: Callable, *args: object) -> object:
    """``fn(*args)`` without gradients on ``EXACT_THREADS`` threads (identical in encoder and decoder)."""
    with fixed_threads(EXACT_THREADS), torch.no_grad():
        return fn(*args)


def coarse_intrinsics(K: Tensor) -> Tensor:
    """Intrinsics (B, 3, 3) of the image → those of its ``DEPTH_FACTOR``-block-mean depth map
    (pixel centres at +0.5, so the first two rows scale by 1/DEPTH_FACTOR)."""
    return torch.cat([K[:, :2] / DEPTH_FACTOR, K[:, 2:]], dim=1)


def coarse_size(size: tuple[int, int]) -> tuple[int, int]:
    """Padded image size (H, W) → size of the depth map the depth codec codes (``coarse_depth``)."""
    return tuple(-(-(s // DEPTH_FACTOR) // PAD) * PAD for s in size)


def _strings(streams: ViewRecord, name: str, size: tuple[int, int], chunks: int = 5
             ) -> tuple[list[list[bytes]], tuple[int, int]]:
    """Check and unpack one codec's stream of ``chunks`` strings coding a map of ``size`` → (strings,
    z shape) for ``decode_latent``."""
    z_shape = (size[0] // PAD, size[1] // PAD)
    stream = streams.get(name)
    if stream is None:
        raise BitstreamError(f"stream {name!r} missing from a view record")
    if tuple(stream.shape) != z_shape or len(stream.chunks) != chunks:
        raise BitstreamError(f"stream {name!r} has shape {tuple(stream.shape)} and {len(stream.chunks)} chunks, "
                             f"expected {z_shape} and {chunks} for this image size")
    return stream.strings(), z_shape


# ---- scene level --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SceneInput:
    """Views to code: names, uint8 RGB images (H, W, 3), float depth maps (H, W) in camera z
    (0 = invalid), intrinsics (V, 3, 3) and world-to-camera (V, 4, 4)."""

    names: Sequence[str]
    images: Sequence[np.ndarray]
    depths: Sequence[np.ndarray]
    intrinsics: np.ndarray
    world_to_camera: np.ndarray


@dataclass(frozen=True)
class DecodedScene:
    """Decoded views by name: uint8 RGB (H, W, 3) and float32 depth (H, W), original sizes; ``depths``
    holds only the views whose depth the file codes."""

    header: SceneHeader
    images: dict[str, np.ndarray]
    depths: dict[str, np.ndarray]


def pad(x: Tensor, multiple: int = PAD) -> Tensor:
    """(…, H, W) → right/bottom edge-replicated to multiples of ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not ph and not pw:
        return x
    flat = x.reshape(-1, 1, h, w)
    return F.pad(flat, (0, pw, 0, ph), mode="replicate").reshape(*x.shape[:-2], h + ph, w + pw)


def padded_image(image: np.ndarray) -> Tensor:
    """uint8 (H, W, 3) → (1, 3, H', W') in [0, 1], edge-padded to multiples of ``PAD``."""
    return pad(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255)


def to_uint8(image: Tensor, height: int, width: int) -> np.ndarray:
    """Inverse of :func:`padded_image` for a decoded (1, 3, H', W') image in [0, 1]: cropped, uint8 (H, W, 3)."""
    return (image[0, :, :height, :width].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def _camera(view: ViewInfo) -> tuple[Tensor, Tensor]:
    """(1, 3, 3), (1, 4, 4) float32 tensors from the header's float64 camera (as the decoder sees it)."""
    return (torch.from_numpy(view.intrinsics.copy()).float()[None],
            torch.from_numpy(view.world_to_camera.copy()).float()[None])


def references_of(order: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Each view's reference: the view before it in ``order`` (none for the first)."""
    refs: list[tuple[int, ...]] = [()] * len(order)
    for prev, view in zip(order[:-1], order[1:]):
        refs[view] = (prev,)
    return tuple(refs)


CODING_MODES = ("rd", "inter", "prior", "intra")
_CANDIDATES = {"rd": ("inter", "prior", "intra"), "inter": ("inter",), "prior": ("prior",), "intra": ("intra",)}


def encode_scene(codec: JointCodec, scene: SceneInput, order: Sequence[int], quality: int,
                 modes: str | Sequence[str] = "rd", refine_steps: int = 0
                 ) -> tuple[SceneHeader, list[dict[str, LatentStream]], DecodedScene]:
    """Code every view in ``order`` → (header, records in view-index order, the decoder's output).

    ``modes``, one for every view or one per view (view-index order): ``"rd"`` the mode of lowest RD
    cost, or one image mode of ``JointCodec.encode_image``: ``"inter"`` the joint image codec,
    ``"prior"`` the reference in its entropy model only, ``"intra"`` the backbone alone.
    A first pass codes every view's depth and every image mode of every ``"rd"`` view, carrying the
    one of lowest image RD cost to the next view; whether each view uses its reference is then chosen
    for the whole chain (``choose_modes``, a reference mode costing its cheaper one), counting a
    view's depth stream only where the reference path needs it: for its own image or its successor's.
    If that drops depths or changes modes, a second pass codes the kept depths again (CVDP from the
    reference only where its depth is kept) and the images in the chosen modes (the cheaper
    reference mode again where the reference is used), reusing the first pass's image streams that
    depend on no depth. ``refine_steps`` > 0: the modes are chosen as above, then a last pass codes
    every view in its chosen mode with encoder-side latent refinement (``lmvic.refine``; the decoder
    is the same), so a view is refined once, not once per candidate mode.
    """
    if not 1 <= quality <= codec.num_qualities:
        raise LmvicError(f"quality {quality} not available: the model has levels 1..{codec.num_qualities}")
    count = len(scene.names)
    if not (len(scene.images) == len(scene.depths) == count == len(scene.intrinsics) == len(scene.world_to_camera)):
        raise LmvicError("scene input: names, images, depths and cameras differ in count")
    plan = [modes] * count if isinstance(modes, str) else list(modes)
    if len(plan) != count or not set(plan) <= set(CODING_MODES):
        raise LmvicError(f"modes: one of {', '.join(CODING_MODES)} for all views or for each of the {count} views")
    views = []
    for name, image, depth, K, T in zip(scene.names, scene.images, scene.depths, scene.intrinsics,
                                        scene.world_to_camera):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or depth.shape != image.shape[:2]:
            raise LmvicError(f"view {name!r}: need uint8 (H, W, 3) image and (H, W) depth of the same size")
        views.append(ViewInfo(name, image.shape[0], image.shape[1], K, T))
    header = SceneHeader("joint", codec.model_id, quality, tuple(views), tuple(order), references_of(order),
                         codec.weights)
    try:
        depth_range = DepthRange.of(torch.cat([torch.as_tensor(d, dtype=torch.float32).flatten() for d in scene.depths]))
    except ValueError as exc:
        raise LmvicError(f"cannot code the scene's depth: {exc}") from exc
    codec.eval()
    coder = _SceneCoder(codec, scene, views, order, quality, depth_range)
    records, chain, costs, reusable = coder.run([_CANDIDATES[p] for p in plan], depth_views=range(count))
    inter = choose_modes(order, costs, {i: 8 * r["depth"].nbytes for i, r in enumerate(records)})
    needed = {j for rank, i in enumerate(order) if rank and inter[i] for j in (i, order[rank - 1])}
    again = [tuple(m for m in _CANDIDATES[plan[i]] if (m != "intra") == inter[i]) for i in range(count)]
    if refine_steps:  # modes chosen on the plain codings; the final pass refines each view's chosen one
        first = [_image_modes(r)[0] for r in records]
        final = [(first[i],) if (first[i] != "intra") == inter[i] else again[i] for i in range(count)]
        records, chain, _, _ = replace(coder, refine_steps=refine_steps).run(final, needed)
    elif len(needed) < count or any(inter[i] == (INTRA_STREAM in records[i]) for i in range(count)):
        records, chain, _, _ = coder.run(again, needed, reusable)
    range_bytes = _RANGE.pack(depth_range.near, depth_range.far, DEPTH_FACTOR)
    records[order[0]][RANGE_STREAM] = LatentStream((range_bytes,), (3,))
    return header, records, chain.output(header)


def _image_modes(record: ViewRecord) -> list[str]:
    """The image modes whose stream (``IMAGE_STREAMS``) a view record holds (one in a valid record)."""
    return [mode for mode, name in IMAGE_STREAMS.items() if name in record]


def choose_modes(order: Sequence[int], costs: dict[int, dict[bool, float]], depth_bits: dict[int, float]
                 ) -> dict[int, bool]:
    """Each view's image mode (True: the joint image codec) minimising the scene's RD cost.

    ``costs[i]``: RD cost of view i's image in each mode it may take (``JointCodec.rd_cost``);
    ``depth_bits[i]``: its depth stream's bits, paid only if view i (not first in ``order``) takes
    the joint image codec or its successor does. Dynamic programming along the chain (the state is
    the previous view's mode), exact for these costs."""
    # best[m]: (cost so far with the last view in mode m, its depth not yet counted; the modes so far)
    best = {m: (c, [m]) for m, c in costs[order[0]].items()}
    for rank in range(1, len(order)):
        i, prev = order[rank], order[rank - 1]
        best = {m: min(((cost + c + (depth_bits[prev] if m or (m_prev and rank > 1) else 0), modes + [m])
                        for m_prev, (cost, modes) in best.items()), key=lambda t: t[0])
                for m, c in costs[i].items()}
    last = len(order) > 1
    _, modes = min(((cost + (depth_bits[order[-1]] if m and last else 0), modes) for m, (cost, modes) in best.items()),
                   key=lambda t: t[0])
    return dict(zip(order, modes))


@dataclass
class _SceneCoder:
    """One coding pass over a scene in its coding order (``encode_scene``)."""

    codec: JointCodec
    scene: SceneInput
    views: list[ViewInfo]
    order: Sequence[int]
    quality: int
    depth_range: DepthRange
    refine_steps: int = 0

    def run(self, plan: Sequence[Sequence[str]], depth_views: Collection[int],
            reuse: dict[tuple[int, str], tuple[LatentStream, Tensor]] | None = None
            ) -> tuple[list[dict[str, LatentStream]], DecodedChain, dict[int, dict[bool, float]],
                       dict[tuple[int, str], tuple[LatentStream, Tensor]]]:
        """Code each view in order: its depth if in ``depth_views``, its image in each mode ``plan[view]``
        lists (without a reference ``prior`` is ``inter``: it is coded only if listed alone), keeping
        the one of lowest RD cost; ``reuse[(view, mode)]``: image codings that depend on no depth (stream
        and ŷ), taken instead of coding again (with the new depth) → (records in view-index order,
        the decoded views, RD costs per view with and without its reference (the cheaper reference mode),
        the codings that depend on no depth)."""
        records: list[dict[str, LatentStream]] = [{} for _ in self.views]
        chain = DecodedChain(self.views)
        costs: dict[int, dict[bool, float]] = {}
        independent: dict[tuple[int, str], tuple[LatentStream, Tensor]] = {}
        for rank, i in enumerate(self.order):
            ref = chain.latest
            image = padded_image(self.scene.images[i])
            K, T = _camera(self.views[i])
            depth_hat = None
            if i in depth_views:
                depth = pad(torch.as_tensor(self.scene.depths[i], dtype=torch.float32)[None])
                records[i]["depth"], depth_hat = self.codec.encode_depth(depth, K, T, self.depth_range, ref)
            candidates = [m for m in plan[i] if rank or m != "prior" or "inter" not in plan[i]]
            side = None  # the reference's side information, shared by the modes that use it
            options: dict[str, tuple[LatentStream, DecodedView]] = {}
            for mode in candidates:
                if reuse is not None and (i, mode) in reuse:
                    stream, y_hat = reuse[i, mode]
                    view = self.codec.decoded_view(y_hat, self.quality, None, depth_hat, K, T)
                else:
                    if mode != "intra" and side is None and ref is not None:
                        side = _exact(self.codec.image_side, ref, depth_hat, K, T)
                    stream, view, y_hat = self.codec.encode_image(image, self.quality, mode, side, depth_hat, K, T,
                                                                  self.refine_steps, self.scene.images[i].shape[:2])
                options[mode] = stream, view
                if mode == "intra" or not rank:
                    independent[i, mode] = stream, y_hat
            mode_costs = {mode: self.codec.rd_cost(stream.nbytes, view.image, image, self.quality)
                          for mode, (stream, view) in options.items()}
            costs[i] = {}
            for mode, cost in mode_costs.items():
                uses_ref = mode != "intra"
                costs[i][uses_ref] = min(cost, costs[i].get(uses_ref, cost))
            mode = min(mode_costs, key=mode_costs.get)
            stream, view = options[mode]
            chain.push(i, view)
            records[i][IMAGE_STREAMS[mode]] = stream
        return records, chain, costs, independent


class DecodedChain:
    """The views of a scene decoded so far, in coding order: the latest one whole (the next view's
    reference), every earlier one only as the decoder's output (uint8 image and float32 depth at its
    size), so that coding a scene holds one view's decoder features (≈ 80 MB for a 704×1216 view) and
    float32 image, not every view's."""

    def __init__(self, views: Sequence[ViewInfo]):
        self.views = views
        self.latest: DecodedView | None = None
        self._latest_index = -1
        self.images: dict[str, np.ndarray] = {}
        self.depths: dict[str, np.ndarray] = {}

    def push(self, index: int, view: DecodedView) -> None:
        """View ``index`` (of ``views``) is decoded: it becomes the latest, the previous one output only."""
        self._retire()
        self.latest, self._latest_index = view, index

    def output(self, header: SceneHeader, wanted: Collection[str] | None = None) -> DecodedScene:
        """The views pushed (those named in ``wanted``; None: all), as the decoder outputs them, in
        view-index order (as ``header.views``)."""
        self._retire()
        names = [v.name for v in self.views if wanted is None or v.name in wanted]
        return DecodedScene(header, {n: self.images[n] for n in names if n in self.images},
                            {n: self.depths[n] for n in names if n in self.depths})

    def _retire(self) -> None:
        if self.latest is None:
            return
        info = self.views[self._latest_index]
        self.images[info.name] = to_uint8(self.latest.image, info.height, info.width)
        if self.latest.depth is not None:
            self.depths[info.name] = self.latest.depth[0, :info.height, :info.width].numpy().astype(np.float32)
        self.latest = None


def encode_scene_file(path: str | Path, codec: JointCodec, scene: SceneInput, order: Sequence[int],
                      quality: int, refine_steps: int = 0) -> tuple[int, DecodedScene]:
    """``encode_scene`` and write the container atomically → (file bytes, the decoder's output)."""
    header, records, output = encode_scene(codec, scene, order, quality, refine_steps=refine_steps)
    return write_scene(path, header, records), output


def _depth_range(stream: LatentStream | None) -> DepthRange:
    if stream is None or len(stream.chunks) != 1 or len(stream.chunks[0]) != _RANGE.size:
        raise BitstreamError(f"the first coded view lacks a valid {RANGE_STREAM!r} stream "
                             "(files of lmvic before session 5 coded depth at 1/8 and cannot be read)")
    near, far, factor = _RANGE.unpack(stream.chunks[0])
    if factor != DEPTH_FACTOR:
        raise BitstreamError(f"the file codes depth at 1/{factor} of the image size; "
                             f"this decoder codes 1/{DEPTH_FACTOR}")
    try:
        return DepthRange(near, far)
    except ValueError as exc:
        raise BitstreamError(f"corrupt {RANGE_STREAM!r}: {exc}") from exc


def decode_scene_file(source: str | Path, codec: JointCodec | None = None,
                      views: Collection[str] | None = None) -> DecodedScene:
    """Decode a joint-mode container (another process than the encoder is fine).

    Args:
        source: the file. codec: the model; None loads the shipped weights of the file's model id.
        views: names to output (None: all); their predecessors in the coding order are decoded too.
    """
    with SceneReader(source, models=MODEL_IDS) as reader:
        header = reader.header
        if header.mode != "joint":
            raise BitstreamError(f"this is a {header.mode}-mode file; the joint decoder reads joint mode")
        if header.references != references_of(header.order):
            raise BitstreamError("joint-mode references must be the previous view in the coding order")
        if codec is None:
            codec = load_named(header.model_id, MODEL_IDS, load_joint, "joint")
        if codec.model_id != header.model_id:
            raise BitstreamError(f"file was coded with model {header.model_id!r}, decoder has {codec.model_id!r}")
        header.check_weights(codec.weights)
        if not 1 <= header.quality <= codec.num_qualities:
            raise BitstreamError(f"quality {header.quality} is not a level of model {header.model_id!r}")
        names = [v.name for v in header.views]
        wanted = set(names) if views is None else set(views)
        unknown = wanted - set(names)
        if unknown:
            raise LmvicError(f"views not in the file: {', '.join(sorted(unknown))}")
        last = max(rank for rank, i in enumerate(header.order) if names[i] in wanted)
        codec.eval()
        depth_range = _depth_range(reader.read_view(header.order[0]).get(RANGE_STREAM))
        chain = DecodedChain(header.views)
        for i in header.order[: last + 1]:
            info = header.views[i]
            size = (info.height + -info.height % PAD, info.width + -info.width % PAD)
            K, T = _camera(info)
            chain.push(i, codec.decode_view(reader.read_view(i), K, T, size, header.quality, depth_range,
                                            chain.latest))
    return chain.output(header, wanted)


# ---- models and weights -------------------------------------------------------------------------
def build_joint(size: str = "cpu", lambdas: tuple[float, ...] = DEFAULT_LAMBDAS,
                backbone: SingleViewCodec | None = None, aligned: bool = True) -> JointCodec:
    """A joint codec of ``size``; its image backbone is ``backbone`` (e.g. shipped single-view
    weights, making the fresh joint codec exactly as good as the single-view one) or fresh.
    ``aligned=False``: the Concatenation ablation (see :class:`JointCodec`)."""
    if backbone is not None:
        lambdas = tuple(backbone.lambdas.tolist())
    return JointCodec(build_joint_image(size, lambdas, backbone), build_depth_codec(size, lambdas), size, aligned)


class JointPart(CompressionModel):
    """What the joint codec adds to a frozen single-view base: the image codec's reference path,
    QPEM and fusions, and the whole depth codec. It shares the codec's modules, so loading it
    fills the codec in place."""

    def __init__(self, codec: JointCodec):
        super().__init__()
        self.image = torch.nn.ModuleDict({n: m for n, m in codec.image.named_children() if n != "backbone"})
        self.depth = codec.depth


def save_joint(codec: JointCodec, path: Path, base: str | None = None, half: bool = True, training: str = "",
               held_out: Sequence[str] = ()) -> Path:
    """Write ``codec`` (CDFs refreshed; float16 parameters if ``half``) and its ``.json`` SHA-256 sidecar,
    with ``training`` (how it was trained) and ``held_out`` (the scenes kept out of its training) in the
    sidecar when given, and the depth map's scale and quality the format codes it at (``DEPTH_FACTOR``,
    ``DEPTH_QUALITY``).

    ``base``: the shipped single-view weights its image backbone is (trained frozen); the file then
    holds only the :class:`JointPart` and the base's name and SHA-256, checked on loading.
    """
    payload = {"format": WEIGHT_FORMAT, "size": codec.size, "lambdas": codec.image.backbone.lambdas.tolist(),
               "aligned": codec.aligned, "entropy": codec.image.backbone.entropy}
    if base is not None:
        payload.update(base_reference(base))
    meta = {"model_id": codec.model_id, **{k: v for k, v in payload.items() if k.startswith("base")},
            **({"training": training} if training else {}), **({"held_out": list(held_out)} if held_out else {}),
            "depth_factor": DEPTH_FACTOR, "depth_quality": DEPTH_QUALITY}
    return write_weights(codec if base is None else JointPart(codec), path, payload, meta, half)


def load_joint_file(path: Path) -> JointCodec:
    """A codec written by ``save_joint`` (eval mode, CDFs ready, ``weights`` the file's digest);
    ``WeightsError`` if missing or corrupt."""
    path = Path(path)
    ck = read_weights(path, WEIGHT_FORMAT, "joint weights")
    aligned = ck.get("aligned", True)
    if "base" not in ck:
        codec = build_joint(ck["size"], backbone=build_recorded(ck), aligned=aligned)
        codec.load_state_dict(ck["state_dict"])
    else:
        codec = build_joint(ck["size"], backbone=load_base(ck, f"joint weights {path.name}", path.parent),
                            aligned=aligned)
        try:
            JointPart(codec).load_state_dict(ck["state_dict"])
        except RuntimeError as exc:
            raise WeightsError(f"{path.name} does not fit the joint architecture: {exc}") from exc
    codec.weights = weights_id(path.stem, path.parent)
    return codec.eval()


def load_joint(model_id: str, directory: Path = WEIGHTS_DIR) -> JointCodec:
    """The shipped joint codec ``model_id`` (e.g. ``joint-cpu``)."""
    if model_id not in MODEL_IDS:
        raise WeightsError(f"unknown joint model {model_id!r} (known: {', '.join(MODEL_IDS)})")
    codec = load_joint_file(directory / f"{model_id}.pt")
    if codec.model_id != model_id:
        raise WeightsError(f"{model_id}.pt holds a {codec.model_id!r} codec")
    return codec
