"""The training loop: variable-rate RD loss, schedules, clipping, aux loss, EMA, DDP, checkpoints, curves.

One process trains on ``threads`` threads; under ``torchrun`` (``WORLD_SIZE`` > 1) each rank
samples its own crops and DistributedDataParallel averages gradients (gloo on the CPU, NCCL on
GPUs). The budget is CPU seconds of this process (``time.process_time``) or a step count, and/or
a wall-clock deadline; schedules see the fraction spent. Rank 0 writes ``train.csv`` (every
``log_every`` steps), ``val.csv`` (fixed validation crops, every quality) with a weights-only
snapshot per validation (``snapshots/stepNNNNNN.pt``, EMA weights when kept), ``checkpoint.pt``
(atomically) and a log.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lmvic.entropy_models import bits_per_pixel
from lmvic.models.single_view import DEFAULT_LAMBDAS, SingleViewCodec, build_single_view
from lmvic.precision import float32, mixed_precision
from lmvic.training.compile import compiled
from lmvic.training.data import CropSampler, ImageCache
from lmvic.training.schedule import Schedule
from lmvic.zoo import recorded_training, single_view_from
from pipelines.metrics import ms_ssim_weighted


@dataclass
class TrainConfig:
    """Everything that defines a run (stored in the checkpoint; a resumed run keeps it)."""

    out_dir: str
    cache_dir: str
    dead_leaves_dir: str = ""  # a dead-leaves image cache (``dead_leaves.build_dead_leaves_cache``)
    dead_leaves_share: float = 0.0  # fraction of the crops drawn from it
    permute_channels: bool = False  # each crop's RGB channels in a random order (``CropSampler``)
    size: str = "cpu"
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    quality: int = 0  # 0: variable rate (a random level per sample); k: fixed level k only
    crop: int = 128
    batch: int = 8
    schedule: Schedule = field(default_factory=Schedule)
    budget_cpu_minutes: float = 60.0  # 0: none (the deadline ends the run)
    max_steps: int = 0  # 0: no step limit (progress by CPU time); >0: progress by steps
    deadline: float = 0.0  # Unix time; >0: progress is also at least the wall-clock fraction to it
    started: float = 0.0  # Unix time the run started (set by ``train``; kept on resume)
    clip: float = 1.0
    aux_lr: float = 1e-3
    ema_decay: float = 0.0  # 0 disables the weight average
    threads: int = 1
    precision: str = "fp32"  # "bf16": transforms under bf16 autocast (entropy models stay fp32)
    compile: bool = False  # the training forward through torch.compile (``lmvic.training.compile``)
    metric: str = "mse"  # distortion of the RD loss: "mse" or "ms-ssim"
    seed: int = 0
    log_every: int = 50
    val_every_cpu_minutes: float = 5.0
    ckpt_every_cpu_minutes: float = 3.0
    val_images: tuple[str, ...] = ()
    init: str = ""  # start from these weights (shipped name, exported .pt or training checkpoint); "" = fresh
    entropy: str = "hyperprior"  # the latent's entropy model (``ENTROPY_MODELS``)
    init_qpem: str = ""  # a shipped joint model whose QPEM, reference context removed, starts this one's
    trainable: str = "all"  # "all", or "qpem": only the QPEM trains, every other weight stays as initialised
    init_history: str = ""  # training history of the ``init`` weights when the run started (its export continues it)

    @staticmethod
    def from_dict(d: dict) -> "TrainConfig":
        d = dict(d)
        d["schedule"] = Schedule(**d["schedule"])
        d["lambdas"] = tuple(d["lambdas"])
        d["val_images"] = tuple(d["val_images"])
        return TrainConfig(**d)


def optimisation_step(loss: torch.Tensor, opt: torch.optim.Optimizer, params, clip: float,
                      aux_loss: torch.Tensor | None = None, aux_opt: torch.optim.Optimizer | None = None) -> bool:
    """One step of the RD optimiser (gradient norm clipped to ``clip`` over ``params`` when
    ``clip > 0``) and, when given, of CompressAI's auxiliary quantile loss and its optimiser (a model
    whose entropy models are frozen has none).

    A step whose loss or gradient is not finite is skipped (returns False), so one bad batch
    cannot turn the weights into NaN.
    """
    optimisers = [opt] + ([aux_opt] if aux_opt is not None else [])
    total = loss if aux_loss is None else loss + aux_loss
    for o in optimisers:
        o.zero_grad(set_to_none=True)
    total.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    if not (torch.isfinite(total) and torch.isfinite(norm)):
        for o in optimisers:
            o.zero_grad(set_to_none=True)
        return False
    for o in optimisers:
        o.step()
    return True


#: Distortion metrics of the RD loss. λ is calibrated for MSE (λ·255²·MSE); MS-SSIM uses CompressAI's
#: ratio between its MS-SSIM and MSE λs at the same quality level (2.4 / 0.0018 ≈ 1333).
METRICS = ("mse", "ms-ssim")
MS_SSIM_SCALE = 2.4 / 0.0018


def check_metric(metric: str, side: int) -> None:
    """``ValueError`` unless ``metric`` is one of ``METRICS`` and works on crops whose short side is ``side``."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "ms-ssim" and side <= 160:
        raise ValueError(f"MS-SSIM needs crops over 160 px (five scales of an 11-px window), got {side}")


