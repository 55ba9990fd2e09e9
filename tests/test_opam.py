"""OPAM (lmvic.opam) and multi-view fusion (lmvic.fusion) against closed-form cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

import lmvic  # noqa: F401  (torchvision shim before anything imports compressai)
from lmvic.fusion import AverageFusion, ParallaxFusion
from lmvic.exact import fixed_threads
from lmvic.opam import (OPAM, align_image, apply_opam, column_attention, correspondence_error,
                        known_shift_sharpness_loss, normalised, omni_parallax_attention, photometric_alignment_loss,
                        row_attention, shift_attention_loss, shift_targets)

IDENTITY = nn.Identity()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on the shared 2-core machine two threads are ~10× slower under load."""
    with fixed_threads(1):
        yield


def shifted_code_pair(height: int, width: int, dy: int, dx: int, channels: int = 32,
                      seed: int = 0) -> tuple[Tensor, Tensor]:
    """A main feature and a side feature equal to it moved by ``(dy, dx)`` (down, right).

    Position ``(g, i)`` holds ``[a_i ; r_g]``: a random ±1 code of its column and one of its row,
    so ``main(g, i)·side(g', j)`` is ``a_i·a_{j-dx} + r_g·r_{g'-dy}`` — within a row it peaks at
    ``j = i + dx`` (the row term is constant), within a column at ``g' = g + dy``. New codes enter
    at the border. Returns two ``[1, 2·channels, H, W]`` tensors.
    """
    gen = torch.Generator().manual_seed(seed)
    margin = max(abs(dy), abs(dx))
    cols = torch.randint(0, 2, (channels, width + 2 * margin), generator=gen).float() * 2 - 1
    rows = torch.randint(0, 2, (channels, height + 2 * margin), generator=gen).float() * 2 - 1

    def grid(row_offset: int, col_offset: int) -> Tensor:
        c = cols[:, margin + col_offset: margin + col_offset + width]
        r = rows[:, margin + row_offset: margin + row_offset + height]
        return torch.cat([c[:, None, :].expand(-1, height, -1), r[:, :, None].expand(-1, -1, width)])[None]

    return grid(0, 0), grid(-dy, -dx)


def interior(height: int, width: int, dy: int, dx: int) -> tuple[slice, slice]:
    """Main positions whose match ``(g + dy, i + dx)`` lies inside the side view."""
    return slice(max(0, -dy), height - max(0, dy)), slice(max(0, -dx), width - max(0, dx))


@pytest.mark.parametrize("attention", [row_attention, column_attention])
@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_cycle_consistency_at_most_one(attention, scale: float) -> None:
    """Lemma 1 and 2: 0 ≤ C ≤ 1 for arbitrary queries and keys."""
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(3, 8, 7, 9, generator=gen) * scale for _ in range(2))
    out = attention(q, k, k)
    assert out.consistency.shape == (3, 1, 7, 9)
    assert float(out.consistency.min()) >= 0.0
    assert float(out.consistency.max()) <= 1.0 + 1e-6
    # the attention rows are distributions
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(out.attention.shape[:-1]))


def test_opam_module_consistency_at_most_one() -> None:
    torch.manual_seed(2)
    with torch.no_grad():
        out = OPAM(16)(torch.randn(2, 16, 12, 10) * 5, torch.randn(2, 16, 12, 10) * 5)
    assert out.aligned.shape == (2, 16, 12, 10) and out.consistency.shape == (2, 1, 12, 10)
    assert 0.0 <= float(out.consistency.min()) and float(out.consistency.max()) <= 1.0 + 1e-6


@pytest.mark.parametrize("dx", [3, -5])
def test_horizontal_shift_recovered_by_hpa(dx: int) -> None:
    h, w = 10, 24
    main, side = shifted_code_pair(h, w, 0, dx)
    out = row_attention(main, side, side)
    rows, cols = interior(h, w, 0, dx)
    peaks = out.attention.argmax(-1).reshape(h, w)  # [H, W] column of the side each position takes
    expected = torch.arange(w)[cols] + dx
    assert torch.equal(peaks[:, cols], expected.expand(h, -1))
    torch.testing.assert_close(out.aligned[..., cols], main[..., cols], atol=1e-4, rtol=0)
    assert float(out.consistency[..., cols].min()) > 0.99


