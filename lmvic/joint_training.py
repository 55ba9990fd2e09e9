"""Training of the joint codec on clips (paper eq. 9), resumable, with a CSV curve.

Loss of a clip of L views in coding order (each view coded with the previous one's *decoded*
image, features and depth as reference, the same chain as coding)::

    Σ_t w_t (λ·255²·(MSE(x_t, x̂_t) + depth_weight·MSE(d_t, d̂_t)) + bpp_img,t + bpp_depth,t)

with ``w = (0.5, 1.2, 0.5, 0.9)``, depths in the normalised inverse-depth domain of the clip's
sequence ``DepthRange`` (as the scene codec normalises) and λ the quality's λ of the
variable-rate backbone (a random quality per sample).
The aux loss of the entropy bottlenecks is optimised alongside. ``freeze_backbone`` trains only
the reference path, QPEM and the depth codec (stage two of a staged training on top of shipped
single-view weights). Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank samples its own clips
and DistributedDataParallel averages the gradients (gloo on the CPU); rank 0 writes the log, the
CSV and the checkpoint. The schedule is ``lmvic.training.schedule.Schedule`` over the step budget.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lmvic.clips import Clip, ClipSampler, load_sequence
from lmvic.models.single_view import bits_per_pixel
from lmvic.scene_codec import JointCodec, build_joint
from lmvic.training.loop import (_save_atomic, budget_progress, check_replicas_equal, dist_info, log_row,
                                optimisation_step, psnr_from_mse)
from lmvic.training.schedule import Schedule
from lmvic.zoo import load_single_view

VIEW_WEIGHTS = (0.5, 1.2, 0.5, 0.9)


def clip_loss(net: torch.nn.Module, codec: JointCodec, clip: Clip, quality: Tensor, depth_weight: float = 1.0,
              weights: tuple[float, ...] = VIEW_WEIGHTS) -> tuple[Tensor, dict[str, float]]:
    """Weighted RD loss of a clip batch; stats are per-view means of bpp and PSNR (image, depth).

    ``net`` runs the forward (``codec`` itself or its DDP wrapper, which averages the gradients).
    """
    B, L, _, H, W = clip.images.shape
    if len(weights) != L:
        raise ValueError(f"{len(weights)} view weights for clips of {L} views")
    lam = codec.image.backbone.lambda_of(quality, B) * 255**2
    depth_range = clip.depth_range
    outs = net(clip.images, clip.depths, clip.K, clip.T, quality, depth_range)
    loss = clip.images.new_zeros(())
    stats = {"bpp_img": 0.0, "bpp_depth": 0.0, "psnr": 0.0, "psnr_depth": 0.0}
    for t, (w, out) in enumerate(zip(weights, outs)):
        x, d = clip.images[:, t], clip.depths[:, t]
        mse = F.mse_loss(out["image"]["x_hat"], x, reduction="none").flatten(1).mean(1)
        d_mse = F.mse_loss(out["depth"]["x_hat"], depth_range.normalise(d), reduction="none").flatten(1).mean(1)
        bpp_img = bits_per_pixel(out["image"]["likelihoods"], H * W)
        bpp_depth = bits_per_pixel(out["depth"]["likelihoods"], H * W)
        loss = loss + w * (lam * (mse + depth_weight * d_mse) + bpp_img + bpp_depth).mean()
        for key, value in (("bpp_img", bpp_img.mean()), ("bpp_depth", bpp_depth.mean()),
                           ("psnr", psnr_from_mse(mse.mean())), ("psnr_depth", psnr_from_mse(d_mse.mean()))):
            stats[key] += float(value.detach()) / L
    return loss, stats


@dataclass
class JointTrainConfig:
    out_dir: str
    scenes: tuple[str, ...]  # synthetic scene folders or real scenes' work folders (lmvic.clips.load_sequence)
    size: str = "cpu"
    init_single_view: str = ""  # single-view weights (shipped name or .pt path) for the image backbone; "" = fresh
    freeze_backbone: bool = False
    steps: int = 1000
    batch: int = 2
    crop: int = 128
    depth_weight: float = 1.0
    schedule: Schedule = field(default_factory=lambda: Schedule(peak_lr=1e-4, warmup_steps=20))
    aux_lr: float = 1e-3
    clip: float = 1.0
    threads: int = 1
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 50
    deadline: float = 0.0  # Unix time the schedule must finish by (0 = none): the run ends at steps or deadline
    started: float = 0.0


def _build(cfg: JointTrainConfig) -> JointCodec:
    torch.manual_seed(cfg.seed)
    backbone = None
    if cfg.init_single_view:  # a shipped name, or a path to a weight file exported by lmvic.zoo
        path = Path(cfg.init_single_view)
        backbone = (load_single_view(path.stem, path.parent) if path.suffix == ".pt"
                    else load_single_view(cfg.init_single_view))
    return build_joint(cfg.size, backbone=backbone)


def train_joint(cfg: JointTrainConfig, resume: bool = False, log=print) -> JointCodec:
    """Run (or resume from ``out_dir/checkpoint.pt``) the training; returns the model."""
    rank, world = dist_info()
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    cfg = dataclasses.replace(cfg, started=cfg.started or time.time())
    codec = _build(cfg).train()
    if cfg.freeze_backbone:
        codec.image.backbone.requires_grad_(False)
        codec.image.backbone.entropy_bottleneck.quantiles.requires_grad_(True)  # aux loss only
    main = [p for n, p in codec.named_parameters() if p.requires_grad and not n.endswith(".quantiles")]
    aux = [p for n, p in codec.named_parameters() if n.endswith(".quantiles")]
    opt = torch.optim.Adam(main, lr=cfg.schedule.peak_lr)
    aux_opt = torch.optim.Adam(aux, lr=cfg.aux_lr)
    step = 0
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        codec.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        aux_opt.load_state_dict(ck["aux_opt"])
        step = ck["step"]
        cfg.started = ck["config"].get("started", 0.0)  # the schedule keeps its clock across restarts
        log(f"resumed at step {step}")
    elif rank == 0:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    sampler = ClipSampler([load_sequence(s) for s in cfg.scenes], len(VIEW_WEIGHTS), cfg.crop,
                          seed=cfg.seed * 1000 + rank + 7919 * step)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 7919 * step)
    net = DistributedDataParallel(codec) if world > 1 else codec

    def save() -> None:
        if rank == 0:
            _save_atomic({"model": codec.state_dict(), "opt": opt.state_dict(), "aux_opt": aux_opt.state_dict(),
                          "step": step, "config": dataclasses.asdict(cfg)}, ckpt_path)

    acc: dict[str, float] = {}
    t0 = time.perf_counter()
    def progress() -> float:
        return budget_progress(step / cfg.steps if cfg.steps else 1.0, cfg.started, cfg.deadline, world)

    while progress() < 1.0:
        lr = cfg.schedule.lr(step, progress())
        for g in opt.param_groups:
            g["lr"] = lr
        quality = torch.randint(1, codec.num_qualities + 1, (cfg.batch,), generator=gen).float()
        loss, stats = clip_loss(net, codec, sampler.batch(cfg.batch), quality, cfg.depth_weight)
        applied = optimisation_step(loss, codec.aux_loss(), opt, aux_opt, main, cfg.clip)
        step += 1
        for k, v in {"loss": loss.item(), **stats, "skipped": float(not applied)}.items():
            acc[k] = acc.get(k, 0.0) + v
        if step % cfg.log_every == 0 and rank == 0:
            row = {"step": step, "lr": lr, **{k: v / cfg.log_every for k, v in acc.items()},
                   "s_per_step": (time.perf_counter() - t0) / cfg.log_every}
            log_row(out / "train.csv", row, log)
            acc, t0 = {}, time.perf_counter()
        if step % cfg.ckpt_every == 0:
            save()
    save()
    if world > 1:
        check_replicas_equal(codec)
    return codec

