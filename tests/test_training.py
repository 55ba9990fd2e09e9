"""Training engine: schedules, the uint8 cache, crop sampling, a resumed run, DDP with 2 gloo ranks."""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import lmvic  # noqa: F401
from lmvic.training.data import CropSampler, ImageCache, build_cache, gradient_energy, scene_images, write_cache
from lmvic.training.loop import TrainConfig, train
from lmvic.training.schedule import Schedule

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """Two tiny scenes: noise images and a half-flat/half-noise image."""
    root = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(0)
    (root / "a" / "images").mkdir(parents=True)
    (root / "b" / "images").mkdir(parents=True)
    (root / "fox" / "images").mkdir(parents=True)
    for i in range(2):
        cv2.imwrite(str(root / "a" / "images" / f"{i}.png"), rng.integers(0, 256, (150, 210, 3), dtype=np.uint8))
    half = np.full((128, 512, 3), 90, np.uint8)
    half[:, 256:] = rng.integers(0, 256, (128, 256, 3), dtype=np.uint8)
    cv2.imwrite(str(root / "b" / "images" / "half.png"), half)
    cv2.imwrite(str(root / "b" / "disp1.png"), half)  # beside images/, not a view: skipped
    cv2.imwrite(str(root / "fox" / "images" / "0.png"), half)
    return root


def test_schedules():
    s = Schedule("cosine", peak_lr=1e-3, final_lr=1e-5, warmup_steps=10)
    assert s.lr(0, 0.0) == pytest.approx(1e-4)
    assert s.lr(9, 0.0) == pytest.approx(1e-3)
    assert s.lr(100, 0.5) == pytest.approx((1e-3 + 1e-5) / 2)
    assert s.lr(100, 1.0) == pytest.approx(1e-5)
    step = Schedule("step", peak_lr=1e-3, warmup_steps=0)
    assert [step.lr(5, p) for p in (0.5, 0.85, 0.97)] == pytest.approx([1e-3, 1e-4, 1e-5])
    assert Schedule("constant", peak_lr=2e-3, warmup_steps=0).lr(7, 0.99) == 2e-3
    with pytest.raises(ValueError):
        Schedule("linear")


def test_scene_images_skip_held_out_scenes(scenes):
    names = {p.parent.parent.name for p in scene_images(scenes)}
    assert names == {"a", "b"}
    assert {p.parent.parent.name for p in scene_images(scenes, include=("fox",), exclude=())} == {"fox"}


def test_cache_round_trips_pixels_and_scales(scenes, tmp_path):
    paths = scene_images(scenes, include=("a",))
    cache = ImageCache(build_cache(paths, tmp_path / "c", max_side=256, scales=(1.0, 0.5), min_side=64))
    assert len(cache) == 4  # 2 images × 2 scales
    first = cache.image(0)
    assert np.array_equal(first, cv2.imread(str(paths[0]))[:, :, ::-1])
    assert cache.image(1).shape == (91, 128, 3)  # 150×210 → long side 256·0.5 = 128
    # a second build with the same settings reuses the files
    mtime = (tmp_path / "c" / "pixels.u8").stat().st_mtime_ns
    build_cache(paths, tmp_path / "c", max_side=256, scales=(1.0, 0.5), min_side=64)
    assert (tmp_path / "c" / "pixels.u8").stat().st_mtime_ns == mtime


