"""Training of the joint codec on clips (paper eq. 9), resumable, with a CSV curve.

Loss of a clip of L views in coding order (each view coded with the previous one's *decoded*
image, features and depth as reference, the same chain as coding)::

    Σ_t w_t (255²·(λ·MSE(x_t, x̂_t) + depth_weight·λ_1·D(d_t, d̂_t)) + bpp_img,t + bpp_depth,t)

with ``w = (0.5, 1.2, 0.5, 0.9)``, depths in the normalised inverse-depth domain of the clip's
sequence ``DepthRange`` (as the scene codec normalises), λ the quality's λ of the variable-rate
backbone (a random quality per sample) and λ_1 that of ``DEPTH_QUALITY``, the one rate point the
depth codec codes at. The depth distortion D (``depth_metric``) is ``"mse"``, the MSE of the decoded
map upsampled to the image size (which includes what the coarse map's resolution loses at every edge), or
``"relative"`` (:func:`relative_depth_error`): the squared relative inverse-depth error of the map the
codec codes, what the trust mask tests, with far content weighed like near.
The aux loss of the entropy bottlenecks is optimised alongside. ``freeze_backbone`` trains only
the reference path, QPEM and the depth codec (stage two of a staged training on top of shipped
single-view weights). ``parts`` stages it further: ``"depth"`` trains the depth codec alone (the
image codec is neither run nor trained, so the loss is its depth terms only), ``"image"`` freezes
the depth codec and trains the image codec on its decoded depth, ``"context"`` trains everything
but the ICT fusions (which keep their zero-initialised identity): the reference then reaches the
image only through the entropy model, so it can change the rate but never the reconstruction. ``depth_weight`` sets the
depth codec's rate point: its distortion weight is ``depth_weight·λ_1``. ``init_joint`` starts
from what a previous run or a shipped joint file added to the base (``JointPart``): the tensors
under the name prefixes ``init_parts`` (e.g. ``depth``, ``image.qpem``) whose names and shapes still match (an initialisation across
architecture changes, not a resume; what is left out keeps its fresh, zero-path initialisation). Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank samples its own clips
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
from lmvic.models.depth_codec import DepthRange
from lmvic.entropy_models import bits_per_pixel
from lmvic.precision import mixed_precision
from lmvic.scene_codec import DEPTH_QUALITY, JointCodec, JointPart, build_joint, load_joint_file
from lmvic.training.data import refuse_held_out
from lmvic.training.loop import (_save_atomic, budget_progress, check_replicas_equal, dist_info, distortion, log_row,
                                optimisation_step, psnr_from_mse)
from lmvic.training.schedule import Schedule
from lmvic.zoo import recorded_training, ship_ready, single_view_from, training_history

VIEW_WEIGHTS = (0.5, 1.2, 0.5, 0.9)
PARTS = ("all", "depth", "image", "context")
DEPTH_METRICS = ("mse", "relative")


def relative_depth_error(coarse_hat: Tensor, coarse: Tensor, depth_range: DepthRange,
                         size: tuple[int, int]) -> Tensor:
    """Mean squared relative inverse-depth error (B,) of a decoded coarse map (B, 1, h, w) against the
    coded one (normalised inverse depth, padded) over the samples of an image of ``size`` with depth
    (``coarse`` > 0): ``(x̂ - x) / (x + 1/(far·(1/near - 1/far)))``, i.e. Δ(1/d) / (1/d) ≈ Δd / d."""
    inv_near, inv_far = (1.0 / torch.as_tensor(v, dtype=coarse.dtype).reshape(-1, 1, 1, 1)
                         for v in (depth_range.near, depth_range.far))
    x, x_hat = JointCodec.unpadded(coarse, size), JointCodec.unpadded(coarse_hat, size)
    valid = (x > 0).to(x.dtype)
    err = (x_hat - x) / (x + inv_far / (inv_near - inv_far)) * valid
    return err.square().flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)


def clip_loss(net: torch.nn.Module, codec: JointCodec, clip: Clip, quality: Tensor, depth_weight: float = 1.0,
              weights: tuple[float, ...] = VIEW_WEIGHTS, with_image: bool = True,
              metric: str = "mse", depth_metric: str = "mse") -> tuple[Tensor, dict[str, float]]:
    """Weighted RD loss of a clip batch; stats are per-view means of bpp and PSNR (image, depth).

    ``net`` runs the forward (``codec`` itself or its DDP wrapper, which averages the gradients).
    ``with_image=False``: the depth codec alone (image terms 0). ``metric``: the image distortion
    (``lmvic.training.loop.distortion``); ``depth_metric`` the depth's (module docstring); the stat
    ``psnr_depth`` is -10·log10 of it.
    """
    if depth_metric not in DEPTH_METRICS:
        raise ValueError(f"depth_metric must be one of {DEPTH_METRICS}, got {depth_metric!r}")
    B, L, _, H, W = clip.images.shape
    if len(weights) != L:
        raise ValueError(f"{len(weights)} view weights for clips of {L} views")
    lam = codec.image.backbone.lambda_of(quality, B)
    lam_depth = codec.depth.backbone.lambda_of(DEPTH_QUALITY, B) * 255**2
    depth_range = clip.depth_range
    outs = net(clip.images, clip.depths, clip.K, clip.T, quality, depth_range, with_image=with_image)
    loss = clip.images.new_zeros(())
    stats = {"bpp_img": 0.0, "bpp_depth": 0.0, "psnr": 0.0, "psnr_depth": 0.0}
    for t, (w, out) in enumerate(zip(weights, outs)):
        x, d = clip.images[:, t], clip.depths[:, t]
        if depth_metric == "mse":
            d_dist = F.mse_loss(out["depth"]["x_hat"], depth_range.normalise(d), reduction="none").flatten(1).mean(1)
        else:
            d_dist = relative_depth_error(out["depth"]["coarse_hat"], out["depth"]["coarse"], depth_range, (H, W))
        bpp_depth = bits_per_pixel(out["depth"]["likelihoods"], H * W)
        if with_image:
            mse = F.mse_loss(out["image"]["x_hat"], x, reduction="none").flatten(1).mean(1)
            d_img = distortion(out["image"]["x_hat"], x, metric)
            bpp_img = bits_per_pixel(out["image"]["likelihoods"], H * W)
        else:  # depth-only stage: no image terms
            mse = d_img = bpp_img = torch.zeros_like(bpp_depth)
        loss = loss + w * (lam * d_img + depth_weight * lam_depth * d_dist + bpp_img + bpp_depth).mean()
        for key, value in (("bpp_img", bpp_img.mean()), ("bpp_depth", bpp_depth.mean()),
                           ("psnr", psnr_from_mse(mse.mean())), ("psnr_depth", psnr_from_mse(d_dist.mean()))):
            stats[key] += float(value.detach()) / L
    return loss, stats


@dataclass
class JointTrainConfig:
    out_dir: str
    scenes: tuple[str, ...]  # synthetic scene folders or real scenes' work folders (lmvic.clips.load_sequence)
    size: str = "cpu"
    init_single_view: str = ""  # single-view weights (shipped name or .pt path) for the image backbone; "" = fresh
    init_joint: str = ""  # a run's checkpoint.pt or a joint weight file: start from what it adds to the base
    init_parts: tuple[str, ...] = ("image", "depth")  # name prefixes of the JointPart tensors init_joint sets
    freeze_backbone: bool = False
    aligned: bool = True  # False: the Concatenation ablation (reference features unwarped)
    precision: str = "fp32"  # "bf16": transforms under bf16 autocast (entropy models, geometry stay fp32)
    metric: str = "mse"  # image distortion of the RD loss: "mse" or "ms-ssim" (crops over 160 px)
    depth_metric: str = "mse"  # depth distortion: "mse" (upsampled map) or "relative" (coded map, relative)
    parts: str = "all"  # "all", "depth" (the depth codec alone), "image" (depth codec frozen), "context" (no ICT)
    steps: int = 1000  # 0: none (the deadline ends the run; without one, nothing is trained)
    batch: int = 2
    crop: int = 128
    range_jitter: float = 0.0  # narrow each clip's depth range in inverse depth by up to this share (lmvic.clips)
    depth_weight: float = 1.0
    view_weights: tuple[float, ...] = VIEW_WEIGHTS  # w_t of the views of a clip (their count is the clip length)
    schedule: Schedule = field(default_factory=lambda: Schedule(peak_lr=1e-4, warmup_steps=20))
    aux_lr: float = 1e-3
    clip: float = 1.0
    threads: int = 1
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 50
    deadline: float = 0.0  # Unix time the schedule must finish by (0 = none): the run ends at steps or deadline
    started: float = 0.0
    init_history: str = ""  # training history of the init_joint weight file when the run started (its export continues it)


def _build(cfg: JointTrainConfig, log=print) -> JointCodec:
    torch.manual_seed(cfg.seed)
    backbone = None
    if cfg.init_single_view:  # a shipped name, an exported weight file or a single-view checkpoint
        backbone = single_view_from(cfg.init_single_view)
    codec = build_joint(cfg.size, backbone=backbone, aligned=cfg.aligned)
    if cfg.init_joint:
        part = JointPart(codec)
        own = part.state_dict()
        given = {k: v for k, v in _joint_part_state(Path(cfg.init_joint)).items()
                 if any(k == p or k.startswith(p + ".") for p in cfg.init_parts)}
        kept = {k: v for k, v in given.items() if k in own and own[k].shape == v.shape}
        part.load_state_dict({**own, **kept})
        log(f"initialised {len(kept)} of {len(own)} tensors from {cfg.init_joint}")
    return codec


def shipped_base(cfg: JointTrainConfig) -> str | None:
    """The shipped single-view weights (a name such as ``single_view_cpu``) a run's codec is built on
    unchanged, so its export references them instead of storing its backbone; None otherwise."""
    untouched = cfg.freeze_backbone or cfg.parts == "depth"
    named = cfg.init_single_view and not cfg.init_single_view.endswith(".pt")
    return cfg.init_single_view if untouched and named else None


def export_history(checkpoint: Path) -> str:
    """The ``training`` history of a run's export: that of the joint weights it started from
    (``init_joint``'s sidecar as it was when the run started), then one line on this run."""
    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = ck["config"]
    hours = (ck.get("saved", time.time()) - cfg["started"]) / 3600 if cfg["started"] else 0.0
    crops = f"{cfg['crop']}-px crops" if cfg["crop"] else "whole views"
    run = (f"lmvic train-joint {Path(cfg['out_dir']).name}, "
           f"{ck['step']} steps of batch {cfg['batch']} per rank, {crops}, "
           f"{len(cfg['view_weights'])}-view clips, parts {cfg['parts']}"
           f"{' (backbone frozen)' if cfg['freeze_backbone'] else ''}, lr {cfg['schedule']['peak_lr']:g} "
           f"{cfg['schedule']['kind']}, {cfg['precision']}, {hours:.1f} h wall-clock; scenes "
           f"{', '.join(Path(x).name for x in cfg['scenes'])}; from {cfg['init_joint'] or 'fresh joint parts'}")
    return training_history(cfg.get("init_history", ""), run)


def checkpoint_codec(path: Path) -> JointCodec:
    """The codec of a run's ``checkpoint.pt`` (or a copy of it, e.g. a snapshot taken while it trains)
    as ``lmvic train-joint --export`` would ship it: on its shipped base, float16-rounded, eval mode."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    cfg = JointTrainConfig(**{**ck["config"], "schedule": Schedule(**ck["config"]["schedule"])})
    base = shipped_base(cfg)
    backbone = single_view_from(cfg.init_single_view) if cfg.init_single_view else None  # its architecture
    codec = build_joint(cfg.size, backbone=backbone, aligned=cfg.aligned)
    shipped = JointPart(codec) if base else codec
    shipped.load_state_dict(_without_backbone(ck["model"]) if base else ck["model"])
    ship_ready(shipped)
    return codec.eval()


def _joint_part_state(path: Path) -> dict[str, Tensor]:
    """The ``JointPart`` state of a training checkpoint (keys of the whole codec) or a joint weight file."""
    if not path.exists():
        raise FileNotFoundError(f"joint initialisation not found: {path}")
    if path.with_suffix(".json").exists():  # shipped weights with their sidecar
        return JointPart(load_joint_file(path)).state_dict()
    return _without_backbone(torch.load(path, map_location="cpu", weights_only=False)["model"])


def _without_backbone(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A whole joint codec's state → its ``JointPart`` tensors (the image backbone's removed)."""
    return {k: v for k, v in state.items() if not k.startswith("image.backbone.")}


def train_joint(cfg: JointTrainConfig, resume: bool = False, log=print) -> JointCodec:
    """Run (or resume from ``out_dir/checkpoint.pt``) the training; returns the model."""
    refuse_held_out(cfg.scenes)
    rank, world = dist_info()
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    cfg = dataclasses.replace(cfg, started=cfg.started or time.time(),
                              init_history=cfg.init_history or recorded_training(cfg.init_joint))
    if cfg.parts not in PARTS:
        raise ValueError(f"parts must be one of {PARTS}, not {cfg.parts!r}")
    codec = _build(cfg, log).train()
    frozen = {"all": [], "depth": [codec.image], "image": [codec.depth],
              "context": [codec.image.enc_fusions, codec.image.dec_fusions]}[cfg.parts]
    # the base's own QPEM (single-view coding) is not on the joint codec's path: its QPEM replaces it
    backbone_qpem = [codec.image.backbone.qpem] if codec.image.backbone.qpem is not None else []
    for module in frozen + backbone_qpem + ([codec.image.backbone] if cfg.freeze_backbone else []):
        module.requires_grad_(False)
    if cfg.parts != "depth":  # the image bottleneck's quantiles follow the aux loss whenever the image codec runs
        codec.image.backbone.entropy_bottleneck.quantiles.requires_grad_(True)
    main = [p for n, p in codec.named_parameters() if p.requires_grad and not n.endswith(".quantiles")]
    aux = [p for n, p in codec.named_parameters() if p.requires_grad and n.endswith(".quantiles")]
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
        cfg.init_history = ck["config"].get("init_history", "")
        log(f"resumed at step {step}")
    elif rank == 0:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    sampler = ClipSampler([load_sequence(s) for s in cfg.scenes], len(cfg.view_weights), cfg.crop,
                          seed=cfg.seed * 1000 + rank + 7919 * step, range_jitter=cfg.range_jitter)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 7919 * step)
    net = DistributedDataParallel(codec) if world > 1 else codec

    def save() -> None:
        if rank == 0:
            _save_atomic({"model": codec.state_dict(), "opt": opt.state_dict(), "aux_opt": aux_opt.state_dict(),
                          "step": step, "saved": time.time(), "config": dataclasses.asdict(cfg)}, ckpt_path)

    acc: dict[str, float] = {}
    t0 = time.perf_counter()
    def progress() -> float:
        return budget_progress([(step, cfg.steps)], cfg.started, cfg.deadline, world)

    while progress() < 1.0:
        lr = cfg.schedule.lr(step, progress())
        for g in opt.param_groups:
            g["lr"] = lr
        quality = torch.randint(1, codec.num_qualities + 1, (cfg.batch,), generator=gen).float()
        with mixed_precision(cfg.precision):
            loss, stats = clip_loss(net, codec, sampler.batch(cfg.batch), quality, cfg.depth_weight,
                                    cfg.view_weights, with_image=cfg.parts != "depth", metric=cfg.metric,
                                    depth_metric=cfg.depth_metric)
        applied = optimisation_step(loss, opt, main, cfg.clip, codec.aux_loss(), aux_opt)
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

