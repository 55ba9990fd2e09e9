"""Variable-rate single-view image codec: mean-scale Gaussian hyperprior with gain units, and
optionally QPEM's four-step context model over it (``lmvic.qpem``).

One model codes every quality level 1..Q: per-channel gain vectors scale the latent before
quantisation and inverse gains rescale it before synthesis (Cui et al., CVPR 2021); the level is
a float, so fractional qualities interpolate. The transforms are chains of stride-2 stages
(``lmvic.layers``) so the joint codec can insert cross-view modules between them, and the
entropy-parameter head accepts optional context channels at the latent resolution (1/16).

Decoding is bit-exact across processes: the Gaussian parameters that select the CDFs (and the
means added back to the symbols) are computed in float64 on one thread, from integer hyper-latents,
by the same function on both sides; the synthesis runs on a fixed thread count (``EXACT_THREADS``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

import lmvic  # noqa: F401  (torchvision shim before compressai)
from lmvic.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.models import CompressionModel
from lmvic.exact import EXACT_THREADS, call_in_float64, fixed_threads
from lmvic.layers import (
    AnalysisStage,
    EntropyParameters,
    GainUnit,
    SynthesisStage,
    conv,
    deconv,
    stage_widths,
    ste_round,
)
from lmvic.qpem import STEPS, QuadtreeEntropyModel
from lmvic.refine import refine_latent

#: λ per quality level (loss λ·255²·MSE + bpp), from ≈0.05 to ≈0.6 bpp on Kodak.
DEFAULT_LAMBDAS: tuple[float, ...] = (0.0006, 0.0012, 0.0025, 0.005, 0.01, 0.02)
#: Entropy models of the latent: the hyperprior's mean-scale Gaussian alone, or refined by QPEM.
ENTROPY_MODELS = ("hyperprior", "qpem")


@dataclass(frozen=True)
class CodecSize:
    """Channel widths: N for the transforms' hidden layers and the hyper-latent, M for the latent."""

    N: int
    M: int


SIZES: dict[str, CodecSize] = {"cpu": CodecSize(N=64, M=128), "paper": CodecSize(N=128, M=192)}