@pytest.mark.parametrize("dy,dx", [(4, 0), (-3, 0), (2, -3)])
def test_vertical_shift_recovered_by_vpa_after_hpa(dy: int, dx: int) -> None:
    h, w = 20, 16
    main, side = shifted_code_pair(h, w, dy, dx)
    out = omni_parallax_attention(main, side, IDENTITY, IDENTITY)
    rows, cols = interior(h, w, dy, dx)
    peaks = out.vertical.attention.argmax(-1).reshape(w, h).T  # [H, W] row each position takes
    expected = torch.arange(h)[rows] + dy
    assert torch.equal(peaks[rows, cols], expected[:, None].expand(-1, peaks[rows, cols].shape[1]))
    torch.testing.assert_close(out.aligned[..., rows, cols], main[..., rows, cols], atol=1e-4, rtol=0)
    assert float(out.consistency[..., rows, cols].min()) > 0.99
    # without the vertical stage the vertical shift is not undone
    if dy:
        assert (out.horizontal.aligned[..., rows, cols] - main[..., rows, cols]).abs().max() > 0.5


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_two_stage_matches_reference_and_explicit_double_sum() -> None:
    """Eq. 21–24 on a small case, against a per-row/per-column NumPy reference (float64)."""
    gen = torch.Generator().manual_seed(3)
    b, c, h, w = 2, 3, 4, 5
    main = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    side = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    out = omni_parallax_attention(main, side, lambda x: 0.7 * x, lambda x: 1.3 * x)

    fu, fv = main.numpy(), side.numpy()
    m_hor = np.zeros((b * h, w, w))
    c_hor = np.zeros((b, h, w))
    f_hor = np.zeros((b, c, h, w))
    for bi in range(b):
        for g in range(h):
            s = (0.7 * fu[bi, :, g, :]).T @ (0.7 * fv[bi, :, g, :])  # [W(main), W(side)]
            a, a_back = _softmax(s), _softmax(s.T)
            m_hor[bi * h + g] = a
            c_hor[bi, g] = np.einsum("ij,ji->i", a, a_back)
            f_hor[bi, :, g, :] = (a @ fv[bi, :, g, :].T).T
    m_ver = np.zeros((b * w, h, h))
    c_ver = np.zeros((b, h, w))
    f_ver = np.zeros((b, c, h, w))
    for bi in range(b):
        for g in range(w):
            s = (1.3 * fu[bi, :, :, g]).T @ (1.3 * f_hor[bi, :, :, g])  # [H(main), H(aligned)]
            a, a_back = _softmax(s), _softmax(s.T)
            m_ver[bi * w + g] = a
            c_ver[bi, :, g] = np.einsum("ij,ji->i", a, a_back)
            f_ver[bi, :, :, g] = (a @ f_hor[bi, :, :, g].T).T
    np.testing.assert_allclose(out.horizontal.attention.numpy(), m_hor, atol=1e-12)
    np.testing.assert_allclose(out.vertical.attention.numpy(), m_ver, atol=1e-12)
    np.testing.assert_allclose(out.aligned.numpy(), f_ver, atol=1e-12)
    np.testing.assert_allclose(out.consistency.numpy()[:, 0], c_hor * c_ver, atol=1e-12)

    # Eq. 24: f_ver[b, k, i, j] = Σ_g Σ_s M_ver[bW + j, i, g] M_hor[bH + g, j, s] f_r[b, k, g, s]
    double_sum = np.zeros((b, c, h, w))
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                for g in range(h):
                    for s_ in range(w):
                        double_sum[bi, :, i, j] += (m_ver[bi * w + j, i, g] * m_hor[bi * h + g, j, s_]
                                                    * fv[bi, :, g, s_])
    np.testing.assert_allclose(out.aligned.numpy(), double_sum, atol=1e-12)


def test_align_image_moves_pixel_blocks() -> None:
    """Features at 1/4 of the image, side image moved by (dy, dx) feature cells = 4× pixels."""
    h, w, dy, dx, s = 12, 14, 2, -3, 4
    main_f, side_f = shifted_code_pair(h, w, dy, dx, seed=5)
    out = omni_parallax_attention(main_f, side_f, IDENTITY, IDENTITY)
    image = torch.rand(1, 3, s * (h + 2 * 3), s * (w + 2 * 3), generator=torch.Generator().manual_seed(6))
    main_img = image[..., 3 * s: (3 + h) * s, 3 * s: (3 + w) * s]
    side_img = image[..., (3 - dy) * s: (3 - dy + h) * s, (3 - dx) * s: (3 - dx + w) * s]
    aligned, validity = align_image(out, side_img)
    assert aligned.shape == main_img.shape and validity.shape == (1, 1, s * h, s * w)
    rows, cols = interior(h, w, dy, dx)
    pr, pc = slice(rows.start * s, rows.stop * s), slice(cols.start * s, cols.stop * s)
    torch.testing.assert_close(aligned[..., pr, pc], main_img[..., pr, pc], atol=1e-4, rtol=0)
    assert float(validity[..., pr, pc].min()) > 0.99
    with pytest.raises(ValueError):
        align_image(out, side_img[..., :-1])


