"""Encoder-side latent refinement: spend encode time to find a cheaper latent for the same decoder.

A trained analysis transform is amortised: it maps every image to a latent that is good on average,
not the best one for this image (the amortisation gap; Campos et al., "Content adaptive optimization
for neural image compression", 2019; Yang et al., NeurIPS 2020). Here the gained latent ``y`` of one
image is refined by Adam on the codec's own rate-distortion cost

    L(y) = bits(round(y)) / pixels + λ_q · 255² · MSE(x, synthesis(round(y)))

with the rounding of the real coder and straight-through gradients (``straight_through``). The
decoder, the bitstream and the format are unchanged: the refined latent is coded like any other.
Because the rounding is the coder's own, ``L`` is the estimated cost of what will be coded, and the
best latent seen is kept, so refining never returns a latent worse (by that estimate) than the
analysis transform's.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from lmvic.entropy_models import EntropyBottleneck, GaussianConditional, bits_per_pixel

#: Default Adam step on the gained latent (whose quantisation step is 1).
REFINE_LR = 0.02


@contextlib.contextmanager
def straight_through(model: nn.Module) -> Iterator[None]:
    """Within the block: ``model`` in eval mode, its parameters frozen, and its entropy models' rounding
    straight-through (``lmvic.entropy_models``), so gradients reach a latent fed to its forward."""
    was_training = model.training
    frozen = [p for p in model.parameters() if p.requires_grad]
    coders = [m for m in model.modules() if isinstance(m, (EntropyBottleneck, GaussianConditional))]
    model.eval()
    for p in frozen:
        p.requires_grad_(False)
    for m in coders:
        m.straight_through = True
    try:
        yield
    finally:
        for m in coders:
            m.straight_through = False
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)


def rd_cost(out: dict[str, object], x: Tensor, lam: Tensor, valid: tuple[int, int]) -> Tensor:
    """Per-image cost (B,) of a forward's output on images x (B, 3, H, W): bits over the ``valid``
    (height, width) pixels plus λ (B,) · 255² · MSE over that top-left region (the rest is padding)."""
    h, w = valid
    mse = (out["x_hat"][..., :h, :w] - x[..., :h, :w]).pow(2).flatten(1).mean(1)  # type: ignore[index]
    return bits_per_pixel(out["likelihoods"], h * w) + lam * 255**2 * mse  # type: ignore[arg-type]


def refine_latent(model: nn.Module, forward_latent: Callable[[Tensor], dict[str, object]], x: Tensor,
                  y: Tensor, lam: Tensor, steps: int, valid: tuple[int, int] | None = None,
                  lr: float = REFINE_LR) -> Tensor:
    """The latent of lowest estimated RD cost found from ``y`` in ``steps`` Adam steps.

    Args:
        model: the codec whose entropy models ``forward_latent`` uses (see ``straight_through``).
        forward_latent: gained latent (B, M, h, w) → {"x_hat" (B, 3, H, W), "likelihoods"}, e.g.
            ``partial(codec.forward_latent, quality=q)``.
        x: (B, 3, H, W) images in [0, 1] the latent codes. y: (B, M, h, w) the analysis' latent.
        lam: (B,) λ of the quality level. valid: (height, width) of the image within the padded x.
    Returns:
        (B, M, h, w) detached, each image's best latent (``y`` itself when no step improved it).
    """
    if steps < 0:
        raise ValueError(f"refinement steps must be ≥ 0, got {steps}")
    if steps == 0:
        return y.detach()
    valid = valid or (x.shape[-2], x.shape[-1])
    best = y.detach().clone()
    with straight_through(model), torch.enable_grad():
        current = best.clone().requires_grad_(True)
        opt = torch.optim.Adam([current], lr=lr)
        best_cost = torch.full((y.shape[0],), float("inf"), dtype=torch.float64)
        for step in range(steps + 1):
            cost = rd_cost(forward_latent(current), x, lam, valid)
            better = cost.detach().double() < best_cost
            best_cost = torch.where(better, cost.detach().double(), best_cost)
            best[better] = current.detach()[better]
            if step == steps:  # the last pass only evaluates the last step's latent
                break
            opt.zero_grad(set_to_none=True)
            cost.sum().backward()
            opt.step()
    return best
