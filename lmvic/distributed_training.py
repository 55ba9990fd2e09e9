"""Staged training of the distributed codecs (OPAM/PMIFM fusion and average pooling) on the CPU.

The encoder must stay the single-view encoder (each camera codes alone), so the shipped
variable-rate single-view codec is frozen and only the decoder-side fusions are trained (started as
the identity, ``lmvic.fusion``, or from shipped distributed weights with ``init_weights``);
``synthesis_lr_scale > 0`` also fine-tunes the synthesis (on three training scenes that overfitted:
−0.1 dB on held-out fox, so it is off by default). One variable-rate model covers every quality
1..Q (a random quality per clip), in place of one model per rate point.

Data: clips of 2–4 views in file order (a random stride of 1..``max_stride``) with one crop window
shared by the clip, from image folders (no geometry). The frozen encoder codes each clip once per
step with real (hard) quantisation and every model being trained decodes the same latents, so the
variants see identical data. Loss of a clip: Σ_v (bpp_v + λ_q·255²·MSE(x_v, x̂_v)) / V with x̂_v the
fused reconstruction (the rate is fixed by the frozen encoder; it is part of the reported RD).

Alignment signal (the RD loss alone left OPAM's attention uniform): each step also codes
``align_pairs`` *shifted pairs* — two crops of one image, the side one moved by a random
``(o_y, o_x)`` up to ``max_shift`` px, so the correspondence is known — and as many pairs of
neighbouring views (real parallax, correspondence unknown). Every fusion's OPAM, on the decoded
features at its scale, pays ``lmvic.opam.photometric_alignment_loss`` (consistency-weighted error
of the aligned side image, with a cost ``invalid_cost`` per unaligned position so the consistency
cannot collapse) on all pairs, plus ``shift_sharpness_weight`` ×
``lmvic.opam.known_shift_sharpness_loss`` (mean correspondence on the match, full consistency) and
``shift_ce_weight`` × ``lmvic.opam.shift_attention_loss`` (cross-entropy of the attention against
the known shift, off by default) on the shifted pairs; this is added to the RD loss with weight
``align_weight``. The cross-entropy is lowered by a softer attention wherever the training matches
are ambiguous (its gradient on the log-temperature was +0.9, the photometric terms' −0.003): with it,
the learned temperature fell from 9 to 4.4 (or, fixed, the projections lost contrast) and the
held-out alignment regressed while the loss fell. ``opam_temperature`` fixes the temperature
instead of learning it. The first ``align_warmup_steps`` steps train OPAM on the
alignment loss alone (cheap: no synthesis backward).

Outputs in ``out_dir``: ``train.csv`` (per-model loss, PSNR and alignment loss), ``val.csv`` (fixed
clips: bpp and the PSNR of the single-view decode, of each model decoding every view alone, and
fused; on fixed shifted pairs, each model's mean consistency and its attention's mean displacement
error in px), ``curves.png``, ``checkpoint.pt`` (resumable) and a log.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lmvic.models.distributed import DistributedCodec, load_distributed, save_distributed
from lmvic.entropy_models import bits_per_pixel
from lmvic.opam import (correspondence_error, known_shift_sharpness_loss, photometric_alignment_loss,
                        shift_attention_loss)
from lmvic.precision import mixed_precision
from lmvic.training.data import HELD_OUT_SCENES, IMAGE_SUFFIXES, ImageCache, build_cache, refuse_held_out
from lmvic.training.loop import _append_csv, _save_atomic, budget_progress, log_row, optimisation_step, psnr_from_mse
from lmvic.training.schedule import Schedule
from lmvic.zoo import load_single_view, recorded_training, training_history

#: Never trained on: the held-out development scenes and the Middlebury pairs (alignment ground truth).
NOT_FOR_TRAINING = (*HELD_OUT_SCENES, "middlebury_stereo")


def folder_images(folder: Path) -> list[Path]:
    """Images of a scene folder in file order (its ``images/`` subfolder when there is one)."""
    root = folder / "images" if (folder / "images").is_dir() else folder
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"no images in {root}")
    return paths


class SceneClips:
    """One scene's views decoded once into a uint8 cache (``lmvic.training.data``), in file order."""

    def __init__(self, folder: Path, cache_root: Path, max_side: int):
        refuse_held_out([folder], NOT_FOR_TRAINING)
        tag = f"{folder.parent.name}_{folder.name}_{max_side}"
        self.cache = ImageCache(build_cache(folder_images(folder), cache_root / tag, max_side, scales=(1.0,)))
        sizes = {tuple(int(v) for v in row[1:]) for row in self.cache.index}
        if len(sizes) != 1:
            raise ValueError(f"{folder}: views of different sizes {sorted(sizes)}")
        self.height, self.width = sizes.pop()

    def __len__(self) -> int:
        return len(self.cache)

    def clip(self, views: Sequence[int], y: int, x: int, crop: int) -> np.ndarray:
        """``(V, crop, crop, 3)`` uint8: the same window of each view."""
        return np.stack([self.cache.image(v)[y: y + crop, x: x + crop] for v in views])


