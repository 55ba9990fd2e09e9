"""Distributed codec (lmvic.models.distributed): shapes, round trips, subsets, another process."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lmvic  # noqa: F401
from lmvic.bitstream import LatentStream, SceneHeader, ViewInfo, write_scene
from lmvic.models.distributed import build_distributed
from lmvic.exact import fixed_threads

QUALITY = 3.0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on the shared 2-core machine two threads are ~10× slower under load."""
    with fixed_threads(1):
        yield


def untrained(fusion: str = "pmifm", feature_fusions: int = 1):
    """A fresh codec whose fusions are not the identity (their merge starts at zero: see below)."""
    torch.manual_seed(0)
    model = build_distributed("cpu", fusion, feature_fusions)
    for f in model.fusions:
        torch.nn.init.normal_(f.merge[-1].weight, std=0.05)
    return model


@pytest.fixture(scope="module")
def codec():
    model = untrained().eval()
    model.update(force=True)
    return model


def test_fresh_fusion_is_the_identity() -> None:
    """Staged training starts from the single-view decoder: a fresh fusion changes nothing."""
    torch.manual_seed(3)
    model = build_distributed("cpu", "pmifm", feature_fusions=2).eval()
    x = torch.rand(1, 3, 3, 64, 64)
    with torch.no_grad():
        fused = model(x, 2.0)["x_hat"]
        single = model.backbone(x[0], 2.0)["x_hat"]
    torch.testing.assert_close(fused[0], single, atol=0, rtol=0)


@pytest.fixture(scope="module")
def views() -> torch.Tensor:
    """Three 64×64 views of one pattern seen with horizontal offsets: (1, 3, 3, 64, 64)."""
    gen = torch.Generator().manual_seed(1)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 40, generator=gen), size=(64, 160),
                                           mode="bilinear", align_corners=False)
    return torch.stack([base[..., 8 * v: 8 * v + 64] for v in range(3)], dim=1)


@pytest.mark.parametrize("fusion", ["pmifm", "average"])
def test_forward_shapes_and_gradients(fusion: str) -> None:
    model = untrained(fusion, feature_fusions=2)
    x = torch.rand(2, 2, 3, 64, 64)
    out = model(x, torch.tensor([1.0, 4.5]))
    assert out["x_hat"].shape == x.shape
    assert out["likelihoods"]["y"].shape == (4, model.backbone.M, 4, 4)
    assert out["likelihoods"]["z"].shape[:2] == (4, model.backbone.N)
    out["x_hat"].square().mean().backward()
    for module in (model.fusions[0], model.fusions[2], model.backbone.analysis[0]):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert model.aux_loss().ndim == 0


def test_invalid_configurations() -> None:
    with pytest.raises(ValueError, match="unknown fusion"):
        build_distributed("cpu", "max")
    with pytest.raises(ValueError, match="feature_fusions"):
        build_distributed("cpu", "pmifm", feature_fusions=4)
    model = build_distributed("cpu", "pmifm", feature_fusions=1)
    with pytest.raises(ValueError, match="index of a fusion"):
        model.synthesise_views(torch.zeros(1, 2, model.backbone.M, 4, 4), stop=2)


def _streams(codec, views: torch.Tensor) -> list[tuple]:
    """Each view compressed alone (the encoder sees one image and nothing else)."""
    coded = [codec.compress(views[:, v], QUALITY) for v in range(views.shape[1])]
    return [(c["strings"], c["shape"]) for c in coded]


def test_round_trip_equals_forward_for_any_subset(codec, views: torch.Tensor) -> None:
    streams = _streams(codec, views)
    for subset in ([0, 1, 2], [0, 2], [1]):
        decoded = codec.decompress([streams[v] for v in subset], QUALITY)["x_hat"]
        with torch.no_grad():
            expected = codec(views[:, subset], QUALITY)["x_hat"].clamp(0, 1)
        assert decoded.shape == (1, len(subset), 3, 64, 64)
        torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=0)
    # the other views change what a view decodes to (they are its side information)
    alone = codec.decompress([streams[0]], QUALITY)["x_hat"][:, 0]
    together = codec.decompress(streams, QUALITY)["x_hat"][:, 0]
    assert (alone - together).abs().max() > 1e-6
    with pytest.raises(ValueError, match="same size"):
        small = codec.compress(torch.rand(1, 3, 128, 64), QUALITY)
        codec.decompress([streams[0], (small["strings"], small["shape"])], QUALITY)


