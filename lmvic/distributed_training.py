"""Staged training of the distributed codecs (OPAM/PMIFM fusion and average pooling) on the CPU.

The encoder must stay the single-view encoder (each camera codes alone), so the shipped
variable-rate single-view codec is frozen and only the decoder-side fusions are trained (started as
the identity, ``lmvic.fusion``); ``synthesis_lr_scale > 0`` also fine-tunes the synthesis (on three
training scenes that overfitted: −0.1 dB on held-out fox, so it is off by default). One variable-rate model covers every quality
1..Q (a random quality per clip), in place of one model per rate point.

Data: clips of 2–4 views in file order (a random stride of 1..``max_stride``) with one crop window
shared by the clip, from image folders (no geometry). The frozen encoder codes each clip once per
step with real (hard) quantisation and every model being trained decodes the same latents, so the
variants see identical data. Loss of a clip: Σ_v (bpp_v + λ_q·255²·MSE(x_v, x̂_v)) / V with x̂_v the
fused reconstruction (the rate is fixed by the frozen encoder; it is part of the reported RD).

Outputs in ``out_dir``: ``train.csv`` (per-model loss and PSNR), ``val.csv`` (fixed clips: bpp and
the PSNR of the single-view decode, of each model decoding every view alone, and fused),
``curves.png``, ``checkpoint.pt`` (resumable) and a log.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lmvic.models.distributed import DistributedCodec, save_distributed
from lmvic.models.single_view import bits_per_pixel
from lmvic.training.data import HELD_OUT_SCENES, IMAGE_SUFFIXES, ImageCache, build_cache
from lmvic.training.loop import _append_csv, _save_atomic, log_row, psnr_from_mse
from lmvic.training.schedule import Schedule
from lmvic.zoo import load_single_view


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
        if folder.name in HELD_OUT_SCENES:
            raise ValueError(f"{folder.name} is held out for evaluation; do not train on it")
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

    def one(self, views: int) -> np.ndarray:
        scene = self.scenes[int(self.rng.choice(len(self.scenes), p=self.weights))]
        stride = int(self.rng.integers(1, max(1, min(self.max_stride, (len(scene) - 1) // max(views - 1, 1))) + 1))
        start = int(self.rng.integers(0, len(scene) - (views - 1) * stride))
        y = int(self.rng.integers(0, scene.height - self.crop + 1))
        x = int(self.rng.integers(0, scene.width - self.crop + 1))
        clip = scene.clip(range(start, start + views * stride, stride), y, x, self.crop)
        return clip[:, :, ::-1] if self.rng.random() < 0.5 else clip

    def batch(self, size: int, views: int) -> Tensor:
        """``(size, views, 3, crop, crop)`` float32 in [0, 1]."""
        arr = np.stack([self.one(views) for _ in range(size)])
        return torch.from_numpy(arr).permute(0, 1, 4, 2, 3).float().div_(255)


@dataclass
class DistributedTrainConfig:
    out_dir: str
    scenes: tuple[str, ...]  # image folders (scene folders with images/, or the images themselves)
    cache_dir: str = "/work/runs/distributed/cache"
    fusions: tuple[str, ...] = ("pmifm", "average")
    feature_fusions: int = 1
    base: str = "single_view_cpu"  # shipped single-view weights: the frozen encoder and the initial decoder
    max_side: int = 512
    crop: int = 256
    batch: int = 2
    views: tuple[int, int] = (2, 4)
    max_stride: int = 2
    steps: int = 2000
    budget_cpu_minutes: float = 100.0  # all models together; stops at whichever comes first
    deadline: float = 0.0  # Unix time; >0: stop then at the latest (the schedule follows it)
    started: float = 0.0
    schedule: Schedule = dataclasses.field(default_factory=lambda: Schedule(peak_lr=1e-4, final_lr=1e-5,
                                                                            warmup_steps=50))
    synthesis_lr_scale: float = 0.0  # >0 also fine-tunes the synthesis (overfitted the 3 scenes: see the note)
    clip: float = 1.0  # gradient-norm clipping
    val_clips: int = 1  # per scene, 3 views each
    val_qualities: tuple[int, ...] = (2, 5)
    threads: int = 1
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
        codec.requires_grad_(False)
        codec.fusions.requires_grad_(True)
        codec.backbone.synthesis.requires_grad_(cfg.synthesis_lr_scale > 0)
        models[name] = codec
    return models


def optimiser(codec: DistributedCodec, cfg: DistributedTrainConfig) -> torch.optim.Optimizer:
    groups = [{"params": list(codec.fusions.parameters()), "scale": 1.0}]
    if cfg.synthesis_lr_scale > 0:
        groups.append({"params": list(codec.backbone.synthesis.parameters()), "scale": cfg.synthesis_lr_scale})
    return torch.optim.Adam(groups, lr=cfg.schedule.peak_lr)


def decoder_step(loss: Tensor, opt: torch.optim.Optimizer, clip: float) -> None:
    """One step of the decoder's optimiser, gradient norm clipped to ``clip`` (no aux loss: the
    encoder's entropy models are frozen, so ``lmvic.training.loop.optimisation_step`` does not apply)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
    opt.step()


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