def distortion(x_hat: Tensor, x: Tensor, metric: str = "mse") -> Tensor:
    """Per-image distortion (B,) of (B, 3, H, W) images in [0, 1], on λ's scale: 255²·MSE, or
    ``MS_SSIM_SCALE``·(1 − MS-SSIM) (float32 even under autocast; sides over 160 px)."""
    check_metric(metric, min(x.shape[-2:]))
    if metric == "mse":
        return 255**2 * F.mse_loss(x_hat, x, reduction="none").flatten(1).mean(1)
    return MS_SSIM_SCALE * (1 - float32(ms_ssim_weighted)(x_hat, x))


def rd_loss(net: torch.nn.Module, model: SingleViewCodec, x: Tensor,
            quality: Tensor, metric: str = "mse") -> tuple[Tensor, Tensor, Tensor]:
    """Mean over the batch of λ_q·D + bpp (D: :func:`distortion`) → (loss, bpp (B,), mse (B,)).

    ``net`` runs the forward (``model`` itself or its DDP wrapper, which syncs the gradients).
    """
    out = net(x, quality)
    mse = F.mse_loss(out["x_hat"], x, reduction="none").flatten(1).mean(1)
    bpp = bits_per_pixel(out["likelihoods"], x.shape[-2] * x.shape[-1])
    d = distortion(out["x_hat"], x, metric)
    return (model.lambda_of(quality, x.shape[0]) * d + bpp).mean(), bpp.detach(), mse.detach()


def psnr_from_mse(mse: Tensor) -> Tensor:
    """PSNR in dB for MSE of [0, 1] images."""
    return -10 * torch.log10(mse.clamp_min(1e-10))


@torch.no_grad()
def validate(model: SingleViewCodec, images: Tensor, batch: int = 4) -> list[dict[str, float]]:
    """Hard-quantised forward per quality level on (n,3,H,W) images in [0,1].

    Returns rows {"quality", "bpp", "psnr"}: mean likelihood bpp and mean per-image PSNR of the
    8-bit-rounded output (an estimate of real coding: the range coder adds a few bytes).
    """
    was_training = model.training
    model.eval()
    rows = []
    for q in range(1, model.num_qualities + 1):
        bpps, psnrs = [], []
        for chunk in images.split(batch):
            out = model(chunk, q)
            x_hat = (out["x_hat"].clamp(0, 1) * 255).round() / 255
            bpps.append(bits_per_pixel(out["likelihoods"], chunk.shape[-2] * chunk.shape[-1]))
            psnrs.append(psnr_from_mse(F.mse_loss(x_hat, chunk, reduction="none").flatten(1).mean(1)))
        rows.append({"quality": q, "bpp": float(torch.cat(bpps).mean()),
                     "psnr": float(torch.cat(psnrs).mean())})
    model.train(was_training)
    return rows