def test_crop_sampler_prefers_texture(scenes, tmp_path):
    cache = ImageCache(build_cache(scene_images(scenes, include=("b",)), tmp_path / "c", scales=(1.0,)))
    flat_energy = gradient_energy(np.full((64, 64, 3), 90, np.uint8))
    one = CropSampler([cache], 64, seed=1, candidates=1)
    many = CropSampler([cache], 64, seed=1, candidates=16)
    e_one = np.mean([gradient_energy((b.permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for b in one.batch(32)])
    e_many = np.mean([gradient_energy((b.permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for b in many.batch(32)])
    assert flat_energy == 0 and e_many > 1.3 * e_one
    x = many.batch(3)
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_crop_sampler_permutes_channels_uniformly(tmp_path):
    colour = np.array([10, 100, 200], np.uint8)
    cache = ImageCache(write_cache(tmp_path / "c", {"flat": 1}, [np.tile(colour, (80, 96, 1))]))
    def orders(sampler, n):
        crops = (sampler.batch(n) * 255).round().to(torch.uint8)
        assert (crops == crops[:, :, :1, :1]).all()  # still flat: whole pixels moved, no mixing
        return [tuple(c[:, 0, 0].tolist()) for c in crops]
    assert set(orders(CropSampler([cache], 64, seed=3), 50)) == {(10, 100, 200)}
    seen = orders(CropSampler([cache], 64, seed=3, permute_channels=True), 1200)
    counts = {o: seen.count(o) / len(seen) for o in set(seen)}
    assert sorted(counts) == sorted(set(itertools.permutations((10, 100, 200))))
    assert all(abs(f - 1 / 6) < 0.04 for f in counts.values())


def test_train_writes_curves_and_resumes(scenes, tmp_path):
    cache = build_cache(scene_images(scenes), tmp_path / "cache", max_side=256, scales=(1.0,))
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), cache_dir=str(cache), crop=64, batch=2, max_steps=3,
                      schedule=Schedule("cosine", 1e-3, 1e-5, 1), log_every=1, ema_decay=0.9)
    val = torch.rand(2, 3, 64, 64)
    train(cfg, val_crops=val, log=lambda s: None)
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 3 and ck["ema"] is not None
    cfg2 = TrainConfig.from_dict(ck["config"])
    cfg2.max_steps = 5
    model = train(cfg2, resume=True, val_crops=val, log=lambda s: None)
    ck2 = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ck2["step"] == 5 and ck2["cpu_seconds"] > ck["cpu_seconds"]
    rows = list(csv.DictReader(open(tmp_path / "run" / "train.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    val_rows = list(csv.DictReader(open(tmp_path / "run" / "val.csv")))
    assert {int(r["quality"]) for r in val_rows} == set(range(1, model.num_qualities + 1))


def test_a_compiled_run_computes_what_an_eager_run_does(scenes, tmp_path, monkeypatch):
    """``--compile``: the same losses and updates step for step (inductor drawing the quantisation noise from
    eager's generator, as set here), and a checkpoint of the model itself, loadable by an eager run."""
    from lmvic.models.single_view import build_single_view

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    torch.manual_seed(0)  # as ``train`` builds a fresh model (seed 0)
    initial = build_single_view().state_dict()
    cache = build_cache(scene_images(scenes), tmp_path / "cache", max_side=256, scales=(1.0,))
    losses, states = {}, {}
    for compile in (False, True):
        out = tmp_path / f"run{compile:d}"
        cfg = TrainConfig(out_dir=str(out), cache_dir=str(cache), crop=64, batch=2, max_steps=2, log_every=1,
                          schedule=Schedule("constant", 1e-3, 1e-3, 0), compile=compile)
        train(cfg, log=lambda s: None)
        losses[compile] = [float(r["loss"]) for r in csv.DictReader(open(out / "train.csv"))]
        states[compile] = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    assert len(losses[True]) == 2
    assert np.allclose(losses[True], losses[False], rtol=1e-4)
    assert states[True].keys() == states[False].keys() == initial.keys()
    moved = max(float((v - initial[k]).abs().max()) for k, v in states[False].items() if v.numel())
    assert moved > 1e-3  # the steps changed the weights by more than the tolerance below
    assert all(torch.allclose(states[True][k], v, atol=1e-4) for k, v in states[False].items())


def test_budgets_left_unset_give_way_to_the_end_time(scenes, tmp_path):
    """With no CPU or step budget the deadline alone ends the run (its schedule reaching the final
    learning rate); with neither, nothing runs. The CLI leaves budgets unset when --until is given."""
    import time

    from lmvic.training.loop import budget_fraction
    from pipelines.commands.train import budget_default

    assert budget_fraction([(30, 60), (5, 0)], deadline=0.0) == 0.5  # an unset limit (0) does not count
    assert budget_fraction([(30, 60), (9, 10)], deadline=0.0) == 0.9  # the first limit reached ends it
    assert budget_fraction([(5, 0)], deadline=time.time() + 60) == 0.0
    assert budget_fraction([(5, 0)], deadline=0.0) == 1.0
    assert budget_default(None, 60.0, "") == 60.0 and budget_default(None, 60.0, "10:00") == 0
    assert budget_default(90.0, 60.0, "10:00") == 90.0
    cache = build_cache(scene_images(scenes), tmp_path / "cache", max_side=256, scales=(1.0,))
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), cache_dir=str(cache), crop=64, batch=2, budget_cpu_minutes=0,
                      schedule=Schedule("cosine", 1e-3, 1e-5, 0), log_every=1, deadline=time.time() + 8)
    train(cfg, log=lambda s: None)
    rows = list(csv.DictReader(open(tmp_path / "run" / "train.csv")))
    assert len(rows) > 1 and float(rows[-1]["lr"]) < 1e-4  # ran, and decayed towards 1e-5 by the end time
    nothing = TrainConfig(out_dir=str(tmp_path / "run2"), cache_dir=str(cache), crop=64, batch=2, budget_cpu_minutes=0)
    train(nothing, log=lambda s: None)
    assert torch.load(tmp_path / "run2" / "checkpoint.pt", weights_only=False)["step"] == 0


@pytest.mark.parametrize("compile", [False, True])
def test_ddp_two_gloo_processes(scenes, tmp_path, compile):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "pipelines.commands.train", str(tmp_path / "run"), "--scenes", str(scenes),
           "--cache", str(tmp_path / "cache"), "--steps", "2", "--crop", "64", "--batch", "2",
           "--warmup", "1", "--val-count", "0", "-q"] + (["--compile"] if compile else [])
    # train() ends with check_replicas_equal: it raises if the two ranks' weights differ
    subprocess.run(cmd, check=True, cwd=REPO, env=env, capture_output=True, timeout=600)  # compiling takes minutes
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 2


def test_a_non_finite_step_is_skipped_and_leaves_the_weights_alone():
    from lmvic.training.loop import optimisation_step

    w = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.zeros(1))
    opt, aux_opt = torch.optim.Adam([w], lr=0.1), torch.optim.Adam([q], lr=0.1)
    bad = (w * torch.tensor([1.0, float("nan"), 1.0])).sum()
    assert optimisation_step(bad, opt, [w], 1.0, q.sum(), aux_opt) is False
    assert torch.equal(w.detach(), torch.ones(3)) and w.grad is None
    assert optimisation_step((w**2).sum(), opt, [w], 1.0, q.sum(), aux_opt) is True
    assert bool((w.detach() < 1).all())
    # without an aux loss (frozen entropy models): the same skip, one optimiser
    assert optimisation_step((w * float("inf")).sum(), opt, [w], 1.0) is False and w.grad is None
    before = w.detach().clone()
    assert optimisation_step((w**2).sum(), opt, [w], 1.0) is True
    assert bool((w.detach() < before).all())


def test_entropy_models_stay_float32_under_bf16_autocast():
    from lmvic.entropy_models import EntropyBottleneck, GaussianConditional

    torch.manual_seed(0)
    eb, gc = EntropyBottleneck(4).eval(), GaussianConditional(None).eval()
    z, y, s = torch.randn(2, 4, 3, 3) * 3, torch.randn(2, 4, 3, 3) * 5, torch.rand(2, 4, 3, 3) + 0.5
    ref_z, ref_y = eb(z)[1], gc(y, s)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lik_z, lik_y = eb(z.bfloat16())[1], gc(y, s.bfloat16())[1]
        assert torch.matmul(z, z).dtype == torch.bfloat16  # autocast is really on around the calls
    assert lik_z.dtype == lik_y.dtype == torch.float32
    # only the inputs' bf16 rounding differs: a float32 forward on the same rounded values is identical
    assert torch.equal(lik_z, eb(z.bfloat16().float())[1]) and torch.equal(lik_y, gc(y, s.bfloat16().float())[1])
    assert torch.allclose(lik_z.log2(), ref_z.log2(), atol=0.2) and torch.allclose(lik_y.log2(), ref_y.log2(), atol=0.2)


def test_bf16_rd_loss_is_close_to_float32_and_trains(scenes, tmp_path):
    from lmvic.precision import mixed_precision
    from lmvic.training.loop import rd_loss
    from lmvic.zoo import load_single_view

    model = load_single_view().train()
    x = CropSampler([ImageCache(build_cache(scene_images(scenes), tmp_path / "cache", max_side=256, scales=(1.0,)))],
                    128, seed=3).batch(2)
    q = torch.tensor([2.0, 5.0])
    torch.manual_seed(1)
    ref, ref_bpp, ref_mse = rd_loss(model, model, x, q)
    torch.manual_seed(1)  # the same quantisation noise
    with mixed_precision("bf16"):
        loss, bpp, mse = rd_loss(model, model, x, q)
    assert loss.dtype == torch.float32
    assert torch.allclose(bpp, ref_bpp, rtol=0.03) and torch.allclose(mse, ref_mse, rtol=0.1)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError, match="precision"):
        mixed_precision("fp16")