class SingleViewCodec(CompressionModel):
    """Variable-rate mean-scale hyperprior codec.

    Args:
        N: hidden width of the transforms and hyper-latent channels.
        M: latent channels (at 1/16 resolution).
        lambdas: rate-distortion λ of each quality level 1..Q (Q ≥ 2), increasing.
        context_ch: extra channels the entropy-parameter head takes at 1/16 resolution (0 = none).
        entropy: "hyperprior" codes y in one pass with the hyperprior's Gaussians; "qpem" in four
            steps whose Gaussians QPEM refines from the latent already decoded (``self.qpem``).

    Attributes (for reuse by the joint codec):
        analysis: 4 ``AnalysisStage`` modules, x (B,3,H,W) → 1/2, 1/4, 1/8 (N ch) → y at 1/16 (M ch).
        synthesis: 4 ``SynthesisStage`` modules, ŷ (M ch, 1/16) → 1/8, 1/4, 1/2 (N ch) → x̂ (3 ch).
        hyper_analysis / hyper_synthesis: y → z (N ch, 1/64) and ẑ → hyper features (2M ch, 1/16).
        entropy_parameters: ``EntropyParameters(2M, M, context_ch)``.
        gain / inverse_gain: ``GainUnit`` over the M latent channels.

    Strings are ``[y part 1, ..., y part k, z]`` with k = 1 (hyperprior) or 4 (QPEM steps):
    ``num_strings`` = k + 1, each a list of B byte strings.
    """

    def __init__(
        self,
        N: int,
        M: int,
        lambdas: tuple[float, ...] = DEFAULT_LAMBDAS,
        context_ch: int = 0,
        entropy: str = "hyperprior",
    ):
        super().__init__()
        if len(lambdas) < 2 or list(lambdas) != sorted(lambdas):
            raise ValueError("lambdas must be at least two increasing values")
        if entropy not in ENTROPY_MODELS:
            raise ValueError(f"entropy must be one of {ENTROPY_MODELS}, got {entropy!r}")
        self.N, self.M, self.context_ch, self.entropy = N, M, context_ch, entropy
        widths = stage_widths(3, N, M)
        self.analysis = nn.ModuleList(
            AnalysisStage(i, o, last=k == len(widths) - 1) for k, (i, o) in enumerate(widths)
        )
        widths = stage_widths(M, N, 3)
        self.synthesis = nn.ModuleList(
            SynthesisStage(i, o, last=k == len(widths) - 1) for k, (i, o) in enumerate(widths)
        )
        self.hyper_analysis = nn.Sequential(
            conv(M, N, 3, 1), nn.LeakyReLU(inplace=True),
            conv(N, N), nn.LeakyReLU(inplace=True),
            conv(N, N),
        )
        self.hyper_synthesis = nn.Sequential(
            deconv(N, M), nn.LeakyReLU(inplace=True),
            deconv(M, M * 3 // 2), nn.LeakyReLU(inplace=True),
            conv(M * 3 // 2, 2 * M, 3, 1),
        )
        self.entropy_parameters = EntropyParameters(2 * M, M, context_ch)
        lam = torch.tensor(lambdas, dtype=torch.float64)
        # Optimal quantiser step ∝ λ^(-1/2): start the gains there so levels differ from step one.
        log_gain = (0.5 * torch.log(lam / lam.log().mean().exp())).float()
        self.gain = GainUnit(log_gain, M)
        self.inverse_gain = GainUnit(-log_gain, M)
        self.register_buffer("lambdas", lam.float())
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.gaussian_conditional = GaussianConditional(None)
        self.qpem = QuadtreeEntropyModel(M) if entropy == "qpem" else None

    # ---- quality handling -------------------------------------------------------------------
    @property
    def num_qualities(self) -> int:
        return int(self.lambdas.numel())

    @property
    def num_strings(self) -> int:
        """Strings per coded image: the y parts and z."""
        return (STEPS if self.qpem is not None else 1) + 1

    def levels(self, quality: float | Tensor, batch: int) -> Tensor:
        """Quality in [1, Q] (scalar or (B,)) → 0-based float levels (B,)."""
        q = torch.as_tensor(quality, dtype=torch.float32, device=self.lambdas.device)
        if q.ndim == 0:
            q = q.expand(batch)
        if q.shape != (batch,):
            raise ValueError(f"quality must be a scalar or have shape ({batch},)")
        if bool(((q < 1) | (q > self.num_qualities)).any()):
            raise ValueError(f"quality must lie in [1, {self.num_qualities}]")
        return q - 1

    def lambda_of(self, quality: float | Tensor, batch: int) -> Tensor:
        """λ for each sample (B,), log-interpolated for fractional qualities."""
        level = self.levels(quality, batch)
        log_lam = self.lambdas.log()
        low = level.floor().long().clamp(max=self.num_qualities - 2)
        frac = level - low
        return ((1 - frac) * log_lam[low] + frac * log_lam[low + 1]).exp()

    # ---- transforms -------------------------------------------------------------------------
    def analyse(self, x: Tensor) -> list[Tensor]:
        """x (B,3,H,W), H and W multiples of 16 → features at 1/2, 1/4, 1/8 (N ch) and y at 1/16 (M ch)."""
        feats = []
        for stage in self.analysis:
            x = stage(x)
            feats.append(x)
        return feats

    def synthesise(self, y_hat: Tensor) -> list[Tensor]:
        """ŷ (B,M,h,w) → decoder features at 1/8, 1/4, 1/2 (N ch) and x̂ at full size (3 ch)."""
        feats = []
        for stage in self.synthesis:
            y_hat = stage(y_hat)
            feats.append(y_hat)
        return feats

    def gaussian_params(self, z_hat: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """ẑ (B,N,h/4,w/4) [+ context (B,context_ch,h,w)] → scales, means (B,M,h,w) (training path)."""
        return self.entropy_parameters(self.hyper_synthesis(z_hat), context)

    def exact_gaussian_params(
        self, z_hat: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Same as ``gaussian_params`` in float64 on ``EXACT_THREADS`` threads (coding path)."""
        with fixed_threads(EXACT_THREADS), torch.no_grad():
            hyper = call_in_float64(self.hyper_synthesis, z_hat)
            return call_in_float64(self.entropy_parameters, hyper, context)

    # ---- CompressAI interface ---------------------------------------------------------------
    def latent(self, x: Tensor, quality: float | Tensor) -> Tensor:
        """x (B,3,H,W), H and W multiples of 16 → the gained latent y (B,M,H/16,W/16) that is quantised."""
        return self.gain(self.analyse(x)[-1], self.levels(quality, x.shape[0]))

    def forward(
        self, x: Tensor, quality: float | Tensor, context: Tensor | None = None
    ) -> dict[str, object]:
        """x (B,3,H,W) in [0,1], quality scalar or (B,) in [1,Q] → {"x_hat", "likelihoods": {"y","z"}}.

        Training uses additive noise for the likelihoods and straight-through rounding of the
        latent fed to the synthesis (mixed quantisation).
        """
        return self.forward_latent(self.latent(x, quality), quality, context)

    def forward_latent(
        self, y: Tensor, quality: float | Tensor, context: Tensor | None = None
    ) -> dict[str, object]:
        """``forward`` from the gained latent y (B,M,h,w) on (what ``latent`` gives, or a refinement of it)."""
        level = self.levels(quality, y.shape[0])
        z = self.hyper_analysis(y)
        _, z_likelihoods = self.entropy_bottleneck(z)
        medians = self.entropy_bottleneck._get_medians().detach().reshape(1, -1, 1, 1)
        z_hat = ste_round(z - medians) + medians
        scales, means = self.gaussian_params(z_hat, context)
        if self.qpem is None:
            _, y_likelihoods = self.gaussian_conditional(y, scales, means=means)
            y_hat = ste_round(y - means) + means
        else:
            y_hat, y_likelihoods = self.qpem(y, scales, means, self.gaussian_conditional)
        x_hat = self.synthesise(self.inverse_gain(y_hat, level))[-1]
        return {"x_hat": x_hat, "likelihoods": {"y": y_likelihoods, "z": z_likelihoods}}

    def compress(
        self, x: Tensor, quality: float, context: Tensor | None = None, refine_steps: int = 0,
        valid: tuple[int, int] | None = None,
    ) -> dict[str, object]:
        """x (B,3,H,W), H, W multiples of 64 → {"strings": [y parts..., z], "shape": (H/64, W/64)}.

        ``refine_steps`` > 0 spends encode time on a cheaper latent for the same decoder
        (``lmvic.refine``); ``valid``: (height, width) of the image within the padded x.
        """
        strings, shape, _ = self.encode_latent(x, quality, context, refine_steps, valid)
        return {"strings": strings, "shape": shape}

    def encode_latent(
        self, x: Tensor, quality: float, context: Tensor | None = None, refine_steps: int = 0,
        valid: tuple[int, int] | None = None,
    ) -> tuple[list[list[bytes]], tuple[int, int], Tensor]:
        """Code x → (strings, shape, ŷ) with ŷ (B,M,H/16,W/16) float64 exactly as ``decode_latent`` gives it
        (``refine_steps``, ``valid``: see ``compress``)."""
        if x.shape[-2] % 64 or x.shape[-1] % 64:
            raise ValueError("compress needs H and W multiples of 64 (pad first)")
        with torch.no_grad():
            y = self.latent(x, quality)
        y = refine_latent(self, partial(self.forward_latent, quality=quality, context=context), x, y,
                          self.lambda_of(quality, x.shape[0]), refine_steps, valid)
        with torch.no_grad():
            return self.code_latent(y, quality, context)

    def code_latent(
        self, y: Tensor, quality: float, context: Tensor | None = None
    ) -> tuple[list[list[bytes]], tuple[int, int], Tensor]:
        """Code the gained latent y (B,M,h,w), h and w multiples of 4 → as ``encode_latent``."""
        z = self.hyper_analysis(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        scales, means = self.exact_gaussian_params(z_hat, context)
        if self.qpem is not None:
            y_strings, y_hat = self.qpem.compress(y, scales, means, self.gaussian_conditional)
            return [*y_strings, z_strings], tuple(z.shape[-2:]), y_hat
        indexes = self.gaussian_conditional.build_indexes(scales)
        y = y.double()
        y_strings = self.gaussian_conditional.compress(y, indexes, means=means)
        y_hat = self.gaussian_conditional.quantize(y, "dequantize", means)
        return [y_strings, z_strings], tuple(z.shape[-2:]), y_hat

    def decompress(
        self,
        strings: list[list[bytes]],
        shape: tuple[int, int],
        quality: float,
        context: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Inverse of ``compress`` → {"x_hat": (B,3,64·h,64·w) in [0,1]}."""
        y_hat = self.decode_latent(strings, shape, quality, context)
        return {"x_hat": self.reconstruct(y_hat, quality)[-1].clamp(0, 1)}

    def decode_latent(
        self,
        strings: list[list[bytes]],
        shape: tuple[int, int],
        quality: float,
        context: Tensor | None = None,
    ) -> Tensor:
        """Entropy-decode ŷ (B,M,4h,4w), gained domain, float64 — identical to the encoder's."""
        if len(strings) != self.num_strings:
            raise ValueError(f"expected {self.num_strings} strings (y parts and z), got {len(strings)}")
        z_hat = self.entropy_bottleneck.decompress(strings[-1], shape)
        scales, means = self.exact_gaussian_params(z_hat, context)
        if self.qpem is not None:
            return self.qpem.decompress(strings[:-1], scales, means, self.gaussian_conditional)
        indexes = self.gaussian_conditional.build_indexes(scales)
        return self.gaussian_conditional.decompress(strings[0], indexes, means.dtype, means)

    def reconstruct(self, y_hat: Tensor, quality: float) -> list[Tensor]:
        """Gained ŷ → decoder features (see ``synthesise``), on ``EXACT_THREADS`` threads."""
        level = self.levels(quality, y_hat.shape[0])
        with fixed_threads(EXACT_THREADS), torch.no_grad():
            return self.synthesise(self.inverse_gain(y_hat.float(), level))


def build_single_view(size: str = "cpu", lambdas: tuple[float, ...] = DEFAULT_LAMBDAS,
                      context_ch: int = 0, entropy: str = "hyperprior") -> SingleViewCodec:
    """A fresh codec of a named size (``SIZES``) and entropy model (``ENTROPY_MODELS``)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    s = SIZES[size]
    return SingleViewCodec(s.N, s.M, lambdas, context_ch, entropy)


def build_recorded(record: dict) -> SingleViewCodec:
    """A fresh codec of the architecture a weight file or training config records: ``size``, ``lambdas``
    and ``entropy`` (absent before the QPEM option existed: the hyperprior)."""
    return build_single_view(record["size"], tuple(record["lambdas"]), entropy=record.get("entropy", "hyperprior"))
