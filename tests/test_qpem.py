"""QPEM (lmvic.qpem): exact partition of the latent, zero-init = hyperprior, the anchor, exact coding round trip."""
from __future__ import annotations

import pytest
import torch

import lmvic  # noqa: F401
from compressai.entropy_models import GaussianConditional
from lmvic.qpem import STEPS, QuadtreeEntropyModel, step_masks, toward


@pytest.fixture(autouse=True)
def seeded():
    """Networks are built from the global generator: seed it so every run sees the same weights."""
    torch.manual_seed(0)


@pytest.mark.parametrize("shape", [(8, 6, 10), (12, 5, 7), (4, 1, 1)])
def test_masks_partition_the_latent(shape: tuple[int, int, int]) -> None:
    masks = step_masks(*shape)
    assert masks.shape == (STEPS, *shape)
    assert torch.equal(masks.sum(0), torch.ones(shape, dtype=torch.long))  # each element in exactly one step


def test_each_step_codes_one_position_per_channel_quarter() -> None:
    C, H, W = 8, 4, 6
    masks = step_masks(C, H, W)
    for s in range(STEPS):
        for g in range(4):
            channels = masks[s, 2 * g: 2 * g + 2]  # quarter g = channels 2g, 2g+1
            positions = {(i % 2, j % 2) for i, j in channels[0].nonzero().tolist()}
            assert len(positions) == 1  # one 2×2 position per quarter and step …
            assert torch.equal(channels[0], channels[1])  # … the same for all channels of the quarter
            (i, j), = positions
            assert (2 * i + j - g) % 4 == s
    assert step_masks(8, 4, 4).flatten(1).sum(1).tolist() == [32] * STEPS  # equal-sized steps
    with pytest.raises(ValueError, match="divisible"):
        step_masks(6, 4, 4)


def _gaussian() -> GaussianConditional:
    gc = GaussianConditional(None)
    gc.update_scale_table(torch.exp(torch.linspace(torch.log(torch.tensor(0.11)), torch.log(torch.tensor(256.0)), 64)))
    return gc.eval()


def _inputs(M: int = 8, ctx: int = 4, h: int = 6, w: int = 8):
    gen = torch.Generator().manual_seed(0)
    y = 6 * torch.randn(2, M, h, w, generator=gen)
    scales = torch.rand(2, M, h, w, generator=gen) * 5 + 0.2
    means = torch.randn(2, M, h, w, generator=gen)
    context = torch.randn(2, ctx, h, w, generator=gen)
    return y, scales, means, context


def test_zero_initialised_qpem_is_the_plain_hyperprior() -> None:
    y, scales, means, context = _inputs()
    qpem = QuadtreeEntropyModel(8, context_ch=4)
    gc = _gaussian()
    y_hat, lik = qpem(y, scales, means, gc, context)
    _, expected = gc(y, scales, means=means)
    assert torch.equal(lik, expected)
    assert torch.equal(y_hat, torch.round(y - means) + means)


def _perturb(qpem: QuadtreeEntropyModel) -> None:
    torch.manual_seed(5)
    with torch.no_grad():
        for step in qpem.steps:
            step.net[-1].weight.normal_(0, 0.05)
            step.net[-1].bias.normal_(0, 0.05)


def test_trained_steps_use_earlier_steps_and_context() -> None:
    y, scales, means, context = _inputs()
    qpem = QuadtreeEntropyModel(8, context_ch=4)
    _perturb(qpem)
    gc = _gaussian()
    _, lik = qpem(y, scales, means, gc, context)
    _, lik_other_ctx = qpem(y, scales, means, gc, context + 1)
    masks = step_masks(8, 6, 8)
    assert not torch.equal(lik, lik_other_ctx)
    # step 0 depends on no decoded symbol: changing y elsewhere leaves its likelihoods alone
    y2 = torch.where(masks[0], y, y + 3)
    _, lik2 = qpem(y2, scales, means, gc, context)
    assert torch.equal(lik[:, masks[0]], lik2[:, masks[0]])
    assert not torch.equal(lik[:, masks[3]], lik2[:, masks[3]])


