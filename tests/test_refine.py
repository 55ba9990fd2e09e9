"""Encoder-side latent refinement (``lmvic.refine``): straight-through rounding changes gradients only,
and a refined latent codes to a file another process decodes bit-exactly, at a lower real RD cost."""
from __future__ import annotations

import functools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lmvic  # noqa: F401
from lmvic.entropy_models import GaussianConditional
from lmvic.refine import rd_cost, refine_latent, straight_through
from lmvic.zoo import WEIGHTS_DIR, load_single_view

KODAK = Path("/work/shared/kodak")
SHIPPED = "single_view_cpu"


def shipped_model():
    if not (WEIGHTS_DIR / f"{SHIPPED}.pt").exists():
        pytest.skip("shipped weights lmvic/weights/single_view_cpu.pt not present")
    return load_single_view(SHIPPED)


def kodak_crop(name: str, height: int, width: int) -> np.ndarray:
    from pipelines.commands.eval_image import read_image

    if not KODAK.is_dir():
        pytest.skip("Kodak not available at /work/shared/kodak")
    return np.ascontiguousarray(read_image(KODAK / name)[:height, :width])


def test_straight_through_likelihood_gradient_is_the_gaussian_density_difference():
    """y = 0.7, μ = 0, σ = 1 rounds to 1; the likelihood Φ(1.5 − v) − Φ(0.5 − v) ... of v = y − μ at the
    rounded v = 1 has derivative φ(1.5) − φ(0.5) in y and the opposite in μ; plain eval rounding gives none."""
    gc = GaussianConditional(None).eval()
    phi = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    for st in (False, True):
        gc.straight_through = st
        y = torch.tensor([[[[0.7]]]], requires_grad=True)
        mu = torch.zeros_like(y, requires_grad=True)
        _, lik = gc(y, torch.ones_like(y), means=mu)
        lik.sum().backward()
        cdf = 0.5 * (math.erf(1.5 / math.sqrt(2)) - math.erf(0.5 / math.sqrt(2)))
        assert float(lik.detach()) == pytest.approx(cdf, rel=1e-6)
        expected = phi(1.5) - phi(0.5) if st else 0.0
        assert float(y.grad) == pytest.approx(expected, abs=1e-6)
        assert float(mu.grad) == pytest.approx(-expected, abs=1e-6)


def test_straight_through_changes_no_value_and_lets_the_rate_reach_the_latent():
    model = shipped_model().eval()
    x = torch.from_numpy(kodak_crop("kodim05.png", 64, 128)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        y = model.latent(x, 2)
        plain = model.forward_latent(y, 2)
    with straight_through(model):
        y = y.clone().requires_grad_(True)
        out = model.forward_latent(y, 2)
        assert not any(p.requires_grad for p in model.parameters())
        torch.log(out["likelihoods"]["y"]).sum().backward()
    assert all(p.requires_grad for p in model.parameters()) and not model.gaussian_conditional.straight_through
    assert torch.equal(out["x_hat"], plain["x_hat"])
    for k in ("y", "z"):
        assert torch.equal(out["likelihoods"][k], plain["likelihoods"][k])
    assert float(y.grad.abs().mean()) > 1e-3  # each element's own likelihood depends on it


DECODE_SCRIPT = """
import sys, numpy as np, torch
torch.set_num_threads(1)
import lmvic
from lmvic.zoo import load_single_view
from pipelines.commands.eval_image import decode_image
np.save(sys.argv[2], decode_image(load_single_view("single_view_cpu"), open(sys.argv[1], "rb").read()))
"""


def test_a_refined_image_costs_less_and_decodes_bit_exactly_in_another_process(tmp_path):
    from pipelines.commands.eval_image import decode_image, encode_image

    model = shipped_model()
    img = kodak_crop("kodim23.png", 176, 256)  # not a multiple of 64 in H: the padding is not optimised
    lam = float(model.lambdas[2])

    def real_cost(data: bytes, rec: np.ndarray) -> float:
        return 8 * len(data) + lam * float(((rec.astype(np.float64) - img) ** 2).sum())

    with torch.no_grad():
        plain = encode_image(model, img, 3)
    refined = encode_image(model, img, 3, refine_steps=30)
    rec = decode_image(model, refined)
    # session 26's weights: 0.6 % cheaper here (2-4 % with earlier weights); on kodim04 it is 0.3 % dearer, so only
    # "cheaper on this crop" is asserted, not by how much
    assert real_cost(refined, rec) < real_cost(plain, decode_image(model, plain))
    (tmp_path / "s.bin").write_bytes(refined)
    subprocess.run([sys.executable, "-c", DECODE_SCRIPT, str(tmp_path / "s.bin"), str(tmp_path / "rec.npy")],
                   check=True, cwd=Path(__file__).parents[1])
    assert np.array_equal(np.load(tmp_path / "rec.npy"), rec)


def test_refinement_keeps_each_images_best_latent_and_zero_steps_is_the_analysis():
    """Two images in one batch, λ of quality 1: the returned latents' estimated costs are each at most
    the analysis latent's, and below it in sum; 0 steps returns the analysis latent itself."""
    model = shipped_model().eval()
    x = torch.cat([torch.from_numpy(kodak_crop(n, 64, 64)).permute(2, 0, 1)[None].float() / 255
                   for n in ("kodim01.png", "kodim21.png")])
    lam = model.lambda_of(1, 2)
    with torch.no_grad():
        y = model.latent(x, 1)
    forward = functools.partial(model.forward_latent, quality=1)
    assert torch.equal(refine_latent(model, forward, x, y, lam, 0), y)
    refined = refine_latent(model, forward, x, y, lam, 15)
    with straight_through(model), torch.no_grad():
        before, after = (rd_cost(forward(v), x, lam, (64, 64)) for v in (y, refined))
    assert bool((after <= before).all()) and float(after.sum()) < 0.99 * float(before.sum())
    with pytest.raises(ValueError):
        refine_latent(model, forward, x, y, lam, -1)
