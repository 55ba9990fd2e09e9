"""3D Gaussian Splatting fit on the CPU, initialised from SfM points.

Photometric loss (1 - w) * L1 + w * (1 - SSIM) on one view per iteration, Adam with gsplat's
simple_trainer learning rates (means decayed exponentially to 1 %), gsplat's ``DefaultStrategy``
for densification and pruning (on CPU tensors, fed by our rasteriser's ``meta``), a hard cap on
the number of Gaussians (lowest opacities removed first), SH degree raised step by step, and a
check every iteration that the loss and parameters stay finite and bounded (``FitDiverged``
names the iteration). Images are fitted at a reduced working size (``FitConfig.max_side``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from gsplat.strategy import DefaultStrategy
from gsplat.strategy.ops import remove
from scipy.spatial import cKDTree
from torch import Tensor
from tqdm import tqdm

from geometry.splat import rasterization
from pipelines.metrics import ssim

SH_C0 = 0.28209479177387814


class FitDiverged(RuntimeError):
    """The fit produced non-finite or exploding values; the message names the iteration."""


def _opt(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class FitConfig:
    """Options of :func:`fit_gaussians` (defaults sized for a 2-core CPU, ~50 views)."""

    iterations: int = _opt(1500, "3DGS fit iterations (one view each)")
    max_side: int = _opt(400, "fit images with their long side scaled down to at most this many pixels")
    max_gaussians: int = _opt(50_000, "cap on the number of Gaussians (lowest opacities removed beyond it)")
    sh_degree: int = _opt(3, "spherical-harmonics degree of the colours (0..3)")
    sh_degree_interval: int = _opt(300, "raise the SH degree by one every this many iterations")
    ssim_weight: float = _opt(0.2, "weight of 1 - SSIM in the loss (the rest is L1)")
    lr_means: float = _opt(1.6e-4, "learning rate of the means, times the scene scale; decays to 0.01x by the end")
    lr_scales: float = _opt(5e-3, "learning rate of the log-scales")
    lr_quats: float = _opt(1e-3, "learning rate of the rotations")
    lr_opacities: float = _opt(5e-2, "learning rate of the opacity logits")
    lr_sh0: float = _opt(2.5e-3, "learning rate of the SH band 0")
    lr_shN: float = _opt(2.5e-3 / 20, "learning rate of the higher SH bands")
    init_opacity: float = _opt(0.1, "initial opacity of the Gaussians at the SfM points")
    seed: int = _opt(0, "random seed (view order, densification)")
    refine_start: int = _opt(200, "first iteration of densification")
    refine_stop_fraction: float = _opt(0.75, "densify until this fraction of the iterations")
    refine_every: int = _opt(100, "densify every this many iterations")
    grow_grad2d: float = _opt(2e-4, "2-D gradient threshold for duplicating/splitting (gsplat DefaultStrategy)")
    reset_every: int = _opt(3000, "opacity reset period (gsplat DefaultStrategy)")
    threads: int = field(default=0, metadata={"help": "torch/OpenMP threads for the fit; 0 keeps the current setting",
                                              "cache": False})  # no effect on the result: not in the cache key
    explode_scale: float = _opt(1e3, "a Gaussian larger than this times the scene scale stops the fit as exploded")


@dataclass
class Gaussians:
    """Fitted Gaussians in their optimisation parameterisation (as stored in 3DGS PLY files)."""

    means: Tensor  # [N, 3] world
    quats: Tensor  # [N, 4] (w, x, y, z), not necessarily unit
    log_scales: Tensor  # [N, 3]
    logit_opacities: Tensor  # [N]
    sh: Tensor  # [N, K, 3] SH coefficients, K = (sh_degree + 1)^2; colour = SH + 0.5
    sh_degree: int = field(default=3)

    def __len__(self) -> int:
        return int(self.means.shape[0])


def render(
    gaussians: Gaussians,
    Ks: Tensor,  # [C, 3, 3]
    viewmats: Tensor,  # [C, 4, 4]
    width: int,
    height: int,
    render_mode: str = "RGB+ED",
    backgrounds: Tensor | None = None,  # [C, 3]
) -> tuple[Tensor, Tensor, dict]:
    """Render views of fitted Gaussians: (colors [C,H,W,D], alphas [C,H,W,1], meta) via ``rasterization``."""
    g = gaussians
    return rasterization(
        g.means, g.quats, torch.exp(g.log_scales), torch.sigmoid(g.logit_opacities), g.sh,
        viewmats.float(), Ks.float(), width, height, sh_degree=g.sh_degree, render_mode=render_mode,
        backgrounds=backgrounds,
    )


def scene_scale(viewmats: Tensor) -> float:
    """1.1 x the largest distance of a camera centre from their mean (gsplat's convention)."""
    centres = -(viewmats[:, :3, :3].transpose(1, 2) @ viewmats[:, :3, 3:])[..., 0]
    return 1.1 * float((centres - centres.mean(0)).norm(dim=1).max().clamp_min(1e-6))


def initial_gaussians(points: Tensor, colors: Tensor, sh_degree: int, init_opacity: float) -> Gaussians:
    """Gaussians at the points [N,3] with colours [N,3] in [0,1], isotropic scales from neighbour distances."""
    pts = points.double().numpy()
    k = min(4, len(pts))
    dist, _ = cKDTree(pts).query(pts, k=k)
    nn = np.sqrt((dist[:, 1:] ** 2).mean(axis=1)) if k > 1 else np.ones(len(pts))
    nn = np.clip(nn, max(float(np.median(nn)) * 1e-3, 1e-7), None)
    n = len(pts)
    sh = torch.zeros(n, (sh_degree + 1) ** 2, 3)
    sh[:, 0] = (colors.float() - 0.5) / SH_C0
    return Gaussians(
        means=points.float().clone(),
        quats=torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
        log_scales=torch.log(torch.from_numpy(nn).float())[:, None].repeat(1, 3),
        logit_opacities=torch.full((n,), math.log(init_opacity / (1 - init_opacity))),
        sh=sh,
        sh_degree=sh_degree,
    )


def fit_gaussians(
    points: Tensor | np.ndarray,  # [N, 3] world
    point_colors: Tensor | np.ndarray,  # [N, 3] in [0, 1] (uint8 accepted)
    images: Sequence[Tensor | np.ndarray],  # each [H, W, 3], float in [0, 1] or uint8
    Ks: Tensor | np.ndarray,  # [V, 3, 3] at the images' resolution
    viewmats: Tensor | np.ndarray,  # [V, 4, 4] world-to-camera (OpenCV)
    config: FitConfig = FitConfig(),
    progress: bool = True,
) -> Gaussians:
    """Fit 3D Gaussians to posed images; returns them at sh_degree = config.sh_degree.

    Raises ValueError on inconsistent inputs and FitDiverged when the optimisation blows up.
    """
    points, point_colors = _as_float_tensor(points), _as_float_tensor(point_colors)
    Ks, viewmats = _as_float_tensor(Ks), _as_float_tensor(viewmats)
    if point_colors.max() > 1.0:
        point_colors = point_colors / 255.0
    _check_fit_inputs(points, point_colors, images, Ks, viewmats)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    targets, Ks = working_images(images, Ks, config.max_side)
    scale = scene_scale(viewmats)

    init = initial_gaussians(points, point_colors, config.sh_degree, config.init_opacity)
    params = torch.nn.ParameterDict({
        "means": init.means, "quats": init.quats, "scales": init.log_scales,
        "opacities": init.logit_opacities, "sh0": init.sh[:, :1].clone(), "shN": init.sh[:, 1:].clone(),
    })
    lrs = {"means": config.lr_means * scale, "quats": config.lr_quats, "scales": config.lr_scales,
           "opacities": config.lr_opacities, "sh0": config.lr_sh0, "shN": config.lr_shN}
    optimizers = {k: torch.optim.Adam([params[k]], lr=lr, eps=1e-15, fused=True) for k, lr in lrs.items()}
    means_decay = 0.01 ** (1.0 / max(config.iterations, 1))
    strategy = DefaultStrategy(
        refine_start_iter=config.refine_start,
        refine_stop_iter=int(config.refine_stop_fraction * config.iterations),
        refine_every=config.refine_every, reset_every=config.reset_every, grow_grad2d=config.grow_grad2d,
        verbose=False,
    )
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state(scene_scale=scale)

    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(config.seed))
    bar = tqdm(range(config.iterations), desc="3DGS fit", disable=not progress, unit="it")
    for step in bar:
        view = int(order[step % len(order)])
        target = targets[view]
        height, width = target.shape[:2]
        degree = min(config.sh_degree, step // config.sh_degree_interval)
        colors, _, info = rasterization(
            params["means"], params["quats"], torch.exp(params["scales"]), torch.sigmoid(params["opacities"]),
            torch.cat([params["sh0"], params["shN"]], dim=1), viewmats[view:view + 1], Ks[view:view + 1],
            width, height, sh_degree=degree, packed=False,
        )
        strategy.step_pre_backward(params, optimizers, state, step, info)
        loss = _photometric_loss(colors[0], target, config.ssim_weight)
        if not torch.isfinite(loss):
            raise FitDiverged(f"3DGS fit diverged at iteration {step}: loss is {loss.item()}")
        loss.backward()
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        for group in optimizers["means"].param_groups:
            group["lr"] *= means_decay
        strategy.step_post_backward(params, optimizers, state, step, info, packed=False)
        _enforce_cap(params, optimizers, state, config.max_gaussians)
        _check_finite(params, step, config.explode_scale * scale)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", n=len(params["means"]))
    bar.close()
    return Gaussians(
        means=params["means"].detach().clone(), quats=params["quats"].detach().clone(),
        log_scales=params["scales"].detach().clone(), logit_opacities=params["opacities"].detach().clone(),
        sh=torch.cat([params["sh0"], params["shN"]], dim=1).detach().clone(), sh_degree=config.sh_degree,
    )


def _photometric_loss(render: Tensor, target: Tensor, ssim_weight: float) -> Tensor:
    """(1 - w) L1 + w (1 - SSIM) of [H, W, 3] images."""
    l1 = (render - target).abs().mean()
    if ssim_weight == 0:
        return l1
    s = ssim(render.permute(2, 0, 1)[None], target.permute(2, 0, 1)[None])
    return (1 - ssim_weight) * l1 + ssim_weight * (1 - s)


def _enforce_cap(params, optimizers, state, cap: int) -> None:
    excess = len(params["means"]) - cap
    if excess <= 0:
        return
    drop = torch.zeros(len(params["means"]), dtype=torch.bool)
    drop[torch.argsort(params["opacities"].detach())[:excess]] = True
    remove(params=params, optimizers=optimizers, state=state, mask=drop)


def _check_finite(params, step: int, max_scale: float) -> None:
    for name, p in params.items():
        if not torch.isfinite(p).all():
            raise FitDiverged(f"3DGS fit diverged at iteration {step}: non-finite values in {name}")
    biggest = float(params["scales"].detach().max())
    if biggest > math.log(max_scale):
        raise FitDiverged(
            f"3DGS fit exploded at iteration {step}: a Gaussian's scale reached {math.exp(min(biggest, 700.0)):.3g} "
            f"(limit {max_scale:.3g})"
        )


def _as_float_tensor(x: Tensor | np.ndarray) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().float().cpu()
    return torch.from_numpy(np.array(x, dtype=np.float32))  # a copy: inputs may be read-only arrays


def working_images(images: Sequence[Tensor | np.ndarray], Ks: Tensor, max_side: int) -> tuple[list[Tensor], Tensor]:
    """Images as float [h, w, 3] tensors scaled (area) so the long side is <= max_side; Ks scaled to match.

    With pixel centres at +0.5, scaling continuous coordinates by (w/W, h/H) is exact, so fx, cx
    scale by w/W and fy, cy by h/H.
    """
    out, Ks = [], Ks.clone()
    for i, img in enumerate(images):
        t = _as_float_tensor(img)
        if t.max() > 1.0:
            t = t / 255.0
        h, w = t.shape[:2]
        f = min(1.0, max_side / max(h, w))
        nh, nw = max(1, round(h * f)), max(1, round(w * f))
        if (nh, nw) != (h, w):
            t = F.interpolate(t.permute(2, 0, 1)[None], size=(nh, nw), mode="area")[0].permute(1, 2, 0)
            Ks[i, 0] *= nw / w
            Ks[i, 1] *= nh / h
        out.append(t.contiguous())
    return out, Ks


def _check_fit_inputs(points: Tensor, colors: Tensor, images: Sequence, Ks: Tensor, viewmats: Tensor) -> None:
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise ValueError(f"points must be [N>0, 3], got {tuple(points.shape)}")
    if colors.shape != points.shape:
        raise ValueError(f"point_colors must be {tuple(points.shape)}, got {tuple(colors.shape)}")
    if not torch.isfinite(points).all():
        raise ValueError("points contain non-finite values")
    v = len(images)
    if v == 0 or Ks.shape != (v, 3, 3) or viewmats.shape != (v, 4, 4):
        raise ValueError(f"need Ks [V,3,3] and viewmats [V,4,4] for V={v} images; got "
                         f"{tuple(Ks.shape)}, {tuple(viewmats.shape)}")
    for i, img in enumerate(images):
        if tuple(img.shape[2:]) != (3,) or len(img.shape) != 3:
            raise ValueError(f"image {i} must be [H, W, 3], got {tuple(img.shape)}")


__all__ = ["FitConfig", "FitDiverged", "Gaussians", "fit_gaussians", "render"]