def _anchor(y: torch.Tensor, share: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, weight × prediction) with a prediction of y within 0.3; weights random in [0, 1] or ``share``."""
    gen = torch.Generator().manual_seed(9)
    weight = torch.rand(y.shape, generator=gen) if share is None else torch.full_like(y, share)
    return weight, weight * (y + 0.3 * (2 * torch.rand(y.shape, generator=gen) - 1))


def test_toward_mixes_means_and_prediction() -> None:
    means, prediction = torch.tensor([2.0, -1.0, 4.0]), torch.tensor([0.0, 3.0, 4.0])
    weight = torch.tensor([0.25, 1.0, 0.5])
    assert torch.equal(toward(means, weight, weight * prediction), torch.tensor([1.5, 3.0, 4.0]))
    assert toward(means.double(), weight, weight * prediction).dtype == torch.float64


def test_a_full_anchor_puts_every_steps_means_on_the_prediction() -> None:
    """Weight 1 everywhere: whatever the trained steps say, every element is rounded around the
    prediction, so ŷ = round(y − prediction) + prediction; weight 0 is no anchor at all."""
    y, scales, means, context = _inputs()
    qpem = QuadtreeEntropyModel(8, context_ch=4).requires_grad_(False)
    _perturb(qpem)
    gc = _gaussian()
    weight, prediction = _anchor(y, 1.0)
    y_hat, _ = qpem(y, scales, means, gc, context, (weight, prediction))
    assert torch.equal(y_hat, torch.round(y - prediction) + prediction)
    assert float((y_hat - prediction).abs().max()) == 0.0  # the prediction is within 0.3 of y
    free = qpem(y, scales, means, gc, context)
    for got, expected in zip(qpem(y, scales, means, gc, context, _anchor(y, 0.0)), free):
        assert torch.equal(got, expected)
    assert not torch.equal(qpem(y, scales, means, gc, context, _anchor(y))[1], free[1])


@pytest.mark.parametrize("with_context,anchored", [(True, False), (False, False), (True, True)])
def test_compress_decompress_reproduces_y_hat(with_context: bool, anchored: bool) -> None:
    y, scales, means, context = _inputs()
    qpem = QuadtreeEntropyModel(8, context_ch=4)
    _perturb(qpem)
    gc = _gaussian()
    ctx = context if with_context else None
    anchor = tuple(t.double() for t in _anchor(y)) if anchored else None
    strings, y_hat = qpem.compress(y, scales.double(), means.double(), gc, ctx, anchor)
    assert len(strings) == STEPS and all(len(s) == 2 for s in strings)
    decoded = qpem.decompress(strings, scales.double(), means.double(), gc, ctx, anchor)
    assert decoded.dtype == torch.float64
    assert torch.equal(decoded, y_hat)
    # ŷ is y rounded around the step means: within half a step of y everywhere
    assert float((y_hat - y.double()).abs().max()) <= 0.5 + 1e-9
    if anchored:  # the decoder needs the encoder's anchor
        assert not torch.equal(qpem.decompress(strings, scales.double(), means.double(), gc, ctx), y_hat)
    with pytest.raises(ValueError, match="4 step strings"):
        qpem.decompress(strings[:3], scales.double(), means.double(), gc, ctx, anchor)


def test_likelihood_bits_match_the_coded_bytes() -> None:
    """Symbols drawn from in-range Gaussians: −Σlog2 p within 2 % of the range coder's bytes."""
    gen = torch.Generator().manual_seed(3)
    M, h, w = 16, 32, 32
    scales = torch.exp(torch.rand(1, M, h, w, generator=gen) * 3.5 - 0.5)  # 0.6 … 20
    means = torch.randn(1, M, h, w, generator=gen) * 3
    context = torch.randn(1, 4, h, w, generator=gen)
    qpem = QuadtreeEntropyModel(M, context_ch=4)
    _perturb(qpem)
    gc = _gaussian()
    y = means + scales * torch.randn(1, M, h, w, generator=gen)
    with torch.no_grad():
        _, lik = qpem(y, scales, means, gc, context)
    estimate = -float(lik.log2().sum()) / 8
    strings, _ = qpem.compress(y, scales.double(), means.double(), gc, context)
    actual = sum(len(s[0]) for s in strings)
    assert estimate > 5000
    assert abs(actual - estimate) / estimate < 0.02, (actual, estimate)
    print(f"QPEM bits check: estimate {estimate:.0f} B, coded {actual} B")


def test_without_context_is_the_zero_context_qpem() -> None:
    """A QPEM whose context inputs are cut off computes, step by step, what the original computes
    with a zero context (how the single-view codec inherits the joint codec's reference-off QPEM)."""
    from lmvic.qpem import without_context

    y, scales, means, context = _inputs()
    with_ctx = QuadtreeEntropyModel(8, context_ch=4)
    _perturb(with_ctx)
    plain = QuadtreeEntropyModel(8)
    plain.load_state_dict(without_context(with_ctx.state_dict(), 8))
    decoded = torch.randn_like(y)
    for s in range(STEPS):
        a = with_ctx.steps[s](scales, means, decoded, torch.zeros_like(context))
        b = plain.steps[s](scales, means, decoded, None)
        assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)
    # with a non-zero context the two differ: the cut columns did carry weight
    assert not torch.allclose(with_ctx.steps[0](scales, means, decoded, context)[0], plain.steps[0](scales, means, decoded, None)[0])


def test_with_context_of_keeps_the_plain_function_and_the_context_columns() -> None:
    from lmvic.qpem import with_context_of, without_context

    y, scales, means, context = _inputs()
    conditioned, plain = QuadtreeEntropyModel(8, context_ch=4), QuadtreeEntropyModel(8)
    _perturb(conditioned)
    torch.manual_seed(9)
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.05)
    merged = QuadtreeEntropyModel(8, context_ch=4)
    merged.load_state_dict(with_context_of(plain.state_dict(), conditioned.state_dict(), 8))
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in without_context(merged.state_dict(), 8).items())
    first = merged.steps[1].net[0].weight
    assert torch.equal(first[:, 24:], conditioned.steps[1].net[0].weight[:, 24:])
    decoded = torch.randn_like(y)
    a = merged.steps[3](scales, means, decoded, torch.zeros_like(context))
    b = plain.steps[3](scales, means, decoded, None)
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)
