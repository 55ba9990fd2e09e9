"""The CPU rasteriser against gsplat's pure-PyTorch references and a brute-force compositor.

The reference path is independent of ours: gsplat's ``_quat_scale_to_covar_preci``,
``_fully_fused_projection`` and ``_spherical_harmonics`` (float64), then a per-pixel compositor
written here that visits every projected Gaussian at every pixel, sorted by depth, with gsplat's
rules (alpha = min(0.999, o exp(-sigma)), skip alpha < 1/255, stop before T <= 1e-4). Its
gradients come from float64 autograd through that compositor.
"""

from __future__ import annotations


import pytest
import torch
from gsplat.cuda._torch_impl import (
    _fully_fused_projection,
    _quat_scale_to_covar_preci,
    _spherical_harmonics,
)
from gsplat.strategy import DefaultStrategy

from geometry.splat import rasterization

WIDTH, HEIGHT = 64, 48


def _look_at(eye: list[float], target: list[float]) -> torch.Tensor:
    """World-to-camera [4,4] (OpenCV axes) of a camera at `eye` looking at `target`."""
    eye_t, tgt = torch.tensor(eye), torch.tensor(target)
    fwd = torch.nn.functional.normalize(tgt - eye_t, dim=0)
    right = torch.nn.functional.normalize(torch.linalg.cross(fwd, torch.tensor([0.0, -1.0, 0.0])), dim=0)
    down = torch.linalg.cross(fwd, right)
    rot = torch.stack([right, down, fwd])
    view = torch.eye(4)
    view[:3, :3] = rot
    view[:3, 3] = -rot @ eye_t
    return view


def _scene(n: int = 300, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=gen) * torch.tensor([0.8, 0.6, 0.8])
    means[:8, 2] = -6.0  # behind / too near for camera 0: culled
    means[8:40] *= 0.2  # an opaque cluster: pixels stop early (T <= 1e-4)
    opacities = torch.rand(n, generator=gen) * 0.98 + 0.01
    opacities[8:40] = 0.98
    return {
        "means": means,
        "quats": torch.randn(n, 4, generator=gen),
        "scales": torch.exp(torch.randn(n, 3, generator=gen) * 0.5 - 2.8),
        "opacities": opacities,
        "sh": torch.randn(n, 16, 3, generator=gen) * 0.3,
        "viewmats": torch.stack([_look_at([0.0, 0.0, -3.5], [0, 0, 0]), _look_at([1.5, -0.8, -3.0], [0.1, 0, 0])]),
        "Ks": torch.tensor([[[70.0, 0, 31.0], [0, 68.0, 25.0], [0, 0, 1]]] * 2),
    }


def _reference(scene: dict[str, torch.Tensor], sh_degree: int, antialiased: bool = False) -> dict[str, torch.Tensor]:
    """gsplat torch projection + SH, then brute-force compositing, in float64 with autograd."""
    p = {k: v.double().clone().requires_grad_(k in ("means", "quats", "scales", "opacities", "sh"))
         for k, v in scene.items()}
    covars, _ = _quat_scale_to_covar_preci(p["quats"], p["scales"], compute_preci=False)
    radii, means2d, depths, conics, comps = _fully_fused_projection(
        p["means"], covars, p["viewmats"], p["Ks"], WIDTH, HEIGHT, calc_compensations=antialiased
    )
    opacities = p["opacities"][None].expand(2, -1) * (comps if antialiased else 1.0)
    campos = torch.inverse(p["viewmats"])[:, :3, 3]
    dirs = p["means"][None] - campos[:, None]
    colors = torch.clamp_min(_spherical_harmonics(sh_degree, dirs, p["sh"][None].expand(2, -1, -1, -1)) + 0.5, 0)
    feats = torch.cat([colors, depths[..., None]], dim=-1)
    images, alphas, medians, stopped = [], [], [], []
    for cam in range(2):
        img, alpha, med, done = _composite(means2d[cam], conics[cam], feats[cam], opacities[cam],
                                           depths[cam], (radii[cam] > 0).all(-1))
        images.append(img)
        alphas.append(alpha)
        medians.append(med)
        stopped.append(done)
    return {"params": p, "colors": torch.stack(images), "alphas": torch.stack(alphas),
            "median": torch.stack(medians), "stopped": torch.stack(stopped)}