class ClipSampler:
    """Random clips: a scene (weighted by its view count), ``V`` views ``start + k·stride``, a crop
    window shared by the views, a horizontal flip of the whole clip half of the time."""

    def __init__(self, scenes: Sequence[SceneClips], crop: int, max_stride: int, seed: int):
        self.scenes = [s for s in scenes if min(s.height, s.width) >= crop]
        if not self.scenes:
            raise ValueError(f"no scene has views of at least {crop} px")
        counts = np.array([len(s) for s in self.scenes], dtype=np.float64)
        self.weights = counts / counts.sum()
        self.crop, self.max_stride = crop, max_stride
        self.rng = np.random.default_rng(seed)

    def scene(self) -> SceneClips:
        return self.scenes[int(self.rng.choice(len(self.scenes), p=self.weights))]

    def one(self, views: int) -> np.ndarray:
        scene = self.scene()
        stride = int(self.rng.integers(1, max(1, min(self.max_stride, (len(scene) - 1) // max(views - 1, 1))) + 1))
        start = int(self.rng.integers(0, len(scene) - (views - 1) * stride))
        y = int(self.rng.integers(0, scene.height - self.crop + 1))
        x = int(self.rng.integers(0, scene.width - self.crop + 1))
        clip = scene.clip(range(start, start + views * stride, stride), y, x, self.crop)
        return clip[:, :, ::-1] if self.rng.random() < 0.5 else clip

    def batch(self, size: int, views: int) -> Tensor:
        """``(size, views, 3, crop, crop)`` float32 in [0, 1]."""
        return _as_batch([self.one(views) for _ in range(size)])

    def shifted_pair(self, max_shift: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
        """Two crops of one view, the side window moved by a random offset → ``(2, crop, crop, 3)``
        uint8 and the offset ``(o_y, o_x)`` (|o| ≤ ``max_shift``, within the view): main pixel
        ``(y, x)`` is side pixel ``(y + o_y, x + o_x)``."""
        scene = self.scene()
        image = scene.cache.image(int(self.rng.integers(0, len(scene))))
        offset, origin = [], []
        for size, limit in zip((scene.height, scene.width), max_shift):
            room = size - self.crop
            o = int(self.rng.integers(-min(limit, room), min(limit, room) + 1))
            offset.append(o)
            origin.append(int(self.rng.integers(max(0, o), room + min(0, o) + 1)))  # both windows inside
        (y, x), (oy, ox), c = origin, offset, self.crop
        return np.stack([image[y: y + c, x: x + c], image[y - oy: y - oy + c, x - ox: x - ox + c]]), (oy, ox)

    def shifted_batch(self, size: int, max_shift: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """``(size, 2, 3, crop, crop)`` shifted pairs in [0, 1] and their offsets ``(size, 2)``."""
        pairs, offsets = zip(*(self.shifted_pair(max_shift) for _ in range(size)))
        return _as_batch(pairs), torch.tensor(offsets, dtype=torch.float32)


def _as_batch(clips: Sequence[np.ndarray]) -> Tensor:
    """uint8 clips ``(V, H, W, 3)`` → ``(B, V, 3, H, W)`` float32 in [0, 1]."""
    return torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).float().div_(255)


@dataclass
class DistributedTrainConfig:
    out_dir: str
    scenes: tuple[str, ...]  # image folders (scene folders with images/, or the images themselves)
    cache_dir: str = "/work/runs/distributed/cache"
    fusions: tuple[str, ...] = ("pmifm", "average")
    feature_fusions: int = 1
    base: str = "single_view_cpu"  # shipped single-view weights: the frozen encoder and the initial decoder
    init_weights: str = ""  # a folder of shipped distributed weights (``SHIPPED`` names) to start the fusions from
    init_history: tuple[str, ...] = ()  # per fusion: the training history of its init_weights file when the run started
    max_side: int = 512
    crop: int = 256
    batch: int = 2
    views: tuple[int, int] = (2, 4)
    max_stride: int = 2
    steps: int = 2000  # 0: no step limit
    budget_cpu_minutes: float = 100.0  # all models together (0: none); stops at whichever comes first
    deadline: float = 0.0  # Unix time; >0: stop then at the latest (the schedule follows it)
    started: float = 0.0
    schedule: Schedule = dataclasses.field(default_factory=lambda: Schedule(peak_lr=1e-4, final_lr=1e-5,
                                                                            warmup_steps=50))
    synthesis_lr_scale: float = 0.0  # >0 also fine-tunes the synthesis (overfitted the 3 scenes: see the note)
    opam_lr_scale: float = 1.0  # learning rate of the OPAM projections relative to the rest of the fusions
    opam_temperature: float = 0.0  # >0: every OPAM's attention temperature is set to this and not trained
    align_weight: float = 1.0  # weight of the alignment loss (0: RD loss only)
    align_warmup_steps: int = 0  # first steps: the alignment loss alone
    align_pairs: int = 2  # per step: this many shifted pairs and as many pairs of neighbouring views
    max_shift: tuple[int, int] = (32, 80)  # (vertical, horizontal) px of the shifted pairs
    invalid_cost: float = 0.08  # photometric cost of an unaligned position (mean absolute error in [0, 1])
    shift_ce_weight: float = 0.0  # weight of the attention cross-entropy on the shifted pairs (softens OPAM)
    shift_sharpness_weight: float = 1.0  # weight of lmvic.opam.known_shift_sharpness_loss on the shifted pairs
    clip: float = 1.0  # gradient-norm clipping
    val_clips: int = 1  # per scene, 3 views each
    val_qualities: tuple[int, ...] = (2, 5)
    threads: int = 1
    precision: str = "fp32"  # "bf16": fusions and synthesis under bf16 autocast (lmvic.precision)
    seed: int = 0
    log_every: int = 10
    val_every: int = 150
    ckpt_every: int = 25

    @staticmethod
    def from_dict(d: dict) -> "DistributedTrainConfig":
        d = dict(d)
        d["schedule"] = Schedule(**d["schedule"])
        return DistributedTrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def build_models(cfg: DistributedTrainConfig) -> dict[str, DistributedCodec]:
    """One codec per fusion, each on its own copy of the base (frozen except the synthesis)."""
    base = load_single_view(cfg.base)
    torch.manual_seed(cfg.seed)
    models = {}
    for name in cfg.fusions:
        codec = DistributedCodec(copy.deepcopy(base), name, cfg.feature_fusions).eval()  # eval: hard rounding
        if cfg.init_weights:
            start = load_distributed(SHIPPED[name], Path(cfg.init_weights))
            codec.fusions.load_state_dict(start.fusions.state_dict())
        codec.requires_grad_(False)
        codec.fusions.requires_grad_(True)
        if cfg.opam_temperature > 0:
            fix_temperature(codec, cfg.opam_temperature)
        codec.backbone.synthesis.requires_grad_(cfg.synthesis_lr_scale > 0)
        models[name] = codec
    return models


def fix_temperature(codec: DistributedCodec, temperature: float) -> None:
    """Set every fusion's OPAM temperature to ``temperature`` and stop training it.

    Learned under the attention cross-entropy it fell (9 → 4.4 in 974 alignment steps on the
    session-4 base): a softer attention lowers the cross-entropy on ambiguous training matches, while
    its mean correspondence drifts toward the window centre and its consistency drops on held-out views.
    """
    for fusion in codec.fusions:
        with torch.no_grad():
            fusion.opam.log_temperature.fill_(math.log(temperature))
        fusion.opam.log_temperature.requires_grad_(False)


def optimiser(codec: DistributedCodec, cfg: DistributedTrainConfig) -> torch.optim.Optimizer:
    """Adam over the OPAM projections, the rest of the fusions and (if fine-tuned) the synthesis; each
    group's ``scale`` (``lr_scales``) multiplies the scheduled learning rate. Frozen parameters (a
    fixed temperature) are left out."""
    trained = [(n, p) for n, p in codec.fusions.named_parameters() if p.requires_grad]
    opam = [p for n, p in trained if ".opam." in f".{n}"]
    rest = [p for n, p in trained if ".opam." not in f".{n}"]
    groups = [{"params": opam}, {"params": rest}]
    if cfg.synthesis_lr_scale > 0:
        groups.append({"params": list(codec.backbone.synthesis.parameters())})
    opt = torch.optim.Adam(groups, lr=cfg.schedule.peak_lr)
    set_lr_scales(opt, cfg)
    return opt


def set_lr_scales(opt: torch.optim.Optimizer, cfg: DistributedTrainConfig) -> None:
    """The groups' learning-rate scales from ``cfg`` (also after loading a resumed optimiser's state)."""
    for group, scale in zip(opt.param_groups, (cfg.opam_lr_scale, 1.0, cfg.synthesis_lr_scale)):
        group["scale"] = scale


@torch.no_grad()
def code_clips(codec: DistributedCodec, x: Tensor, quality: Tensor) -> tuple[Tensor, Tensor]:
    """The frozen encoder with hard quantisation: x ``(B, V, 3, H, W)`` → ŷ ``(B, V, M, h, w)`` (after the
    inverse gain, as the synthesis takes it) and each view's bpp ``(B, V)``."""
    b, v, _, h, w = x.shape
    y_hat, likelihoods = codec.latents(x, quality)
    # CompressAI's likelihood floor (1e-9), restated: it is a buffer that float16 storage rounds to 0
    floored = {k: l.clamp_min(1e-9) for k, l in likelihoods.items()}
    return y_hat, bits_per_pixel(floored, h * w).reshape(b, v)


def clip_rd(x_hat: Tensor, x: Tensor, bpp: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over clips of Σ_v (bpp + λ·255²·MSE) / V → (loss, per-view MSE ``(B, V)``)."""
    mse = F.mse_loss(x_hat, x, reduction="none").flatten(2).mean(2)
    return (bpp + lam[:, None] * 255**2 * mse).mean(), mse.detach()


def psnr_8bit(x_hat: Tensor, x: Tensor) -> Tensor:
    """Per-image PSNR of the 8-bit-rounded reconstruction: ``(..., 3, H, W)`` → ``(...)``."""
    q = (x_hat.clamp(0, 1) * 255).round() / 255
    return psnr_from_mse(F.mse_loss(q, x, reduction="none").flatten(-3).mean(-1))


def opam_passes(codec: DistributedCodec, y_hat: Tensor):
    """Every fusion's OPAM on coded pairs: ``y_hat`` ``(B, 2, M, h, w)`` (main, side) → per fusion
    index ``k`` its ``OpamResult`` on the (detached) decoded features at its scale."""
    for k, fusion in enumerate(codec.fusions):
        with torch.no_grad():
            feats = codec.synthesise_views(y_hat, stop=k)
        yield fusion.opam(feats[:, 0], feats[:, 1])


def alignment_loss(codec: DistributedCodec, shifted: Tensor, offset: Tensor, shifted_y: Tensor,
                   neighbours: Tensor, neighbours_y: Tensor, cfg: DistributedTrainConfig) -> Tensor:
    """Mean over the fusions of the photometric alignment loss on shifted pairs and on pairs of
    neighbouring views, plus ``shift_ce_weight`` × the attention cross-entropy on the shifted pairs.

    ``shifted``/``neighbours``: pairs ``(B, 2, 3, H, W)``; ``offset``: ``(B, 2)`` px of the shifted
    pairs; ``*_y``: their coded latents ``(B, 2, M, H/16, W/16)``.
    """
    total = torch.zeros(())
    for known, other in zip(opam_passes(codec, shifted_y), opam_passes(codec, neighbours_y)):
        stride = shifted.shape[-1] // known.consistency.shape[-1]
        photometric = (photometric_alignment_loss(known, shifted[:, 0], shifted[:, 1], cfg.invalid_cost)
                       + photometric_alignment_loss(other, neighbours[:, 0], neighbours[:, 1], cfg.invalid_cost)) / 2
        total = (total + photometric + cfg.shift_ce_weight * shift_attention_loss(known, offset, stride)
                 + cfg.shift_sharpness_weight * known_shift_sharpness_loss(known, offset, stride))
    return total / len(codec.fusions)


@torch.no_grad()
def shift_recovery(codec: DistributedCodec, pairs: Tensor, offset: Tensor, y_hat: Tensor) -> tuple[float, float]:
    """The finest fusion's OPAM on shifted pairs (``pairs`` ``(B, 2, 3, H, W)``, ``offset`` ``(B, 2)`` px,
    ``y_hat`` their latents) → its mean consistency and the mean distance in px between the side
    position its attention takes on average (``apply_opam`` of the coordinates) and the true match,
    over the positions whose match lies inside the side view."""
    result = list(opam_passes(codec, y_hat))[-1]
    stride = pairs.shape[-1] // result.consistency.shape[-1]
    distance, inside = correspondence_error(result, offset, stride)
    error = distance * stride
    return float(result.consistency[:, 0][inside].mean()), float(error[inside].mean())


@torch.no_grad()
def validate(models: dict[str, DistributedCodec], reference: DistributedCodec, clips: Tensor,
             qualities: Sequence[int], shifted: Tensor, offset: Tensor) -> list[dict[str, float]]:
    """Rows per quality: mean bpp and PSNR of the single-view decode (``reference``'s synthesis, no
    fusion), per model of every view decoded alone (no side view) and of the fused decode, and per
    model its ``shift_recovery`` on the shifted pairs ``shifted`` (offsets ``offset``)."""
    rows = []
    for q in qualities:
        quality = torch.full((clips.shape[0],), float(q))
        y_hat, bpp = code_clips(reference, clips, quality)
        shifted_y, _ = code_clips(reference, shifted, torch.full((shifted.shape[0],), float(q)))
        single = reference.backbone.synthesise(y_hat.flatten(0, 1))[-1].unflatten(0, clips.shape[:2])
        row = {"quality": q, "bpp": float(bpp.mean()), "psnr_single": float(psnr_8bit(single, clips).mean())}
        for name, codec in models.items():
            alone = torch.cat([codec.synthesise_views(y_hat[:, v: v + 1]) for v in range(y_hat.shape[1])], dim=1)
            row[f"psnr_alone_{name}"] = float(psnr_8bit(alone, clips).mean())
            row[f"psnr_fused_{name}"] = float(psnr_8bit(codec.synthesise_views(y_hat), clips).mean())
            row[f"consistency_{name}"], row[f"shift_error_px_{name}"] = shift_recovery(codec, shifted, offset, shifted_y)
        rows.append(row)
    return rows


def train_distributed(cfg: DistributedTrainConfig, resume: bool = False, log=print) -> dict[str, DistributedCodec]:
    """Run (or resume from ``out_dir/checkpoint.pt``: its settings, with ``cfg``'s steps, budget and
    deadline) the training of every fusion in ``cfg.fusions``."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.exists():  # the stored settings, with the run length asked for now
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        cfg = dataclasses.replace(DistributedTrainConfig.from_dict(ck["config"]), steps=cfg.steps,
                                  budget_cpu_minutes=cfg.budget_cpu_minutes, deadline=cfg.deadline)
    models = build_models(cfg)
    reference = DistributedCodec(load_single_view(cfg.base), cfg.fusions[0], cfg.feature_fusions).eval()
    opts = {name: optimiser(codec, cfg) for name, codec in models.items()}
    step, cpu_spent = 0, 0.0
    if resume and ckpt_path.exists():
        for name, codec in models.items():
            codec.load_state_dict(ck["models"][name])
            opts[name].load_state_dict(ck["opts"][name])
            set_lr_scales(opts[name], cfg)
        step, cpu_spent = ck["step"], ck["cpu_seconds"]
        log(f"resumed at step {step}, {cpu_spent / 60:.1f} CPU-min")
    else:
        for stale in ("train.csv", "val.csv"):
            (out / stale).unlink(missing_ok=True)
        cfg = dataclasses.replace(cfg, started=cfg.started or time.time(), init_history=cfg.init_history or tuple(
            recorded_training(str(Path(cfg.init_weights) / f"{SHIPPED[n]}.pt")) if cfg.init_weights else ""
            for n in cfg.fusions))
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    scenes = [SceneClips(Path(s), Path(cfg.cache_dir), cfg.max_side) for s in cfg.scenes]
    val_sampler = ClipSampler(scenes, cfg.crop, 1, seed=12345)
    val_set = val_sampler.batch(cfg.val_clips * len(scenes), 3)
    val_shifted, val_offset = val_sampler.shifted_batch(2 * len(scenes), cfg.max_shift)
    sampler = ClipSampler(scenes, cfg.crop, cfg.max_stride, seed=cfg.seed * 1000 + 7919 * step)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 7919 * step)
    budget = cfg.budget_cpu_minutes * 60

    def progress() -> float:
        return budget_progress([(step, cfg.steps), (cpu_spent, budget)], cfg.started, cfg.deadline, 1)

    def save() -> None:
        _save_atomic({"models": {n: c.state_dict() for n, c in models.items()},
                      "opts": {n: o.state_dict() for n, o in opts.items()}, "step": step,
                      "cpu_seconds": cpu_spent, "config": dataclasses.asdict(cfg)}, ckpt_path)

    def run_validation() -> None:
        for row in validate(models, reference, val_set, cfg.val_qualities, val_shifted, val_offset):
            _append_csv(out / "val.csv", {"step": step, "cpu_min": round(cpu_spent / 60, 3), **row})
            log(f"val step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in row.items()))
        plot_curves(out)

    def random_quality(size: int) -> Tensor:
        return torch.randint(1, reference.backbone.num_qualities + 1, (size,), generator=gen).float()

    if step == 0:
        run_validation()
    logged = ["bpp", *(f"{kind}_{name}" for name in models for kind in ("loss", "psnr", "align"))]
    acc: dict[str, float] = {}
    t_log = time.perf_counter()
    while progress() < 1.0:
        c0 = time.process_time()
        lr = cfg.schedule.lr(step, progress())
        rd = step >= cfg.align_warmup_steps
        if rd:
            views = int(torch.randint(cfg.views[0], cfg.views[1] + 1, (), generator=gen))
            quality = random_quality(cfg.batch)
            x = sampler.batch(cfg.batch, views)
            y_hat, bpp = code_clips(reference, x, quality)
            lam = reference.backbone.lambda_of(quality, cfg.batch)
            acc["bpp"] = acc.get("bpp", 0.0) + float(bpp.mean())
        if cfg.align_weight > 0:
            shifted, offset = sampler.shifted_batch(cfg.align_pairs, cfg.max_shift)
            neighbours = sampler.batch(cfg.align_pairs, 2)
            shifted_y, _ = code_clips(reference, shifted, random_quality(cfg.align_pairs))
            neighbours_y, _ = code_clips(reference, neighbours, random_quality(cfg.align_pairs))
        for name, codec in models.items():
            for group in opts[name].param_groups:
                group["lr"] = lr * group["scale"]
            loss = torch.zeros(())
            with mixed_precision(cfg.precision):
                if rd:
                    rd_loss, mse = clip_rd(codec.synthesise_views(y_hat), x, bpp, lam)
                    loss = loss + rd_loss
                    acc[f"loss_{name}"] = acc.get(f"loss_{name}", 0.0) + rd_loss.item()
                    acc[f"psnr_{name}"] = acc.get(f"psnr_{name}", 0.0) + float(psnr_from_mse(mse.mean()))
                if cfg.align_weight > 0:
                    align = alignment_loss(codec, shifted, offset, shifted_y, neighbours, neighbours_y, cfg)
                    loss = loss + cfg.align_weight * align
                    acc[f"align_{name}"] = acc.get(f"align_{name}", 0.0) + align.item()
            optimisation_step(loss, opts[name], [p for g in opts[name].param_groups for p in g["params"]], cfg.clip)
        step += 1
        cpu_spent += time.process_time() - c0
        if step % cfg.log_every == 0:
            row = {"step": step, "cpu_min": round(cpu_spent / 60, 3), "lr": lr,
                   **{k: acc.get(k, math.nan) / cfg.log_every for k in logged},
                   "s_per_step": (time.perf_counter() - t_log) / cfg.log_every}
            log_row(out / "train.csv", row, log)
            acc, t_log = {}, time.perf_counter()
        if step % cfg.ckpt_every == 0:
            save()
        if step % cfg.val_every == 0 or step == cfg.align_warmup_steps:
            run_validation()
    save()
    run_validation()
    return models


def plot_curves(run_dir: Path) -> Path:
    """``curves.png``: training PSNR per model, and validation PSNR gain over the single-view decode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmvic.training.curves import read_csv

    train, val = read_csv(run_dir / "train.csv"), read_csv(run_dir / "val.csv")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    names = sorted({k[len("psnr_fused_"):] for r in val for k in r if k.startswith("psnr_fused_")})
    for name in names:
        if train:
            axes[0].plot([r["cpu_min"] for r in train], [r[f"psnr_{name}"] for r in train], label=name)
        for q in sorted({int(r["quality"]) for r in val}):
            rows = [r for r in val if int(r["quality"]) == q]
            t = [r["cpu_min"] for r in rows]
            axes[1].plot(t, [r[f"psnr_fused_{name}"] - r["psnr_single"] for r in rows], marker=".",
                         label=f"{name} fused, q{q}")
            axes[1].plot(t, [r[f"psnr_alone_{name}"] - r["psnr_single"] for r in rows], ls="--",
                         label=f"{name} alone, q{q}")
        for q in sorted({int(r["quality"]) for r in val if f"shift_error_px_{name}" in r}):
            rows = [r for r in val if int(r["quality"]) == q]
            axes[2].plot([r["cpu_min"] for r in rows], [r[f"shift_error_px_{name}"] for r in rows], marker=".",
                         label=f"{name}, q{q}")
    axes[0].set(xlabel="CPU-minutes", ylabel="train PSNR (dB, fused)")
    axes[2].set(xlabel="CPU-minutes", ylabel="mean displacement error (px)", yscale="log",
                title="OPAM (finest fusion) on shifted validation pairs")
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].set(xlabel="CPU-minutes", ylabel="validation PSNR − single-view decode (dB)",
                title="same bits: fused / alone vs single-view decoder")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


#: Shipped name of each fusion's model.
SHIPPED = {"pmifm": "distributed-cpu", "average": "distributed-average-cpu"}


def export_checkpoint(run_dir: Path, directory: Path, base_synthesis: bool = False) -> list[Path]:
    """Ship the models of ``run_dir/checkpoint.pt`` (at the end or mid-run) into ``directory`` as
    ``SHIPPED`` names, with the training's data, steps and CPU time in the sidecar.

    ``base_synthesis``: ship the trained fusions with the base's synthesis (drops a fine-tuned one).
    """
    ck = torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=False)
    cfg = DistributedTrainConfig.from_dict(ck["config"])
    fine_tuned = cfg.synthesis_lr_scale > 0 and not base_synthesis
    meta = {"scenes": [Path(s).name for s in cfg.scenes], "crop": cfg.crop, "max_side": cfg.max_side,
            "views": list(cfg.views), "steps": ck["step"], "cpu_minutes_all_models": round(ck["cpu_seconds"] / 60, 1),
            "synthesis": "fine-tuned" if fine_tuned else f"{cfg.base} (unchanged)"}
    run = (f"lmvic train-distributed {Path(cfg.out_dir).name} on "
           f"{cfg.base}, {ck['step']} steps of batch {cfg.batch}, {cfg.crop}-px crops, {cfg.precision}, lr "
           f"{cfg.schedule.peak_lr:g}, {meta['cpu_minutes_all_models']} CPU-min for all models; scenes "
           f"{', '.join(meta['scenes'])}; from {cfg.init_weights or 'fresh fusions'}")
    paths = []
    base = load_single_view(cfg.base)
    previous = dict(zip(cfg.fusions, cfg.init_history))
    for name, codec in build_models(cfg).items():
        codec.load_state_dict(ck["models"][name])
        if not fine_tuned:
            codec.backbone.synthesis.load_state_dict(base.synthesis.state_dict())
        paths.append(save_distributed(codec, Path(directory) / f"{SHIPPED[name]}.pt", cfg.base,
                                      {**meta, "training": training_history(previous.get(name, ""), run)}))
    return paths