class EMA:
    """Exponential moving average of a model's parameters, decay warmed up as min(d, (1+t)/(10+t))
    so the average does not drag the random initial weights through a short run."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.named_parameters():
            self.shadow[k].lerp_(v.detach(), 1 - d)

    def averaged_state(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """The model's state dict with the averaged parameters substituted."""
        state = model.state_dict()
        state.update({k: v.clone() for k, v in self.shadow.items()})
        return state


def dist_info() -> tuple[int, int]:
    """(rank, world size); initialises the gloo process group under torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _append_csv(path: Path, row: dict[str, object]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def log_row(path: Path, row: dict[str, object], log) -> None:
    """Append ``row`` to the CSV at ``path`` and print it as ``key=value`` pairs."""
    _append_csv(path, row)
    log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


def train(cfg: TrainConfig, resume: bool = False, val_crops: Tensor | None = None,
          log=print) -> SingleViewCodec:
    """Run (or resume) the training described by ``cfg``; returns the trained model (rank 0's)."""
    if cfg.crop % 64:
        raise ValueError(f"crop {cfg.crop} must be a multiple of 64 (the hyper-latent is at 1/64)")
    rank, world = dist_info()
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    ckpt_path = out / "checkpoint.pt"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_single_view(cfg.size, cfg.lambdas, entropy=cfg.entropy)
    if cfg.init and not resume:
        load_initial_state(model, initial_state(cfg.init, cfg))
        log(f"initialised from {cfg.init}")
    if cfg.init_qpem and not resume:
        model.qpem.load_state_dict(joint_qpem(cfg.init_qpem))
        log(f"QPEM initialised from {cfg.init_qpem}'s (reference context removed)")
    main_params, aux_params = trainable_parameters(model, cfg.trainable)
    opt = torch.optim.Adam(main_params, lr=cfg.schedule.peak_lr)
    aux_opt = torch.optim.Adam(aux_params, lr=cfg.aux_lr) if aux_params else None
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    step, cpu_spent, wall_spent = 0, 0.0, 0.0
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        if aux_opt is not None:
            aux_opt.load_state_dict(ck["aux_opt"])
        if ema is not None and ck.get("ema") is not None:
            ema.shadow = ck["ema"]
        step, cpu_spent, wall_spent = ck["step"], ck["cpu_seconds"], ck["wall_seconds"]
        log(f"resumed at step {step}, {cpu_spent / 60:.1f} CPU-min")
    elif rank == 0:  # a fresh run: curves of an earlier, unfinished attempt in this folder go
        for stale in ("train.csv", "val.csv"):
            (out / stale).unlink(missing_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    net = compiled(DistributedDataParallel(model) if world > 1 else model, cfg.compile)
    caches, shares = [ImageCache(Path(cfg.cache_dir))], [1.0 - cfg.dead_leaves_share]
    if cfg.dead_leaves_share > 0:
        caches.append(ImageCache(Path(cfg.dead_leaves_dir)))
        shares.append(cfg.dead_leaves_share)
    sampler = CropSampler(caches, cfg.crop, shares, seed=cfg.seed * 1000 + rank + 7919 * step,
                          permute_channels=cfg.permute_channels)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 7919 * step)
    budget = cfg.budget_cpu_minutes * 60
    next_val = (int(cpu_spent // (cfg.val_every_cpu_minutes * 60)) + 1) * cfg.val_every_cpu_minutes * 60
    next_ckpt = cpu_spent + cfg.ckpt_every_cpu_minutes * 60
    acc = {"loss": 0.0, "bpp": 0.0, "mse": 0.0, "n": 0}
    t_log_cpu, t_log_wall, log_step = time.process_time(), time.perf_counter(), step

    def save() -> None:
        if rank == 0:
            _save_atomic({"model": model.state_dict(), "opt": opt.state_dict(),
                          "aux_opt": None if aux_opt is None else aux_opt.state_dict(), "ema": None if ema is None else ema.shadow,
                          "step": step, "cpu_seconds": cpu_spent, "wall_seconds": wall_spent, "ranks": world,
                          "config": dataclasses.asdict(cfg)}, ckpt_path)

    def run_validation() -> None:
        if rank != 0 or val_crops is None:
            return
        probe = model
        if ema is not None:
            probe = build_single_view(cfg.size, cfg.lambdas, entropy=cfg.entropy)
            probe.load_state_dict(ema.averaged_state(model))
        snap = out / "snapshots"
        snap.mkdir(exist_ok=True)
        torch.save({"model": probe.state_dict(), "step": step, "cpu_seconds": cpu_spent,
                    "config": dataclasses.asdict(cfg)}, snap / f"step{step:06d}.pt")
        rows = validate(probe, val_crops)
        for row in rows:
            _append_csv(out / "val.csv", {"step": step, "cpu_min": round(cpu_spent / 60, 3), **row})
        log(f"val step {step}: " + " ".join(f"q{r['quality']} {r['bpp']:.3f}/{r['psnr']:.2f}" for r in rows))

    if cfg.started == 0.0:  # a fresh run
        cfg.started = time.time()
        cfg.init_history = recorded_training(cfg.init)

    def progress() -> float:
        limit = (step, cfg.max_steps) if cfg.max_steps > 0 else (cpu_spent, budget)
        return budget_progress([limit], cfg.started, cfg.deadline, world)

    model.train()
    while progress() < 1.0:
        c0, w0 = time.process_time(), time.perf_counter()
        lr = cfg.schedule.lr(step, progress())
        for g in opt.param_groups:
            g["lr"] = lr
        x = sampler.batch(cfg.batch)
        if cfg.quality > 0:
            quality = torch.full((cfg.batch,), float(cfg.quality))
        else:
            quality = torch.randint(1, model.num_qualities + 1, (cfg.batch,), generator=gen).float()
        with mixed_precision(cfg.precision):
            loss, bpp, mse = rd_loss(net, model, x, quality, cfg.metric)
        aux = model.aux_loss()
        optimisation_step(loss, opt, main_params, cfg.clip, aux if aux_opt is not None else None, aux_opt)
        if ema is not None:
            ema.update(model, step)
        step += 1
        cpu_spent += _synced(time.process_time() - c0, world)
        wall_spent += time.perf_counter() - w0
        acc["loss"] += loss.item()
        acc["bpp"] += bpp.mean().item()
        acc["mse"] += mse.mean().item()
        acc["n"] += 1
        if step % cfg.log_every == 0 and rank == 0:
            n, dw = acc["n"], time.perf_counter() - t_log_wall
            row = {"step": step, "cpu_min": round(cpu_spent / 60, 3), "wall_min": round(wall_spent / 60, 3),
                   "lr": lr, "loss": acc["loss"] / n, "bpp": acc["bpp"] / n,
                   "psnr": float(psnr_from_mse(torch.tensor(acc["mse"] / n))), "aux": aux.item(),
                   "steps_per_s": (step - log_step) / dw,
                   "images_per_s": (step - log_step) * cfg.batch * world / dw,
                   "cpu_s_per_step": (time.process_time() - t_log_cpu) / (step - log_step)}
            log_row(out / "train.csv", row, log)
            acc = {"loss": 0.0, "bpp": 0.0, "mse": 0.0, "n": 0}
            t_log_cpu, t_log_wall, log_step = time.process_time(), time.perf_counter(), step
        if cpu_spent >= next_val:
            run_validation()
            next_val += cfg.val_every_cpu_minutes * 60
        if cpu_spent >= next_ckpt:
            save()
            next_ckpt += cfg.ckpt_every_cpu_minutes * 60
    save()
    run_validation()
    if world > 1:
        check_replicas_equal(model)
    return model


def trainable_parameters(model: SingleViewCodec, trainable: str) -> tuple[list[Tensor], list[Tensor]]:
    """(RD parameters, quantile parameters) that train; with ``trainable="qpem"`` only the QPEM's
    (no quantiles), every other parameter frozen (``requires_grad`` off)."""
    if trainable not in ("all", "qpem"):
        raise ValueError(f"trainable must be 'all' or 'qpem', got {trainable!r}")
    if trainable == "qpem":
        if model.qpem is None:
            raise ValueError("trainable='qpem' needs a codec with the QPEM entropy model")
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("qpem."))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return ([p for n, p in named if not n.endswith(".quantiles")],
            [p for n, p in named if n.endswith(".quantiles")])


def load_initial_state(model: SingleViewCodec, state: dict[str, Tensor]) -> None:
    """Load ``state`` into ``model``; a QPEM the state lacks (weights of a hyperprior-only codec)
    keeps its initialisation, which codes exactly as the plain hyperprior."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("qpem.") for k in missing):
        raise ValueError(f"initial weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def joint_qpem(name: str) -> dict[str, Tensor]:
    """The QPEM of the shipped joint model ``name``'s image codec, its reference context removed:
    as a single-view codec's QPEM it codes as the joint's does with the reference path off."""
    from lmvic.qpem import without_context
    from lmvic.scene_codec import load_joint

    qpem = load_joint(name).image.qpem
    return without_context(qpem.state_dict(), qpem.M)


def initial_state(source: str, cfg: TrainConfig) -> dict[str, Tensor]:
    """Weights a fresh run starts from (new optimiser and schedule): a shipped name, an exported weight
    file, or a training checkpoint/snapshot (its EMA weights when kept); its λs and size must be the run's."""
    model = single_view_from(source)
    if model.lambdas.shape != (len(cfg.lambdas),) or not torch.allclose(model.lambdas, torch.tensor(cfg.lambdas), rtol=1e-3):
        raise ValueError(f"{source} was trained for other λs than the run's {cfg.lambdas}")
    return {k: v.float() for k, v in model.state_dict().items()}


def budget_fraction(limits: list[tuple[float, float]], deadline: float) -> float:
    """Share of a run's budgets spent: the largest ``spent / limit`` over the ``(spent, limit)`` pairs
    whose limit is set (> 0). With none set, 0 when a ``deadline`` (> 0) ends the run, else 1 (nothing
    to run)."""
    shares = [spent / limit for spent, limit in limits if limit > 0]
    if shares:
        return max(shares)
    return 0.0 if deadline > 0 else 1.0


def budget_progress(limits: list[tuple[float, float]], started: float, deadline: float, world: int) -> float:
    """Fraction of a run done: the budgets' share spent (:func:`budget_fraction` of ``limits``) or, when
    a wall-clock ``deadline`` (Unix time, 0 = none) is set, the share of the time from ``started`` to it
    if larger; equal on every rank."""
    fraction = budget_fraction(limits, deadline)
    if deadline > started:
        fraction = max(fraction, (time.time() - started) / (deadline - started))
    return _synced(fraction, world)


def check_replicas_equal(model: torch.nn.Module) -> None:
    """Raise if any parameter differs between DDP ranks (gradients were not averaged identically)."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    spread = flat.clone()
    lo = flat.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    diff = float((spread - lo).abs().max())
    if diff != 0.0:
        raise RuntimeError(f"DDP replicas diverged: max parameter difference {diff:g}")


def _synced(value: float, world: int) -> float:
    """Maximum of ``value`` over ranks, so every rank follows the same schedule and stops together."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)