def _composite(means2d, conics, feats, opacities, depths, visible):
    """Brute force: every visible Gaussian at every pixel, front to back.

    Returns colours [H,W,D], alpha [H,W,1], median depth [H,W] and where the pixel stopped early [H,W].
    """
    ys, xs = torch.meshgrid(torch.arange(HEIGHT, dtype=torch.float64) + 0.5,
                            torch.arange(WIDTH, dtype=torch.float64) + 0.5, indexing="ij")
    trans = torch.ones(HEIGHT, WIDTH, dtype=torch.float64)
    out = torch.zeros(HEIGHT, WIDTH, feats.shape[-1], dtype=torch.float64)
    done = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
    median = torch.zeros(HEIGHT, WIDTH, dtype=torch.float64)
    order = torch.argsort(depths.detach(), stable=True)
    for g in order[visible[order]].tolist():
        dx, dy = means2d[g, 0] - xs, means2d[g, 1] - ys
        a, b, c = conics[g]
        sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
        alpha = torch.clamp_max(opacities[g] * torch.exp(-sigma), 0.999)
        hit = (sigma >= 0) & (alpha >= 1.0 / 255.0) & ~done
        next_t = trans * (1 - alpha)
        stop = hit & (next_t <= 1e-4)
        done = done | stop
        hit = hit & ~stop
        out = out + torch.where(hit[..., None], (alpha * trans)[..., None] * feats[g], 0.0)
        median = torch.where(hit & (trans >= 0.5) & (next_t < 0.5), depths[g].detach(), median)
        trans = torch.where(hit, next_t, trans)
    return out, (1 - trans)[..., None], median, done


def _ours(scene, sh_degree, packed, render_mode="RGB+ED", rasterize_mode="classic"):
    p = {k: v.clone().requires_grad_(k in ("means", "quats", "scales", "opacities", "sh"))
         for k, v in scene.items()}
    colors, alphas, meta = rasterization(
        p["means"], p["quats"], p["scales"], p["opacities"], p["sh"], p["viewmats"], p["Ks"], WIDTH, HEIGHT,
        sh_degree=sh_degree, packed=packed, render_mode=render_mode, rasterize_mode=rasterize_mode,
    )
    return p, colors, alphas, meta


@pytest.fixture(scope="module")
def scene():
    return _scene()


@pytest.fixture(scope="module")
def reference(scene):
    return _reference(scene, sh_degree=3)