def test_a_fresh_run_starts_from_given_weights(scenes, tmp_path):
    from lmvic.training.loop import initial_state
    from lmvic.zoo import WEIGHTS_DIR, export_checkpoint, load_single_view

    cfg = TrainConfig(out_dir=str(tmp_path / "run"), cache_dir="", init="single_view_cpu")
    state, shipped = initial_state(cfg.init, cfg), load_single_view().state_dict()
    assert all(torch.equal(state[k], shipped[k].float()) for k in shipped)
    cache = build_cache(scene_images(scenes), tmp_path / "cache", max_side=256, scales=(1.0,))
    run = TrainConfig(out_dir=str(tmp_path / "run"), cache_dir=str(cache), crop=64, batch=2, max_steps=1,
                      schedule=Schedule("constant", 1e-12, 1e-12, 0), aux_lr=1e-12, init="single_view_cpu",
                      entropy="qpem", log_every=1)
    trained = train(run, log=lambda s: None).state_dict()  # one step at lr 1e-12: still the shipped weights
    assert max((trained[k] - shipped[k].float()).abs().max().item() for k in shipped if shipped[k].is_floating_point()) < 1e-6
    # its export continues the shipped file's training history with this run
    exported = export_checkpoint(tmp_path / "run" / "checkpoint.pt", "exported", directory=tmp_path)
    history = json.loads(exported.with_suffix(".json").read_text())["training"]
    shipped_history = json.loads((WEIGHTS_DIR / "single_view_cpu.json").read_text())["training"]
    assert history.startswith(shipped_history + "; ") and "lmvic train run, 1 steps of 2 crops of 64 px" in history
    assert "CPU-h per rank x 1 ranks, from single_view_cpu" in history  # one process: one rank
    # a run started from that run's checkpoint continues the same history with both runs
    again = dataclasses.replace(run, out_dir=str(tmp_path / "again"), init=str(tmp_path / "run" / "checkpoint.pt"),
                                started=0.0, init_history="")
    train(again, log=lambda s: None)
    chained = json.loads(export_checkpoint(tmp_path / "again" / "checkpoint.pt", "again", directory=tmp_path)
                         .with_suffix(".json").read_text())["training"]
    assert chained.startswith(history + "; ") and "lmvic train again, 1 steps" in chained
    assert "data: photos at 1 x 256 px" in chained
    with pytest.raises(ValueError, match="λs"):
        initial_state("single_view_cpu", TrainConfig(out_dir="", cache_dir="", lambdas=(0.001, 0.01)))
    with pytest.raises(ValueError, match="do not fit"):  # QPEM weights into a hyperprior-only codec
        train(TrainConfig(out_dir=str(tmp_path / "run2"), cache_dir=str(cache), init="single_view_cpu"), log=lambda s: None)