@torch.no_grad()
def validate(models: dict[str, DistributedCodec], reference: DistributedCodec, clips: Tensor,
             qualities: Sequence[int]) -> list[dict[str, float]]:
    """Rows per quality: mean bpp and PSNR of the single-view decode (``reference``'s synthesis, no
    fusion), and per model of every view decoded alone (no side view) and of the fused decode."""
    rows = []
    for q in qualities:
        quality = torch.full((clips.shape[0],), float(q))
        y_hat, bpp = code_clips(reference, clips, quality)
        single = reference.backbone.synthesise(y_hat.flatten(0, 1))[-1].unflatten(0, clips.shape[:2])
        row = {"quality": q, "bpp": float(bpp.mean()), "psnr_single": float(psnr_8bit(single, clips).mean())}
        for name, codec in models.items():
            alone = torch.cat([codec.synthesise_views(y_hat[:, v: v + 1]) for v in range(y_hat.shape[1])], dim=1)
            row[f"psnr_alone_{name}"] = float(psnr_8bit(alone, clips).mean())
            row[f"psnr_fused_{name}"] = float(psnr_8bit(codec.synthesise_views(y_hat), clips).mean())
        rows.append(row)
    return rows


def train_distributed(cfg: DistributedTrainConfig, resume: bool = False, log=print) -> dict[str, DistributedCodec]:
    """Run (or resume from ``out_dir/checkpoint.pt``) the training of every fusion in ``cfg.fusions``."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    models = build_models(cfg)
    reference = DistributedCodec(load_single_view(cfg.base), cfg.fusions[0], cfg.feature_fusions).eval()
    opts = {name: optimiser(codec, cfg) for name, codec in models.items()}
    step, cpu_spent = 0, 0.0
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        cfg = DistributedTrainConfig.from_dict(ck["config"])
        for name, codec in models.items():
            codec.load_state_dict(ck["models"][name])
            opts[name].load_state_dict(ck["opts"][name])
        step, cpu_spent = ck["step"], ck["cpu_seconds"]
        log(f"resumed at step {step}, {cpu_spent / 60:.1f} CPU-min")
    else:
        for stale in ("train.csv", "val.csv"):
            (out / stale).unlink(missing_ok=True)
        cfg.started = cfg.started or time.time()
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    scenes = [SceneClips(Path(s), Path(cfg.cache_dir), cfg.max_side) for s in cfg.scenes]
    val_clips = ClipSampler(scenes, cfg.crop, 1, seed=12345)
    val_set = val_clips.batch(cfg.val_clips * len(scenes), 3)
    sampler = ClipSampler(scenes, cfg.crop, cfg.max_stride, seed=cfg.seed * 1000 + 7919 * step)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 7919 * step)
    budget = cfg.budget_cpu_minutes * 60

    def progress() -> float:
        p = max(step / cfg.steps, cpu_spent / budget)
        if cfg.deadline > cfg.started:
            p = max(p, (time.time() - cfg.started) / (cfg.deadline - cfg.started))
        return p

    def save() -> None:
        _save_atomic({"models": {n: c.state_dict() for n, c in models.items()},
                      "opts": {n: o.state_dict() for n, o in opts.items()}, "step": step,
                      "cpu_seconds": cpu_spent, "config": dataclasses.asdict(cfg)}, ckpt_path)

    def run_validation() -> None:
        for row in validate(models, reference, val_set, cfg.val_qualities):
            _append_csv(out / "val.csv", {"step": step, "cpu_min": round(cpu_spent / 60, 3), **row})
            log(f"val step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in row.items()))
        plot_curves(out)

    if step == 0:
        run_validation()
    acc: dict[str, float] = {}
    t_log = time.perf_counter()
    while progress() < 1.0:
        c0 = time.process_time()
        lr = cfg.schedule.lr(step, progress())
        views = int(torch.randint(cfg.views[0], cfg.views[1] + 1, (), generator=gen))
        quality = torch.randint(1, reference.backbone.num_qualities + 1, (cfg.batch,), generator=gen).float()
        x = sampler.batch(cfg.batch, views)
        y_hat, bpp = code_clips(reference, x, quality)
        lam = reference.backbone.lambda_of(quality, cfg.batch)
        for name, codec in models.items():
            for group in opts[name].param_groups:
                group["lr"] = lr * group["scale"]
            loss, mse = clip_rd(codec.synthesise_views(y_hat), x, bpp, lam)
            decoder_step(loss, opts[name], cfg.clip)
            acc[f"loss_{name}"] = acc.get(f"loss_{name}", 0.0) + loss.item()
            acc[f"psnr_{name}"] = acc.get(f"psnr_{name}", 0.0) + float(psnr_from_mse(mse.mean()))
        acc["bpp"] = acc.get("bpp", 0.0) + float(bpp.mean())
        step += 1
        cpu_spent += time.process_time() - c0
        if step % cfg.log_every == 0:
            row = {"step": step, "cpu_min": round(cpu_spent / 60, 3), "lr": lr,
                   **{k: v / cfg.log_every for k, v in acc.items()},
                   "s_per_step": (time.perf_counter() - t_log) / cfg.log_every}
            log_row(out / "train.csv", row, log)
            acc, t_log = {}, time.perf_counter()
        if step % cfg.ckpt_every == 0:
            save()
        if step % cfg.val_every == 0:
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
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
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
    axes[0].set(xlabel="CPU-minutes", ylabel="train PSNR (dB, fused)")
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
    paths = []
    base = load_single_view(cfg.base)
    for name, codec in build_models(cfg).items():
        codec.load_state_dict(ck["models"][name])
        if not fine_tuned:
            codec.backbone.synthesis.load_state_dict(base.synthesis.state_dict())
        paths.append(save_distributed(codec, Path(directory) / f"{SHIPPED[name]}.pt", cfg.base, meta))
    return paths


if __name__ == "__main__":
    import argparse

    from lmvic.zoo import WEIGHTS_DIR

    p = argparse.ArgumentParser(description="train the distributed codecs (frozen single-view encoder)")
    p.add_argument("out_dir")
    p.add_argument("scenes", nargs="*", help="image folders in file order (not the held-out scenes)")
    p.add_argument("--fusions", default="pmifm,average")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--budget-cpu-minutes", type=float, default=100.0)
    p.add_argument("--deadline", default="", help="UTC time HH:MM today to stop at the latest")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--synthesis-lr-scale", type=float, default=0.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--export", default="", help=f"write the weights into this folder (e.g. {WEIGHTS_DIR})")
    a = p.parse_args()
    deadline = 0.0
    if a.deadline:
        import datetime as dt

        hh, mm = (int(v) for v in a.deadline.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()
    config = DistributedTrainConfig(a.out_dir, tuple(a.scenes), fusions=tuple(a.fusions.split(",")), steps=a.steps,
                                    budget_cpu_minutes=a.budget_cpu_minutes, deadline=deadline, batch=a.batch,
                                    crop=a.crop, schedule=Schedule(peak_lr=a.lr, final_lr=a.lr / 10, warmup_steps=50),
                                    synthesis_lr_scale=a.synthesis_lr_scale)
    if a.resume:
        config = DistributedTrainConfig.from_dict(
            torch.load(Path(a.out_dir) / "checkpoint.pt", map_location="cpu", weights_only=False)["config"])
    train_distributed(config, resume=a.resume)
    if a.export:
        for path in export_checkpoint(Path(a.out_dir), Path(a.export)):
            print(path)
