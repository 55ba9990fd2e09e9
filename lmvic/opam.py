"""OmniParallax Attention (OPAM, ParaHydra appendix B, Eq. 5–24).

Two parallax attention stages align a side feature onto a main feature without geometry:

* horizontal (HPA): rows are folded into the batch, ``M = Q Kᵀ`` is a ``[B·H, W, W]`` matrix per
  row, softmax along both of its axes gives ``M_{v→u}`` and ``M_{u→v}``; the cycle consistency
  ``C_hor[i] = Σ_j M_{v→u}[i, j] M_{u→v}[j, i]`` (Eq. 8–9, at most 1 by Lemma 1) says how reliably
  position ``i`` of the main view is explained by its row in the side view, and ``M_{v→u}`` applied
  to the side feature's rows is the horizontally aligned feature (Eq. 11);
* vertical (VPA): the same along columns (``[B·W, H, H]``), with the queries from the main feature
  and the keys and values from the horizontally aligned feature (Eq. 22).

The overall consistency is ``C = C_hor ⊙ C_ver`` (Eq. 23). Each position of the result attends to
the full 2-D side feature (Eq. 24) while no ``(HW)×(HW)`` matrix is ever formed: memory
``O(B·H·W·max(H, W))`` and time ``O(B·H·W·max(H, W)·C)``.

Tensors are channel-first (``[B, C, H, W]``) as everywhere in PyTorch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Projection = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class AxisAttention:
    """Parallax attention along one axis (rows for HPA, columns for VPA).

    ``attention`` is ``M_{v→u}``: ``[B·H, W, W]`` for rows (``[b·H + g, i, j]`` is how much main
    position ``(g, i)`` takes from side position ``(g, j)``), ``[B·W, H, H]`` for columns
    (``[b·W + g, i, j]``: main ``(i, g)`` from side ``(j, g)``). ``aligned`` is ``[B, C', H, W]``,
    ``consistency`` is ``[B, 1, H, W]`` in ``[0, 1]``.
    """

    attention: Tensor
    aligned: Tensor
    consistency: Tensor


@dataclass(frozen=True)
class OpamResult:
    """One OPAM pass: ``aligned`` ``[B, C, H, W]`` (Eq. 22), ``consistency`` ``[B, 1, H, W]``
    (Eq. 23), and the two stages whose maps can be re-applied to other tensors (``apply_opam``)."""

    aligned: Tensor
    consistency: Tensor
    horizontal: AxisAttention
    vertical: AxisAttention


def _fold_rows(x: Tensor) -> Tensor:
    """``[B, C, H, W]`` → ``[B·H, W, C]`` (row ``g`` of batch ``b`` at index ``b·H + g``)."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b * h, w, c)


def _unfold_rows(x: Tensor, batch: int) -> Tensor:
    """``[B·H, W, C]`` → ``[B, C, H, W]``; inverse of ``_fold_rows``."""
    bh, w, c = x.shape
    return x.reshape(batch, bh // batch, w, c).permute(0, 3, 1, 2)


def _swap_axes(x: Tensor) -> Tensor:
    """``[B, C, H, W]`` → ``[B, C, W, H]``: columns become rows."""
    return x.transpose(-1, -2)


def row_attention(query: Tensor, key: Tensor, value: Tensor) -> AxisAttention:
    """Horizontal parallax attention (Eq. 6–12).

    Args:
        query: ``[B, C, H, W]`` from the main feature.
        key: ``[B, C, H, W]`` from the side feature.
        value: ``[B, C', H, W]`` side tensor to align (usually the side feature itself).
    Returns:
        ``M_{v→u}`` ``[B·H, W, W]``, the aligned value ``[B, C', H, W]`` and ``C_hor``
        ``[B, 1, H, W]``.
    """
    if query.shape != key.shape or query.shape[0] != value.shape[0] or query.shape[2:] != value.shape[2:]:
        raise ValueError(f"row_attention: query {tuple(query.shape)}, key {tuple(key.shape)} and "
                         f"value {tuple(value.shape)} must agree in batch and spatial size")
    batch, _, height, width = query.shape
    scores = torch.bmm(_fold_rows(query), _fold_rows(key).transpose(1, 2))  # [B·H, W, W]
    v_to_u = scores.softmax(dim=-1)
    u_to_v = scores.transpose(1, 2).softmax(dim=-1)
    # Eq. 9: C[i] = Σ_j M_{v→u}[i, j] · M_{u→v}[j, i]
    consistency = (v_to_u * u_to_v.transpose(1, 2)).sum(dim=-1)  # [B·H, W]
    aligned = torch.bmm(v_to_u, _fold_rows(value))  # Eq. 11: [B·H, W, C']
    return AxisAttention(
        attention=v_to_u,
        aligned=_unfold_rows(aligned, batch),
        consistency=consistency.reshape(batch, 1, height, width),
    )


def column_attention(query: Tensor, key: Tensor, value: Tensor) -> AxisAttention:
    """Vertical parallax attention (Eq. 14–20): ``row_attention`` with columns as rows.

    Shapes as ``row_attention``; ``attention`` is ``[B·W, H, H]``.
    """
    along_rows = row_attention(_swap_axes(query), _swap_axes(key), _swap_axes(value))
    return AxisAttention(
        attention=along_rows.attention,
        aligned=_swap_axes(along_rows.aligned),
        consistency=_swap_axes(along_rows.consistency),
    )


def omni_parallax_attention(main: Tensor, side: Tensor, project_hor: Projection,
                            project_ver: Projection) -> OpamResult:
    """Two-stage OPAM (Eq. 21–23): HPA on (main, side), then VPA on (main, HPA-aligned side).

    Args:
        main: ``[B, C, H, W]`` main feature ``f_u``.
        side: ``[B, C, H, W]`` side feature ``f_v``.
        project_hor: Q/K projection of the horizontal stage (Eq. 5), applied to both inputs.
        project_ver: Q/K projection of the vertical stage (Eq. 13).
    """
    if main.shape != side.shape:
        raise ValueError(f"OPAM: main {tuple(main.shape)} and side {tuple(side.shape)} differ")
    horizontal = row_attention(project_hor(main), project_hor(side), side)
    vertical = column_attention(project_ver(main), project_ver(horizontal.aligned), horizontal.aligned)
    return OpamResult(
        aligned=vertical.aligned,
        consistency=horizontal.consistency * vertical.consistency,
        horizontal=horizontal,
        vertical=vertical,
    )


def apply_opam(result: OpamResult, value: Tensor) -> Tensor:
    """Align another side tensor with the maps of one OPAM pass (Eq. 24 for any value).

    Args:
        result: the pass whose attention maps are used (feature size ``H × W``).
        value: ``[B, C', H, W]`` tensor of the side view.
    Returns:
        ``[B, C', H, W]``: ``Σ_g Σ_s M_ver[b·W + j, i, g] M_hor[b·H + g, j, s] value[b, :, g, s]``.
    """
    batch = value.shape[0]
    horizontal = _unfold_rows(torch.bmm(result.horizontal.attention, _fold_rows(value)), batch)
    vertical = torch.bmm(result.vertical.attention, _fold_rows(_swap_axes(horizontal)))
    return _swap_axes(_unfold_rows(vertical, batch))


def align_image(result: OpamResult, image: Tensor) -> tuple[Tensor, Tensor]:
    """Warp a side image onto the main view with the attention of one OPAM pass.

    The image may be larger than the features by an integer factor ``s`` (e.g. features at 1/16):
    each ``s × s`` pixel block travels as one feature position (``pixel_unshuffle``), so pixels
    keep their full resolution and move by whole blocks.

    Args:
        result: OPAM pass on features of size ``H × W``.
        image: ``[B, 3, s·H, s·W]`` side image.
    Returns:
        the aligned image ``[B, 3, s·H, s·W]`` and the validity weight ``[B, 1, s·H, s·W]`` (the
        consistency ``C``, constant over each block).
    """
    height, width = result.consistency.shape[-2:]
    scale = image.shape[-2] // height
    if scale < 1 or image.shape[-2] != scale * height or image.shape[-1] != scale * width:
        raise ValueError(f"align_image: image size {tuple(image.shape[-2:])} is not an integer "
                         f"multiple of the attention's feature size {(height, width)}")
    blocks = F.pixel_unshuffle(image, scale)
    aligned = F.pixel_shuffle(apply_opam(result, blocks), scale)
    validity = F.interpolate(result.consistency, scale_factor=scale, mode="nearest")
    return aligned, validity


def shift_targets(length: int, offset: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    """Attention targets of a known shift along one axis.

    Main position ``i`` on a grid of stride ``stride`` px matches side position ``i + offset/stride``;
    a fractional match is split between its two neighbours (linear interpolation).

    Args:
        length: positions along the axis.
        offset: ``[B]`` shift in pixels (main pixel ``p`` shows what side pixel ``p + offset`` shows).
        stride: pixels per position.
    Returns:
        ``[B, L, L]`` target distributions (rows sum to 1 where valid, 0 elsewhere) and ``[B, L]``
        validity (the match lies inside the side view).
    """
    position = torch.arange(length, dtype=torch.float32)[None] + offset.float()[:, None] / stride  # [B, L]
    low = position.floor()
    frac = position - low
    valid = (low >= 0) & (low + (frac > 0).float() <= length - 1)
    target = torch.zeros(offset.shape[0], length, length)
    target.scatter_add_(2, low.clamp(0, length - 1).long()[..., None], (1 - frac)[..., None])
    target.scatter_add_(2, (low + 1).clamp(0, length - 1).long()[..., None], frac[..., None])
    return target * valid[..., None], valid


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1)


def shift_attention_loss(result: OpamResult, offset: Tensor, stride: int) -> Tensor:
    """Cross-entropy of both stages' attention against a known 2-D shift (a direct alignment signal).

    HPA must take, in the same row of the side view, the column of the match (``j + o_x``); VPA
    must then take, in the same column of the horizontally aligned feature, the row of the match
    (``i + o_y``): together they move side ``(i + o_y, j + o_x)`` onto main ``(i, j)`` (Eq. 24).
    Positions whose match lies outside the side view do not count.

    Args:
        result: OPAM pass on ``[B, C, H, W]`` features.
        offset: ``[B, 2]`` pixel shift ``(o_y, o_x)``: main pixel ``(y, x)`` shows side pixel
            ``(y + o_y, x + o_x)``.
        stride: pixels per feature position.
    Returns:
        scalar: mean over valid positions of ``−Σ target·log M`` (HPA) plus the same for VPA.
    """
    batch, _, height, width = result.consistency.shape
    target_h, valid_h = shift_targets(width, offset[:, 1], stride)  # [B, W, W], [B, W]
    target_v, valid_v = shift_targets(height, offset[:, 0], stride)  # [B, H, H], [B, H]
    log_h = result.horizontal.attention.clamp_min(1e-12).log().unflatten(0, (batch, height))  # [B, H, W, W]
    log_v = result.vertical.attention.clamp_min(1e-12).log().unflatten(0, (batch, width))  # [B, W, H, H]
    ce_h = -(target_h[:, None] * log_h).sum(-1)  # [B, H, W]
    ce_v = -(target_v[:, None] * log_v).sum(-1)  # [B, W, H]
    mask_h = valid_h[:, None].expand(-1, height, -1).float()
    # VPA only where the horizontal stage had a match to bring (its column's match is inside)
    mask_v = (valid_v[:, None] & valid_h[..., None]).float()
    return _masked_mean(ce_h, mask_h) + _masked_mean(ce_v, mask_v)


def correspondence_error(result: OpamResult, offset: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    """Distance between the attention's mean correspondence and the true match of a known shift.

    Each main position's mean correspondence is ``apply_opam`` of the side positions' coordinates
    (the attention-weighted mean side position): a soft or split attention pulls it off the match.

    Args:
        result: OPAM pass on ``[B, C, H, W]`` features.
        offset: ``[B, 2]`` pixel shift ``(o_y, o_x)`` as in ``shift_attention_loss``.
        stride: pixels per feature position.
    Returns:
        the distance in positions ``[B, H, W]`` and where the match lies inside the side view
        ``[B, H, W]`` (bool).
    """
    batch, _, height, width = result.consistency.shape
    grid = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")).float()
    grid = grid[None].expand(batch, -1, -1, -1)
    truth = grid + offset[:, :, None, None].float() / stride
    limit = torch.tensor([height - 1, width - 1], dtype=torch.float32)[None, :, None, None]
    inside = ((truth >= 0) & (truth <= limit)).all(dim=1)
    distance = (apply_opam(result, grid).float() - truth).square().sum(dim=1).add(1e-6).sqrt()
    return distance, inside


def known_shift_sharpness_loss(result: OpamResult, offset: Tensor, stride: int) -> Tensor:
    """What a known shift asks beyond the cross-entropy: where the match lies inside the side view,
    the mean correspondence on it (``correspondence_error``, in positions) and full consistency
    (``−log C``). Both are lowest for one sharp, mutual peak on the match, whereas the cross-entropy
    alone is lowered by spreading the attention over ambiguous matches (repeated texture, flat blocks),
    which moves the mean correspondence off the match and the consistency toward 0 on unseen views.

    Args as ``correspondence_error``. Returns: scalar, the sum of both masked means.
    """
    distance, inside = correspondence_error(result, offset, stride)
    mask = inside.float()
    surprise = -result.consistency[:, 0].float().clamp_min(1e-4).log()
    return _masked_mean(distance, mask) + _masked_mean(surprise, mask)


def photometric_alignment_loss(result: OpamResult, main_image: Tensor, side_image: Tensor,
                               invalid_cost: float) -> Tensor:
    """Consistency-weighted photometric error of the attention-aligned side image.

    Both images are averaged over the ``s × s`` pixel blocks of the feature grid, the side one is
    moved by the pass's attention (``apply_opam``), and each position pays ``C·e + τ·(1 − C)``
    with ``e`` its mean absolute error and ``τ = invalid_cost``: declaring a position unaligned
    costs ``τ``, so the consistency cannot collapse to 0 where the alignment error is below ``τ``,
    and is driven to 0 where it is above (occlusions, outside the side view).

    Args:
        result: OPAM pass on ``[B, C, H, W]`` features.
        main_image, side_image: ``[B, 3, s·H, s·W]`` in [0, 1].
    Returns:
        scalar, the mean over positions.
    """
    height = result.consistency.shape[-2]
    stride = main_image.shape[-2] // height
    main_blocks, side_blocks = (F.avg_pool2d(image, stride) for image in (main_image, side_image))
    error = (apply_opam(result, side_blocks) - main_blocks).abs().mean(dim=1, keepdim=True)
    consistency = result.consistency
    return (consistency * error + invalid_cost * (1 - consistency)).mean()


class SelectiveKernel(nn.Module):
    """Selective-kernel module (Li et al. 2019) used as the Q/K projection of OPAM.

    Two 3×3 branches, one dilated (receptive fields 3 and 5), are summed, average-pooled and
    squeezed into a descriptor from which a softmax across the branches gives per-channel weights;
    the output is the weighted sum of the branches. ``[B, C, H, W]`` → ``[B, C, H, W]``.
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=d, dilation=d), nn.LeakyReLU(0.1))
            for d in (1, 2)
        )
        self.squeeze = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU())
        self.select = nn.Linear(hidden, channels * len(self.branches))

    def forward(self, x: Tensor) -> Tensor:
        outputs = torch.stack([branch(x) for branch in self.branches], dim=1)  # [B, 2, C, H, W]
        descriptor = self.squeeze(outputs.sum(dim=1).mean(dim=(-2, -1)))  # [B, hidden]
        weights = self.select(descriptor).reshape(x.shape[0], len(self.branches), -1).softmax(dim=1)
        return (outputs * weights[..., None, None]).sum(dim=1)


def normalised(project: Projection, log_temperature: Tensor, x: Tensor) -> Tensor:
    """``exp(t) · (P(x) − mean) / |P(x) − mean|``: the projection centred over the positions of each
    image and L2-normalised along the channels, so ``Q Kᵀ`` is a cosine similarity times the
    temperature ``exp(t)`` (a raw dot product favours positions of large feature norm over matching
    ones). ``[B, C, H, W]`` → ``[B, C, H, W]``."""
    projected = project(x)
    centred = projected - projected.mean(dim=(-2, -1), keepdim=True)
    return log_temperature.exp() * F.normalize(centred, dim=1)


class OPAM(nn.Module):
    """OmniParallax Attention with learned SKM projections (one per stage, shared by Q and K),
    centred and normalised (``normalised``) with a learned temperature per stage.

    ``forward(main [B, C, H, W], side [B, C, H, W]) -> OpamResult``.
    """

    def __init__(self, channels: int, temperature: float = 10.0):
        super().__init__()
        self.project_hor = SelectiveKernel(channels)
        self.project_ver = SelectiveKernel(channels)
        self.initial_temperature = temperature
        self.log_temperature = nn.Parameter(torch.full((2,), math.log(temperature)))

    def forward(self, main: Tensor, side: Tensor) -> OpamResult:
        return omni_parallax_attention(main, side, partial(normalised, self.project_hor, self.log_temperature[0]),
                                       partial(normalised, self.project_ver, self.log_temperature[1]))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # weights saved before the temperature existed start from the initial one
        state_dict.setdefault(prefix + "log_temperature", torch.full((2,), math.log(self.initial_temperature)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