def test_a_qpem_only_run_trains_nothing_but_the_qpem(scenes, tmp_path):
    """``trainable="qpem"`` from the shipped weights: the QPEM moves; every other tensor, the entropy
    bottleneck's quantiles included, stays as shipped (so models built on them stay valid)."""
    from lmvic.zoo import load_single_view

    shipped = {k: v.float() for k, v in load_single_view().state_dict().items() if k.startswith(("analysis", "synthesis", "hyper", "entropy", "gain", "inverse"))}
    cache = build_cache(scene_images(scenes), tmp_path / "cache", max_side=256, scales=(1.0,))
    run = TrainConfig(out_dir=str(tmp_path / "run"), cache_dir=str(cache), crop=64, batch=2, max_steps=2,
                      schedule=Schedule("constant", 1e-3, 1e-3, 0), init="single_view_cpu", entropy="qpem",
                      trainable="qpem", log_every=1)
    trained = train(run, log=lambda s: None).state_dict()
    assert all(torch.equal(trained[k], v) for k, v in shipped.items())
    assert any(trained[k].abs().max() > 0 for k in trained if k.startswith("qpem.") and k.endswith("linear.weight"))
    with pytest.raises(ValueError, match="QPEM"):
        train(TrainConfig(out_dir=str(tmp_path / "run2"), cache_dir=str(cache), trainable="qpem", max_steps=1),
              log=lambda s: None)


