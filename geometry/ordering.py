"""Coding order of the views and each view's reference (3D-LMVIC, section 3.2.3).

Modes:
- ``greedy``: start from one view; repeatedly append the unused view nearest (by
  :func:`geometry.distance.view_distances`) to the last one appended; ties go to the lower index
  (the earlier name, views being listed in name order).
- ``sorted``: file-name order.
- ``random``: a seeded permutation (the paper's Random ablation).
- a file: one view name per line (blank lines and ``#`` comments ignored); it must name every
  view exactly once.

Each view's reference is its predecessor in the order; the first view has none. Invalid requests
raise :class:`OrderError` with a one-line reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

MODES = ("greedy", "sorted", "random")


class OrderError(ValueError):
    """An order that cannot be built: unknown, duplicate or missing view names, bad mode."""


def greedy_order(distances: torch.Tensor | np.ndarray, start: int) -> list[int]:
    """Greedy nearest-neighbour chain through all views.

    Args:
        distances: [N, N] pairwise distances (only ``distances[last, candidate]`` is read).
        start: index of the first view.

    Returns:
        A permutation of ``range(N)`` beginning with ``start``.
    """
    D = torch.as_tensor(distances, dtype=torch.float64)
    n = D.shape[0]
    if D.shape != (n, n):
        raise OrderError(f"distance matrix must be square, got {tuple(D.shape)}")
    if not 0 <= start < n:
        raise OrderError(f"start index {start} outside 0..{n - 1}")
    used = torch.zeros(n, dtype=torch.bool)
    order = [start]
    used[start] = True
    for _ in range(n - 1):
        row = D[order[-1]].masked_fill(used, float("inf"))
        nxt = int(torch.argmin(row))  # argmin returns the first minimum: ties go to the lower index
        order.append(nxt)
        used[nxt] = True
    return order


def names_to_indices(order_names: Sequence[str], names: Sequence[str]) -> list[int]:
    """Indices of ``order_names`` in ``names``; every name must appear exactly once."""
    index = {name: i for i, name in enumerate(names)}
    unknown = [n for n in order_names if n not in index]
    if unknown:
        raise OrderError(f"order names unknown views: {', '.join(unknown[:5])}")
    seen: set[str] = set()
    duplicates = sorted({n for n in order_names if n in seen or seen.add(n)})
    if duplicates:
        raise OrderError(f"order names views more than once: {', '.join(duplicates[:5])}")
    missing = [n for n in names if n not in seen]
    if missing:
        raise OrderError(f"order misses {len(missing)} view(s): {', '.join(missing[:5])}")
    return [index[n] for n in order_names]


def read_order_file(path: str | Path) -> list[str]:
    """View names from a text file, one per line; blank lines and ``#`` comments are ignored."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [s for s in (line.split("#", 1)[0].strip() for line in lines) if s]


def resolve_order(
    names: Sequence[str],
    distances: torch.Tensor | np.ndarray,
    mode: str = "greedy",
    start: str | None = None,
    seed: int = 0,
) -> list[int]:
    """The coding order as indices into ``names``.

    Args:
        names: view names, in the scene's own order (indices refer to it).
        distances: [N, N] view distances (used by ``greedy``).
        mode: ``greedy``, ``sorted``, ``random`` or the path of an order file.
        start: first view for ``greedy`` (default: the first by file name); ignored otherwise.
        seed: seed of the ``random`` permutation.
    """
    if len(set(names)) != len(names):
        raise OrderError("view names are not unique")
    by_name = sorted(range(len(names)), key=lambda i: names[i])
    if mode == "sorted":
        return by_name
    if mode == "random":
        perm = np.random.default_rng(seed).permutation(len(names))
        return [int(i) for i in perm]
    if mode == "greedy":
        if start is None:
            first = by_name[0]
        elif start in names:
            first = list(names).index(start)
        else:
            raise OrderError(f"start view {start!r} is not a view of the scene")
        return greedy_order(distances, first)
    path = Path(mode)
    if not path.is_file():
        raise OrderError(f"order must be one of {', '.join(MODES)} or an existing file, got {mode!r}")
    return names_to_indices(read_order_file(path), names)


def references(order: Sequence[int]) -> dict[int, int | None]:
    """Each view's reference: its predecessor in ``order`` (``None`` for the first)."""
    return {view: (order[k - 1] if k > 0 else None) for k, view in enumerate(order)}