def test_normalised_projection_is_a_temperature_times_a_centred_unit_vector() -> None:
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 6, 5, 7, generator=gen) + 3.0  # an offset common to all positions is removed
    out = normalised(IDENTITY, torch.tensor(np.log(5.0)), x)
    centred = x - x.mean(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(out, 5.0 * centred / centred.norm(dim=1, keepdim=True))
    torch.testing.assert_close(normalised(IDENTITY, torch.tensor(np.log(5.0)), 4.0 * x - 1.0), out)


def test_opam_weights_without_temperature_load_with_the_initial_one() -> None:
    torch.manual_seed(14)
    state = OPAM(8, temperature=7.0).state_dict()
    del state["log_temperature"]
    model = OPAM(8, temperature=7.0)
    with torch.no_grad():
        model.log_temperature.zero_()
    model.load_state_dict(state)
    torch.testing.assert_close(model.log_temperature.exp(), torch.tensor([7.0, 7.0]))


def test_shift_targets_split_fractional_matches() -> None:
    target, valid = shift_targets(5, torch.tensor([2.0, -1.5]), stride=1)
    torch.testing.assert_close(target[0], torch.diag(torch.ones(3), 2)[:5, :5] * valid[0, :, None])
    assert valid[0].tolist() == [True, True, True, False, False]
    assert valid[1].tolist() == [False, False, True, True, True]
    torch.testing.assert_close(target[1, 3], torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0]))
    # 6 px at 4 px per position: position i takes i + 1.5
    target, valid = shift_targets(4, torch.tensor([6.0]), stride=4)
    torch.testing.assert_close(target[0, 1], torch.tensor([0.0, 0.0, 0.5, 0.5]))
    assert valid[0].tolist() == [True, True, False, False]
    torch.testing.assert_close(target.sum(-1), valid.float())


@pytest.mark.parametrize("dy,dx", [(2, -3), (0, 4), (-3, 0)])
def test_shift_attention_loss_vanishes_only_at_the_true_shift(dy: int, dx: int) -> None:
    h, w = 12, 14
    main, side = shifted_code_pair(h, w, dy, dx)
    out = omni_parallax_attention(2 * main, 2 * side, IDENTITY, IDENTITY)  # ×2: sharper attention
    loss = {o: float(shift_attention_loss(out, torch.tensor([o], dtype=torch.float32), 1))
            for o in [(dy, dx), (dy, dx + 1), (dy + 1, dx), (0, 0)]}
    assert loss[(dy, dx)] < 1e-3
    assert min(v for o, v in loss.items() if o != (dy, dx)) > 5.0
    # the same shift seen on images 4× larger (4 px per feature position)
    torch.testing.assert_close(shift_attention_loss(out, torch.tensor([[4.0 * dy, 4.0 * dx]]), 4),
                               torch.tensor(loss[(dy, dx)]))