def test_side_views_restrict_what_each_view_is_fused_with(codec, views: torch.Tensor) -> None:
    """sides=[[1], [0], []]: views 0 and 1 decode as the pair (0, 1) alone, view 2 as if alone."""
    streams = _streams(codec, views)
    chosen = codec.decompress(streams, QUALITY, sides=[[1], [0], []])["x_hat"][0]
    pair = codec.decompress(streams[:2], QUALITY)["x_hat"][0]
    alone = codec.decompress(streams[2:], QUALITY)["x_hat"][0]
    assert torch.equal(chosen[:2], pair) and torch.equal(chosen[2:], alone)
    with pytest.raises(ValueError, match="own side view"):
        codec.decompress(streams, QUALITY, sides=[[0], [0], [1]])


DECODER = r"""
import sys, torch
import lmvic
from lmvic.bitstream import read_scene
from lmvic.models.distributed import build_distributed
from lmvic.exact import fixed_threads
model = build_distributed("cpu", "pmifm").eval()
model.load_state_dict(torch.load(sys.argv[1], weights_only=True))
model.update(force=True)
header, records = read_scene(sys.argv[2], models={"distributed-cpu-pmifm"})
streams = [([list(r["image.y"].chunks), list(r["image.z"].chunks)], r["image.z"].shape) for r in records]
torch.save(model.decompress(streams, float(header.quality))["x_hat"], sys.argv[3])
"""


def test_another_process_decodes_bit_exactly(codec, views: torch.Tensor, tmp_path: Path) -> None:
    streams = _streams(codec, views)
    records = [{"image.y": LatentStream(tuple(strings[0]), tuple(shape)),
                "image.z": LatentStream(tuple(strings[1]), tuple(shape))} for strings, shape in streams]
    infos = tuple(ViewInfo(f"v{v}", 64, 64, np.eye(3), np.eye(4)) for v in range(3))
    header = SceneHeader("distributed", "distributed-cpu-pmifm", int(QUALITY), infos, (0, 1, 2),
                         ((1, 2), (0, 2), (0, 1)))
    write_scene(tmp_path / "scene.lmv", header, records)
    torch.save(codec.state_dict(), tmp_path / "model.pt")
    subprocess.run([sys.executable, "-c", DECODER, str(tmp_path / "model.pt"), str(tmp_path / "scene.lmv"),
                    str(tmp_path / "x_hat.pt")], check=True, timeout=300, capture_output=True)
    other = torch.load(tmp_path / "x_hat.pt", weights_only=True)
    assert torch.equal(other, codec.decompress(streams, QUALITY)["x_hat"])


def test_align_side_image_shapes(codec, views: torch.Tensor) -> None:
    """The codec's OPAM applied to pixels: shapes and a validity in [0, 1] (weights untrained)."""
    for index, block in ((0, 16), (1, 8)):
        aligned, validity = codec.align_side_image(views[:, 0], views[:, 1], QUALITY, fusion_index=index)
        assert aligned.shape == (1, 3, 64, 64) and validity.shape == (1, 1, 64, 64)
        assert 0.0 <= float(validity.min()) and float(validity.max()) <= 1.0 + 1e-6
        # attention rows are convex weights: aligned pixels stay within the side image's range; the
        # validity is constant over each block
        assert float(aligned.min()) >= float(views[:, 1].min()) - 1e-5
        assert float(aligned.max()) <= float(views[:, 1].max()) + 1e-5
        assert torch.equal(validity[..., ::block, ::block].repeat_interleave(block, -1).repeat_interleave(block, -2),
                           validity)
    with pytest.raises(ValueError, match="fusion_index"):
        codec.align_side_image(views[:, 0], views[:, 1], QUALITY, fusion_index=2)