def test_projection_matches_gsplat_reference(scene):
    from geometry.splat.projection import project_gaussians

    ours = project_gaussians(scene["means"], scene["quats"], scene["scales"], torch.ones(len(scene["means"])),
                             scene["viewmats"], scene["Ks"], WIDTH, HEIGHT)
    covars, _ = _quat_scale_to_covar_preci(scene["quats"].double(), scene["scales"].double(), compute_preci=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(
        scene["means"].double(), covars, scene["viewmats"].double(), scene["Ks"].double(), WIDTH, HEIGHT
    )
    vis = (ours.radii > 0).all(-1)
    ref_vis = (radii > 0).all(-1)
    assert vis.sum() > 300 and not (vis & ~ref_vis).any()  # opacity-aware radii are never larger
    assert (ref_vis & ~vis).sum() <= 2
    torch.testing.assert_close(ours.means2d[vis].double(), means2d[vis], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.depths[vis].double(), depths[vis], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.conics[vis].double(), conics[vis], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
def test_forward_matches_brute_force(scene, reference, packed):
    _, colors, alphas, meta = _ours(scene, 3, packed)
    # the scene exercises early termination, partial coverage and empty pixels
    assert reference["stopped"].any() and (reference["alphas"] < 0.01).any()
    rgb_ref = reference["colors"][..., :3]
    ed_ref = reference["colors"][..., 3:] / reference["alphas"].clamp_min(1e-10)
    torch.testing.assert_close(colors[..., :3].double(), rgb_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(alphas.double(), reference["alphas"], rtol=0, atol=1e-5)
    covered = reference["alphas"] > 1e-3
    torch.testing.assert_close(colors[..., 3:].double()[covered], ed_ref[covered], rtol=1e-5, atol=1e-5)
    assert meta["width"] == WIDTH and meta["height"] == HEIGHT and meta["n_cameras"] == 2


def test_median_depth_matches_brute_force(scene, reference):
    _, _, _, meta = _ours(scene, 3, packed=True)
    median = meta["median_depths"][..., 0].double()
    ref = reference["median"]
    assert (ref > 0).float().mean() > 0.2 and (ref == 0).any()
    torch.testing.assert_close(median, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("packed", "mode"), [(False, "classic"), (True, "classic"), (True, "antialiased")])
def test_gradients_match_brute_force(scene, reference, packed, mode):
    if mode == "antialiased":
        reference = _reference(scene, sh_degree=3, antialiased=True)
    gen = torch.Generator().manual_seed(1)
    weights = torch.rand(2, HEIGHT, WIDTH, 5, generator=gen, dtype=torch.float64)
    ref_loss = (reference["colors"] * weights[..., :4]).sum() + (reference["alphas"] * weights[..., 4:]).sum()
    ref_params = reference["params"]
    names = ["means", "quats", "scales", "opacities", "sh"]
    ref_grads = torch.autograd.grad(ref_loss, [ref_params[k] for k in names], retain_graph=True)

    params, colors, alphas, meta = _ours(scene, 3, packed, render_mode="RGB+D", rasterize_mode=mode)
    torch.testing.assert_close(colors.double(), reference["colors"], rtol=0, atol=1e-5)
    loss = (colors * weights[..., :4].float()).sum() + (alphas * weights[..., 4:].float()).sum()
    grads = torch.autograd.grad(loss, [params[k] for k in names])
    for name, g, ref in zip(names, grads, ref_grads):
        err = (g.double() - ref).norm() / ref.norm()
        assert err < 1e-4, f"{name}: relative error {err:.2e}"
        assert torch.allclose(g.double(), ref, rtol=1e-3, atol=1e-4 * ref.abs().max()), name


def test_background_and_plain_colors(scene):
    """Post-activation colours [N, D] and a background: out = sum(w c) + T * bg."""
    feats = torch.rand(len(scene["means"]), 5)
    bg = torch.rand(2, 5)
    args = (scene["means"], scene["quats"], scene["scales"], scene["opacities"], feats,
            scene["viewmats"], scene["Ks"], WIDTH, HEIGHT)
    plain, alphas, _ = rasterization(*args)
    with_bg, _, _ = rasterization(*args, backgrounds=bg)
    torch.testing.assert_close(with_bg, plain + (1 - alphas) * bg[:, None, None], rtol=0, atol=1e-6)


def test_meta_drives_default_strategy_on_cpu(scene):
    """gsplat's DefaultStrategy reads means2d gradients and radii from our meta on CPU tensors."""
    params = torch.nn.ParameterDict({
        "means": scene["means"].clone(), "quats": scene["quats"].clone(),
        "scales": torch.log(scene["scales"]), "opacities": torch.logit(scene["opacities"]),
        "sh0": scene["sh"][:, :1].clone(), "shN": scene["sh"][:, 1:].clone(),
    })
    optimizers = {k: torch.optim.Adam([v], lr=1e-3) for k, v in params.items()}
    strategy = DefaultStrategy(refine_start_iter=0, refine_every=1, grow_grad2d=1e-9, verbose=False)
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state()
    for packed in (False, True):
        colors, _, info = rasterization(
            params["means"], params["quats"], torch.exp(params["scales"]), torch.sigmoid(params["opacities"]),
            torch.cat([params["sh0"], params["shN"]], 1), scene["viewmats"], scene["Ks"], WIDTH, HEIGHT,
            sh_degree=3, packed=packed, absgrad=True,
        )
        strategy.step_pre_backward(params, optimizers, state, 1, info)
        colors.sum().backward()
        assert info["means2d"].absgrad.shape == info["means2d"].shape
        assert (info["means2d"].absgrad >= info["means2d"].grad.abs() - 1e-6).all()
        n_before = len(params["means"])
        strategy.step_post_backward(params, optimizers, state, 1, info, packed=packed)
        assert len(params["means"]) > n_before  # every visible Gaussian with a gradient was duplicated/split
        for opt in optimizers.values():
            opt.zero_grad()
        state = strategy.initialize_state()
    assert torch.isfinite(params["means"].detach()).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_tile_lists_match_reference(threads):
    """Per-tile lists (counting sort split over threads, then depth sort) equal a plain sort, any thread count."""
    from geometry.splat.projection import tile_grid
    from geometry.splat.rasterize import intersect_tiles

    gen = torch.Generator().manual_seed(3)
    m, width, height, tile = 12000, 180, 130, 16
    means2d = torch.rand(m, 2, generator=gen) * torch.tensor([width + 20.0, height + 20.0]) - 10.0
    radii = torch.randint(0, 20, (m, 2), generator=gen, dtype=torch.int32)
    depths = torch.randint(-20, 30, (m,), generator=gen).float() / 10.0  # many ties (entry order decides), some < 0
    image_ids = torch.randint(0, 2, (m,), generator=gen, dtype=torch.int32)
    tiles_x, tiles_y = tile_grid(width, height, tile)
    lo = torch.floor(means2d / tile - radii / tile).long()
    hi = torch.ceil(means2d / tile + radii / tile).long()
    lo = torch.stack([lo[:, 0].clamp(0, tiles_x), lo[:, 1].clamp(0, tiles_y)], -1)
    hi = torch.stack([hi[:, 0].clamp(0, tiles_x), hi[:, 1].clamp(0, tiles_y)], -1)
    keys = []
    for g in torch.nonzero((radii > 0).all(-1))[:, 0].tolist():
        for ty in range(lo[g, 1], hi[g, 1]):
            for tx in range(lo[g, 0], hi[g, 0]):
                keys.append(((int(image_ids[g]) * tiles_y + ty) * tiles_x + tx, float(depths[g]), g))
    keys.sort()
    ref_ids = torch.tensor([g for _, _, g in keys], dtype=torch.int32)
    ref_counts = torch.bincount(torch.tensor([t for t, _, _ in keys]), minlength=2 * tiles_x * tiles_y)

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        offsets, ids = intersect_tiles(means2d, radii, depths, image_ids, 2, tile, tiles_x, tiles_y)
    finally:
        torch.set_num_threads(before)
    assert len(ref_ids) > 40_000
    torch.testing.assert_close(offsets[1:] - offsets[:-1], ref_counts.int(), rtol=0, atol=0)
    torch.testing.assert_close(ids, ref_ids, rtol=0, atol=0)


def test_two_threads_give_identical_results(scene):
    """Every kernel is parallel; images and gradients are bit-identical with 1 and 2 threads."""
    names = ["means", "quats", "scales", "opacities", "sh"]
    weights = torch.rand(2, HEIGHT, WIDTH, 4, generator=torch.Generator().manual_seed(2))
    results = []
    before = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            params, colors, alphas, meta = _ours(scene, 3, packed=True, render_mode="RGB+D")
            loss = (colors * weights).sum() + alphas.sum()
            results.append([colors, alphas, meta["median_depths"]]
                           + list(torch.autograd.grad(loss, [params[k] for k in names])))
        finally:
            torch.set_num_threads(before)
    for one, two in zip(*results):
        assert torch.equal(one, two)
