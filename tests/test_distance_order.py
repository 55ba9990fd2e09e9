"""View distance (a metric) and the coding orders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geometry.distance import view_distances
from geometry.ordering import OrderError, greedy_order, references, resolve_order


def random_poses(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    T = np.tile(np.eye(4), (n, 1, 1))
    for k in range(n):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        T[k, :3, :3] = q * np.sign(np.linalg.det(q))
        T[k, :3, 3] = rng.normal(scale=2.0, size=3)
    return T


def arc_poses(n: int, radius: float = 4.0, span_deg: float = 120.0) -> np.ndarray:
    """Cameras on a circular arc, each looking at the centre (world-to-camera)."""
    T = np.tile(np.eye(4), (n, 1, 1))
    for k, a in enumerate(np.radians(np.linspace(0, span_deg, n))):
        centre = radius * np.array([math.sin(a), 0.0, -math.cos(a)])
        z = -centre / np.linalg.norm(centre)
        x = np.cross([0.0, 1.0, 0.0], z)
        R_c2w = np.stack([x, np.cross(z, x), z], axis=1)
        T[k, :3, :3] = R_c2w.T
        T[k, :3, 3] = -R_c2w.T @ centre
    return T


def test_distance_matches_definition_and_is_a_metric():
    T = random_poses(12, seed=1)
    D = view_distances(T).numpy()
    i, j = 3, 7
    assert D[i, j] == pytest.approx(np.linalg.norm(T[j] @ np.linalg.inv(T[i]) - np.eye(4)), rel=1e-12)
    assert np.all(np.diag(D) == 0)
    off = D[~np.eye(12, dtype=bool)]
    assert np.all(off > 0)
    np.testing.assert_allclose(D, D.T, rtol=1e-10, atol=1e-12)
    triangle = D[:, None, :] + D[None, :, :] - D[:, :, None]  # d(a,b) + d(b,c) − d(a,c) ≥ 0
    assert triangle.min() > -1e-9


def test_distance_rejects_bad_shape():
    with pytest.raises(ValueError):
        view_distances(np.eye(4))


def test_greedy_recovers_shuffled_arc():
    n = 15
    T = arc_poses(n)
    names = [f"view_{k:02d}" for k in range(n)]
    perm = np.random.default_rng(4).permutation(n)
    shuffled_names = [names[p] for p in perm]
    D = view_distances(T[perm])
    order = resolve_order(shuffled_names, D, "greedy", start="view_00")
    assert [shuffled_names[k] for k in order] == names
    # Starting in the middle goes to one end first, then jumps to the other half in sequence.
    mid = greedy_order(D, shuffled_names.index("view_07"))
    walked = [int(shuffled_names[k][-2:]) for k in mid]
    assert walked[0] == 7 and sorted(walked) == list(range(n))
    assert all(abs(a - b) == 1 for a, b in zip(walked[:8], walked[1:8]))


def test_default_start_is_first_name_and_sorted_random_modes():
    names = ["c.png", "a.png", "b.png"]
    T = arc_poses(3)[[2, 0, 1]]  # a, b, c along the arc
    D = view_distances(T)
    assert resolve_order(names, D, "greedy") == [1, 2, 0]
    assert resolve_order(names, D, "sorted") == [1, 2, 0]
    r1 = resolve_order(names, D, "random", seed=3)
    assert sorted(r1) == [0, 1, 2] and r1 == resolve_order(names, D, "random", seed=3)
    assert references([1, 2, 0]) == {1: None, 2: 1, 0: 2}


def test_order_file_and_its_errors(tmp_path):
    names = ["a", "b", "c"]
    D = torch.zeros(3, 3)
    good = tmp_path / "order.txt"
    good.write_text("# my order\nc\n\nb  # middle\na\n")
    assert resolve_order(names, D, str(good)) == [2, 1, 0]
    cases = {"unknown": "a\nb\nz\n", "more than once": "a\nb\nb\nc\n", "misses": "a\nb\n"}
    for message, text in cases.items():
        path = tmp_path / f"{message.replace(' ', '_')}.txt"
        path.write_text(text)
        with pytest.raises(OrderError, match=message):
            resolve_order(names, D, str(path))
    with pytest.raises(OrderError, match="existing file"):
        resolve_order(names, D, str(tmp_path / "nope.txt"))
    with pytest.raises(OrderError, match="start view"):
        resolve_order(names, D, "greedy", start="zz")
    with pytest.raises(OrderError, match="unique"):
        resolve_order(["a", "a"], torch.zeros(2, 2), "sorted")