def test_distributed_training_warm_up_rd_resume_and_export(tmp_path: Path) -> None:
    """Step 1 (alignment warm-up) moves only OPAM; step 2 (RD + alignment, bf16) also the merge; the rows
    are finite, resuming continues, and the exported weights load as a distributed codec."""
    from dataclasses import replace

    import shutil

    from lmvic.distributed_training import DistributedTrainConfig, build_models, export_checkpoint, train_distributed
    from lmvic.models.distributed import load_distributed
    from lmvic.zoo import WEIGHTS_DIR
    from scenes.synthetic import ArcCameras, generate

    scene = generate(tmp_path / "scene", ArcCameras(n_views=3, width=128, height=128, arc_degrees=20.0), seed=1)
    cfg = DistributedTrainConfig(str(tmp_path / "run"), (str(scene),), cache_dir=str(tmp_path / "cache"),
                                 fusions=("pmifm",), crop=64, batch=1, steps=1, views=(2, 3), align_warmup_steps=1,
                                 align_pairs=1, max_shift=(16, 32), log_every=1, val_every=100,
                                 val_qualities=(3,))

    def state(models) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in models["pmifm"].fusions.state_dict().items()}

    start = state(build_models(cfg))
    warm = state(train_distributed(cfg, log=lambda _: None))
    changed = {k for k in warm if not torch.equal(warm[k], start[k])}
    assert changed and all(".opam." in f".{k}" for k in changed)
    # the second step runs under bf16 autocast (lmvic.precision): still finite, still training the merge
    trained = state(train_distributed(replace(cfg, steps=2, precision="bf16"), resume=True, log=lambda _: None))
    assert any(not torch.equal(trained[k], warm[k]) for k in trained if "merge" in k)
    rows = (tmp_path / "run" / "train.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 3 and np.isfinite(float(rows[2].split(",")[header.index("loss_pmifm")]))
    assert all(np.isfinite(float(r.split(",")[header.index("align_pmifm")])) for r in rows[1:])
    val = (tmp_path / "run" / "val.csv").read_text().splitlines()
    assert {"consistency_pmifm", "shift_error_px_pmifm"} <= set(val[0].split(","))
    (tmp_path / "weights").mkdir()
    for suffix in (".pt", ".json"):  # the base the exported weights refer to
        shutil.copy(WEIGHTS_DIR / f"{cfg.base}{suffix}", tmp_path / "weights")
    (path,) = export_checkpoint(tmp_path / "run", tmp_path / "weights")
    shipped = load_distributed(path.stem, tmp_path / "weights")
    for k, v in shipped.fusions.state_dict().items():
        torch.testing.assert_close(v, trained[k], atol=1e-2, rtol=1e-2)  # float16 storage
    # a run from those weights, exported over them: its history continues theirs (read when it started)
    first = json.loads(path.with_suffix(".json").read_text())["training"]
    assert "train-distributed run on" in first and first.endswith("from fresh fusions")
    train_distributed(replace(cfg, out_dir=str(tmp_path / "run2"), init_weights=str(tmp_path / "weights")),
                      log=lambda _: None)
    (again,) = export_checkpoint(tmp_path / "run2", tmp_path / "weights")
    history = json.loads(again.with_suffix(".json").read_text())["training"]
    assert history.startswith(first + "; ") and "train-distributed run2 on" in history


def test_fixed_opam_temperature_is_set_and_not_trained(tmp_path: Path) -> None:
    """``opam_temperature > 0``: every OPAM takes that temperature, and an optimiser step moves its
    projections but not the temperature (it is not in the optimiser's groups)."""
    import math

    from lmvic.distributed_training import DistributedTrainConfig, build_models, optimiser

    cfg = DistributedTrainConfig(str(tmp_path), (), fusions=("pmifm",), opam_temperature=16.0)
    codec = build_models(cfg)["pmifm"]
    opt = optimiser(codec, cfg)
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    for fusion in codec.fusions:
        torch.testing.assert_close(fusion.opam.log_temperature, torch.full((2,), math.log(16.0)))
        assert id(fusion.opam.log_temperature) not in in_groups
    opam = codec.fusions[-1].opam
    before = {n: p.clone() for n, p in opam.named_parameters()}
    feats = torch.randn(2, 1, opam.project_hor.branches[0][0].in_channels, 8, 8)
    opam(feats[0], feats[1]).aligned.square().mean().backward()
    opt.step()
    moved = {n for n, p in opam.named_parameters() if not torch.equal(p, before[n])}
    assert moved and "log_temperature" not in moved
