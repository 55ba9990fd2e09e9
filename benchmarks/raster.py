"""Training-iteration time of the CPU rasteriser vs a vectorised pure-PyTorch baseline.

One iteration = render (SH degree 3, RGB) + L1 loss against a target + backward + Adam step over
all Gaussian parameters. Scenes: N Gaussians scattered in the camera frustum at depths 2-6 with
log-normal scales (projected standard deviations of about 1-3 px), random opacities and SH.
The baseline is pure PyTorch with autograd: gsplat's reference projection and SH
(``gsplat/cuda/_torch_impl.py``), then compositing per 16x16 tile with padded, depth-sorted lists
in chunks of 32 Gaussians (only the tile lists come from our extension, without gradients).

Times are wall-clock medians; the process CPU time per iteration is printed beside them, since
the machine may be shared (on an oversubscribed machine OpenMP's default spin-waiting wastes the
CPU, so OMP_WAIT_POLICY defaults to PASSIVE here unless set).

Usage: python benchmarks/raster.py [--threads 2] [--iters 10] [--baseline-iters 2] [--quick]
The last line reports the 20k Gaussians @ 320x240 configuration:
``raster: <ours> ms/iter, <baseline> ms/iter, speedup <x>x``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp

import argparse
import time
from typing import Callable

import torch
from torch import Tensor

from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci, _spherical_harmonics

from geometry.splat import rasterization
from geometry.splat.projection import tile_grid
from geometry.splat.rasterize import intersect_tiles

TILE = 16


def make_scene(n: int, width: int, height: int, seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    focal = 0.9 * width
    z = 2.0 + 4.0 * torch.rand(n, generator=gen)
    u = torch.rand(n, generator=gen) * 1.1 - 0.05
    v = torch.rand(n, generator=gen) * 1.1 - 0.05
    means = torch.stack([(u - 0.5) * width / focal * z, (v - 0.5) * height / focal * z, z], dim=-1)
    scale = 0.012 * 320.0 / width
    return {
        "means": means,
        "quats": torch.randn(n, 4, generator=gen),
        "log_scales": torch.log(scale * torch.exp(0.4 * torch.randn(n, 3, generator=gen))),
        "logit_opacities": torch.logit(0.05 + 0.9 * torch.rand(n, generator=gen)),
        "sh": torch.randn(n, 16, 3, generator=gen) * 0.2,
        "viewmats": torch.eye(4)[None],
        "Ks": torch.tensor([[[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]]]),
    }


def _composite_torch(means2d, conics, colors, opacities, order, width, height, chunk=32):
    """Pure-PyTorch tile compositing (autograd backward). order: per-tile sorted ids [tiles, K], -1 padded."""
    tiles_x, tiles_y = tile_grid(width, height, TILE)
    ys, xs = torch.meshgrid(torch.arange(TILE) + 0.5, torch.arange(TILE) + 0.5, indexing="ij")
    tx = torch.arange(tiles_x).repeat(tiles_y) * TILE
    ty = torch.arange(tiles_y).repeat_interleave(tiles_x) * TILE
    px = (tx[:, None] + xs.reshape(1, -1))[..., None]  # [T, 256, 1]
    py = (ty[:, None] + ys.reshape(1, -1))[..., None]
    trans = torch.ones(px.shape[:2])
    image = torch.zeros(px.shape[:2] + (3,))
    for start in range(0, order.shape[1], chunk):
        ids = order[:, start:start + chunk]  # [T, k]
        valid = ids >= 0
        g = ids.clamp_min(0)
        mx, my = means2d[g, 0][:, None], means2d[g, 1][:, None]  # [T, 1, k]
        a, b, c = (conics[g, i][:, None] for i in range(3))
        dx, dy = mx - px, my - py
        sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
        alpha = torch.clamp_max(opacities[g][:, None] * torch.exp(-sigma), 0.999)
        keep = valid[:, None] & (sigma >= 0) & (alpha >= 1.0 / 255.0)
        alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
        incl = trans[..., None] * torch.cumprod(1 - alpha, dim=-1)
        excl = torch.cat([trans[..., None], incl[..., :-1]], dim=-1)
        alpha = torch.where(incl > 1e-4, alpha, torch.zeros_like(alpha))  # stop before T <= 1e-4
        weights = alpha * excl
        image = image + torch.einsum("tpk,tkd->tpd", weights, colors[g])
        trans = trans * torch.prod(1 - alpha, dim=-1)
    img = image.reshape(tiles_y, tiles_x, TILE, TILE, 3).permute(0, 2, 1, 3, 4).reshape(tiles_y * TILE, tiles_x * TILE, 3)
    return img[:height, :width]


def baseline_render(p: dict[str, Tensor], width: int, height: int) -> Tensor:
    opac = torch.sigmoid(p["logit_opacities"])
    covars, _ = _quat_scale_to_covar_preci(p["quats"], torch.exp(p["log_scales"]), compute_preci=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(p["means"], covars, p["viewmats"], p["Ks"], width, height)
    campos = torch.inverse(p["viewmats"])[:, :3, 3]
    colors = torch.clamp_min(_spherical_harmonics(3, p["means"] - campos, p["sh"]) + 0.5, 0.0)
    tiles_x, tiles_y = tile_grid(width, height, TILE)
    offsets, ids = intersect_tiles(means2d[0], radii[0], depths[0],
                                   torch.zeros(len(opac), dtype=torch.int32), 1, TILE, tiles_x, tiles_y)
    counts = (offsets[1:] - offsets[:-1]).long()
    order = torch.full((len(counts), int(counts.max())), -1, dtype=torch.long)
    slot = torch.arange(len(ids)) - torch.repeat_interleave(offsets[:-1].long(), counts)
    order[torch.repeat_interleave(torch.arange(len(counts)), counts), slot] = ids.long()
    return _composite_torch(means2d[0], conics[0], colors, opac, order, width, height)


def ours_render(p: dict[str, Tensor], width: int, height: int) -> Tensor:
    img, _, _ = rasterization(p["means"], p["quats"], torch.exp(p["log_scales"]), torch.sigmoid(p["logit_opacities"]),
                              p["sh"], p["viewmats"], p["Ks"], width, height, sh_degree=3)
    return img[0]


def time_training(render: Callable, scene: dict[str, Tensor], width: int, height: int, iters: int) -> tuple[float, float]:
    """Median wall and CPU ms per (render, L1, backward, Adam) iteration after one warm-up iteration."""
    trainable = ("means", "quats", "log_scales", "logit_opacities", "sh")
    p = {k: (v.clone().requires_grad_(True) if k in trainable else v) for k, v in scene.items()}
    opt = torch.optim.Adam([p[k] for k in trainable], lr=1e-3, fused=True)
    target = torch.rand(height, width, 3, generator=torch.Generator().manual_seed(1))
    wall, cpu = [], []
    for _ in range(iters + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = (render(p, width, height) - target).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return 1000.0 * sorted(wall[1:])[iters // 2], 1000.0 * sorted(cpu[1:])[iters // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--baseline-iters", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="only the 20k @ 320x240 configuration")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    configs = [(20_000, 320, 240)] if args.quick else [(50_000, 640, 480), (20_000, 320, 240)]
    with torch.no_grad():  # check once that both compute the same image
        s = make_scene(2000, 160, 120)
        diff = (ours_render(s, 160, 120) - baseline_render(s, 160, 120)).abs().max().item()
    print(f"max |ours - baseline| on a 2k-Gaussian 160x120 render: {diff:.2e}")
    result = None
    for n, w, h in configs:
        scene = make_scene(n, w, h)
        ours, ours_cpu = time_training(ours_render, scene, w, h, args.iters)
        base, base_cpu = time_training(baseline_render, scene, w, h, args.baseline_iters)
        print(f"{n // 1000}k Gaussians @ {w}x{h}: ours {ours:.1f} ms/iter (CPU {ours_cpu:.1f} ms), "
              f"baseline {base:.1f} ms/iter (CPU {base_cpu:.1f} ms), speedup {base / ours:.1f}x", flush=True)
        result = (ours, base)
    ours, base = result
    print(f"raster: {ours:.1f} ms/iter, {base:.1f} ms/iter, speedup {base / ours:.1f}x")


if __name__ == "__main__":
    main()