def test_known_shift_sharpness_loss_closed_form() -> None:
    """A sharp attention on the true shift: mean correspondence on the match, C ≈ 1, loss ≈ 0 (at any
    pixel stride); uniform attention (zero features): every mean correspondence is the window centre
    and C = 1/(H·W), so the loss is the mean distance of the centre to the matches plus log(H·W)."""
    h, w, dy, dx, s = 8, 10, 2, -3, 4
    offset = torch.tensor([[float(s * dy), float(s * dx)]])
    rows, cols = interior(h, w, dy, dx)
    expected_inside = torch.zeros(1, h, w, dtype=torch.bool)
    expected_inside[0, rows, cols] = True
    main_f, side_f = shifted_code_pair(h, w, dy, dx, seed=5)
    sharp = omni_parallax_attention(2 * main_f, 2 * side_f, IDENTITY, IDENTITY)
    distance, inside = correspondence_error(sharp, offset, s)
    assert torch.equal(inside, expected_inside)
    assert float(distance[inside].max()) < 1e-2
    assert float(known_shift_sharpness_loss(sharp, offset, s)) < 2e-2

    uniform = omni_parallax_attention(torch.zeros(1, 4, h, w), torch.zeros(1, 4, h, w), IDENTITY, IDENTITY)
    g, i = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    centre = torch.hypot((h - 1) / 2 - (g + dy), (w - 1) / 2 - (i + dx))[expected_inside[0]]
    distance, _ = correspondence_error(uniform, offset, s)
    torch.testing.assert_close(distance[expected_inside], centre, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(known_shift_sharpness_loss(uniform, offset, s),
                               centre.mean() + torch.tensor(float(np.log(h * w))), atol=1e-3, rtol=1e-4)


def test_photometric_alignment_loss_closed_form() -> None:
    """Aligned pair: the error is ~0 where C ≈ 1, so the loss is τ × the unaligned share; uniform
    attention (zero features): C = 1/(H·W) exactly and the loss is C·e + τ(1 − C) with e the error
    of the side image's block-mean average."""
    h, w, dy, dx, s, tau = 8, 10, 1, -2, 4, 0.1
    main_f, side_f = shifted_code_pair(h, w, dy, dx, seed=11)
    out = omni_parallax_attention(2 * main_f, 2 * side_f, IDENTITY, IDENTITY)
    image = torch.rand(1, 3, s * (h + 4), s * (w + 4), generator=torch.Generator().manual_seed(12))
    main_img = image[..., 2 * s: (2 + h) * s, 2 * s: (2 + w) * s]
    side_img = image[..., (2 - dy) * s: (2 - dy + h) * s, (2 - dx) * s: (2 - dx + w) * s]
    rows, cols = interior(h, w, dy, dx)
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[rows, cols] = True
    c = out.consistency[0, 0]
    assert float(c[inside].min()) > 0.99
    loss = photometric_alignment_loss(out, main_img, side_img, tau)
    main_blocks, side_blocks = (torch.nn.functional.avg_pool2d(v, s) for v in (main_img, side_img))
    error = (apply_opam(out, side_blocks) - main_blocks).abs().mean(1)[0]
    torch.testing.assert_close(loss, (c * error + tau * (1 - c)).mean())
    assert float(error[inside].max()) < 1e-4

    zero = omni_parallax_attention(torch.zeros(1, 4, h, w), torch.zeros(1, 4, h, w), IDENTITY, IDENTITY)
    torch.testing.assert_close(zero.consistency, torch.full((1, 1, h, w), 1 / (h * w)))
    mean_error = (side_blocks.mean((-2, -1), keepdim=True) - main_blocks).abs().mean(1)
    expected = (mean_error / (h * w) + tau * (1 - 1 / (h * w))).mean()
    torch.testing.assert_close(photometric_alignment_loss(zero, main_img, side_img, tau), expected)


def test_opam_128_never_forms_the_2d_attention() -> None:
    """A 64-channel 128×128 feature: no single op allocates anything near (HW)² floats.

    The profiler records every allocation per op; the row attention (B·H·W·W floats = 8 MiB) must
    show up (so the check sees attention allocations at all) and nothing may come within 1/16 of
    the (HW)×(HW) map (1 GiB).
    """
    torch.manual_seed(7)
    b, c, h, w = 1, 64, 128, 128
    model = OPAM(c).eval()
    main, side = torch.randn(b, c, h, w), torch.randn(b, c, h, w)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(main, side)
    largest = max(e.self_cpu_memory_usage for e in prof.events())
    full_map = (h * w) ** 2 * 4
    assert largest >= b * h * w * w * 4
    assert largest < full_map // 16, f"an op allocated {largest} bytes"
    assert out.aligned.shape == (b, c, h, w)


def _fusions(channels: int) -> list[nn.Module]:
    """Both fusions, their merge not at its zero start (which would make every fusion the identity)."""
    torch.manual_seed(8)
    fusions = [ParallaxFusion(channels), AverageFusion(channels)]
    for fusion in fusions:
        nn.init.normal_(fusion.merge[-1].weight, std=0.1)
    return fusions


@pytest.mark.parametrize("views", [0, 1, 3])
def test_fusion_shapes_and_view_order_invariance(views: int) -> None:
    gen = torch.Generator().manual_seed(9)
    main = torch.randn(2, 8, 6, 10, generator=gen)
    sides = [torch.randn(2, 8, 6, 10, generator=gen) for _ in range(views)]
    for fusion in _fusions(8):
        out = fusion(main, sides)
        assert out.shape == main.shape
        if views:
            assert (out - fusion(main, [])).abs().max() > 1e-3  # the side views do change the result
        torch.testing.assert_close(fusion(main, sides[::-1]), out, atol=1e-5, rtol=1e-5)


def test_pmifm_weights_views_by_consistency_average_does_not() -> None:
    """A view with zero consistency cannot change PMIFM's side feature; it changes the average."""
    pmifm, average = _fusions(4)
    gen = torch.Generator().manual_seed(10)
    aligned = torch.randn(1, 2, 4, 5, 6, generator=gen)
    consistency = torch.rand(1, 2, 1, 5, 6, generator=gen)
    consistency[:, 1] = 0.0
    disturbed = aligned.clone()
    disturbed[:, 1] += 100.0
    torch.testing.assert_close(pmifm.combine(disturbed, consistency), pmifm.combine(aligned, consistency))
    assert (average.combine(disturbed, consistency) - average.combine(aligned, consistency)).abs().min() > 10

    weights = pmifm.view_weights(consistency)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(1, 1, 5, 6))
    equal = pmifm.view_weights(torch.full((1, 3, 1, 5, 6), 0.4))
    torch.testing.assert_close(equal, torch.full_like(equal, 1 / 3))
