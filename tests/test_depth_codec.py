"""Depth codec (lmvic.models.depth_codec): normalisation, CVDP by hand, DCI, shapes, exact coding."""
from __future__ import annotations

import pytest
import torch

import lmvic  # noqa: F401
from lmvic.models.depth_codec import DepthRange, build_depth_codec, cross_view_prediction
from lmvic.exact import fixed_threads


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with fixed_threads(1):
        yield


def test_normalisation_is_scaled_inverse_depth() -> None:
    rng = DepthRange(1.0, 4.0)
    depth = torch.tensor([[[1.0, 2.0, 4.0, 0.0, float("nan"), 8.0]]])
    code = rng.normalise(depth)
    # (1/D − 1/4) / (1 − 1/4): near → 1, far → 0, invalid → 0 (far), beyond far clamped to 0
    assert torch.allclose(code[0, 0, 0], torch.tensor([1.0, 1 / 3, 0.0, 0.0, 0.0, 0.0]))
    back = rng.denormalise(code)
    assert torch.allclose(back[0, 0, :3], depth[0, 0, :3])
    assert torch.allclose(back[0, 0, 3:], torch.full((3,), 4.0))  # decoded depth is always valid
    assert DepthRange.of(depth) == DepthRange(1.0, 8.0)
    with pytest.raises(ValueError):
        DepthRange(2.0, 1.0)
    # per-sample ranges (training batches from several scenes) = each scene's own normalisation
    batch = DepthRange(torch.tensor([1.0, 2.0]), torch.tensor([4.0, 8.0]))
    both = batch.normalise(depth.expand(2, -1, -1))
    assert torch.equal(both[1:], DepthRange(2.0, 8.0).normalise(depth))
    assert torch.allclose(batch.denormalise(both)[0], rng.denormalise(code)[0])
    with pytest.raises(ValueError):
        DepthRange(torch.tensor([1.0, 2.0]), torch.tensor([4.0, 2.0]))
    with pytest.raises(ValueError, match="no valid depth"):
        DepthRange.of(torch.zeros(3, 3))


def test_cvdp_hand_computed_translation() -> None:
    """Target camera 1 unit to the right of the reference; f = 4, depth 2 → shift of −f·b/Z = −2 px.

    Reference row depths [2,2,2,2,2,1,2,2]: column u lands at floor(u + 0.5 − 4/Z). Column 5 (Z = 1)
    moves by 4 to column 1, where column 3 (Z = 2) also lands: the z-buffer keeps 1. Nobody lands
    on columns 3, 6 and 7; columns 0 and 1 of the reference fall outside.
    """
    f, W, H = 4.0, 8, 2
    K = torch.tensor([[[f, 0.0, W / 2], [0.0, f, H / 2], [0.0, 0.0, 1.0]]])
    T_ref = torch.eye(4)[None]
    T_tgt = torch.eye(4)[None]
    T_tgt[0, 0, 3] = -1.0  # camera centre at x = +1 (world-to-camera translation −1)
    row = torch.tensor([2.0, 2, 2, 2, 2, 1, 2, 2])
    ref_depth = row.expand(H, W)[None]
    rng = DepthRange(1.0, 2.0)
    prediction, hit = cross_view_prediction(ref_depth, K, T_ref, K, T_tgt, (H, W), rng)
    expected_depth = torch.tensor([2.0, 1, 2, 0, 2, 2, 0, 0])
    expected_hit = torch.tensor([1.0, 1, 1, 0, 1, 1, 0, 0])
    assert hit.shape == prediction.shape == (1, 1, H, W)
    assert torch.equal(hit[0, 0], expected_hit.expand(H, W))
    assert torch.allclose(prediction[0, 0], rng.normalise(expected_depth.expand(H, W)[None])[0, 0])


def _side(codec, batch=1, size=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.rand(batch, 1, size, size, generator=gen)
    hit = (torch.rand(batch, 1, size, size, generator=gen) > 0.3).float()
    return codec.prediction_side(pred * hit, hit)


def test_shapes_and_zero_initialised_dci() -> None:
    torch.manual_seed(0)
    codec = build_depth_codec("cpu").eval()
    x = torch.rand(2, 1, 64, 64)
    side = _side(codec, batch=2)
    out = codec(x, torch.tensor([1.0, 5.0]), side)
    assert out["x_hat"].shape == x.shape
    assert [f.shape[-1] for f in out["features"]] == [8, 16, 32]
    assert out["likelihoods"]["y"].shape == (2, codec.backbone.M, 4, 4)
    alone = codec(x, torch.tensor([1.0, 5.0]))
    assert torch.equal(out["x_hat"], alone["x_hat"])  # untrained DCI and QPEM context: exactly the backbone
    with torch.no_grad():
        codec.dec_fusions[2].conv.weight.normal_(0, 0.1)
    assert not torch.equal(codec(x, torch.tensor([1.0, 5.0]), side)["x_hat"], alone["x_hat"])


def test_gradients_reach_the_prediction_path() -> None:
    torch.manual_seed(1)
    codec = build_depth_codec("cpu")
    with torch.no_grad():
        for m in list(codec.enc_fusions) + list(codec.dec_fusions):
            m.conv.weight.normal_(0, 0.05)
    out = codec(torch.rand(1, 1, 64, 64), 3.0, _side(codec))
    out["x_hat"].square().mean().backward()
    for module in (codec.prediction_features, codec.mask_features):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_coding_round_trip_with_prediction() -> None:
    torch.manual_seed(2)
    codec = build_depth_codec("cpu").eval()
    with torch.no_grad():
        for m in list(codec.enc_fusions) + list(codec.dec_fusions):
            m.conv.weight.normal_(0, 0.05)
    codec.update(force=True)
    side = _side(codec)
    x = torch.rand(1, 1, 64, 64)
    strings, shape, y_hat = codec.encode(x, 4, side)
    assert shape == (1, 1) and len(strings) == 5
    assert torch.equal(codec.decode_latent(strings, shape, 4, side), y_hat)
    assert codec.reconstruct(y_hat, 4, side)[-1].shape == x.shape
    with pytest.raises(ValueError, match="multiples of 64"):
        codec.encode(torch.rand(1, 1, 48, 64), 4, side)