def test_ms_ssim_distortion_matches_pytorch_msssim_and_trains():
    from pytorch_msssim import ms_ssim

    from lmvic.precision import mixed_precision
    from lmvic.training.loop import MS_SSIM_SCALE, distortion

    torch.manual_seed(0)
    x = torch.rand(2, 3, 192, 192)
    x_hat = (x + 0.1 * torch.randn_like(x)).clamp(0, 1).requires_grad_()
    reference = MS_SSIM_SCALE * (1 - ms_ssim(x_hat.detach(), x, data_range=1.0, size_average=False))
    with mixed_precision("bf16"):  # the metric itself stays float32
        d = distortion(x_hat, x, "ms-ssim")
    assert d.dtype == torch.float32 and torch.allclose(d, reference, rtol=1e-4)
    d.sum().backward()
    assert torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0
    assert torch.allclose(distortion(x_hat, x), 255**2 * (x_hat - x).square().flatten(1).mean(1))
    with pytest.raises(ValueError, match="over 160 px"):
        distortion(x[..., :128, :128], x[..., :128, :128], "ms-ssim")
    with pytest.raises(ValueError, match="metric"):
        distortion(x, x, "l1")


def test_resume_takes_the_new_end_time_and_lifts_the_stored_budget() -> None:
    """``lmvic train RUN --resume``: the run's config with the options that may change applied; a new
    --until without --minutes or --steps lifts the stored budgets (as on a fresh run), they set them."""
    from pipelines.cli import build_parser
    from pipelines.commands.train import resumed_config, utc_deadline

    saved = TrainConfig(out_dir="run", cache_dir="cache", budget_cpu_minutes=60.0, deadline=0.0, threads=1,
                        precision="bf16", crop=256, max_steps=500)

    def resumed(*options: str) -> TrainConfig:
        return resumed_config(saved, build_parser().parse_args(["train", "run", "--resume", *options]))

    assert resumed() == saved
    assert resumed("--compile").compile and not resumed("--compile", "--no-compile").compile
    later = resumed("--until", "23:59", "--threads", "2")
    assert later.deadline == utc_deadline("23:59") > 0 and later.budget_cpu_minutes == 0 and later.threads == 2
    assert later.max_steps == 0 and resumed("--steps", "900").max_steps == 900
    assert (later.crop, later.precision) == (256, "bf16")
    capped = resumed("--until", "23:59", "--minutes", "30", "--precision", "fp32")
    assert capped.budget_cpu_minutes == 30 and capped.precision == "fp32"
