"""The relations stage's compute function and the inspection pictures on a small analytic scene."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from geometry.warp import relate
from pipelines.errors import LmvicError
from pipelines.relations import RelationsConfig, StoredRelations, Views, scale_factors, write_relations

W, H, F, Z = 200, 168, 150.0, 4.0


def plane_views(xs: list[float], names: list[str], empty: set[int] = frozenset()) -> Views:
    """Cameras on the x axis looking at a frontal plane z = Z; a striped texture on the plane."""
    K = np.array([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1.0]])
    T = np.tile(np.eye(4), (len(xs), 1, 1))
    T[:, 0, 3] = -np.asarray(xs)

    def depth(kind: str, i: int) -> np.ndarray:
        return np.zeros((H, W), np.float32) if i in empty else np.full((H, W), Z, np.float32)

    def image(i: int) -> np.ndarray:
        u = np.arange(W) + 0.5 + F * xs[i] / Z  # the plane's x coordinate (in target pixels)
        row = (127 + 100 * np.sin(0.2 * u)).astype(np.uint8)
        return np.repeat(np.broadcast_to(row, (H, W))[..., None], 3, -1).copy()

    return Views(names=names, K=np.stack([K] * len(xs)), T=T, depth=depth, image=image)


NAMES = ["c.png", "a.png", "d.png", "b.png"]
XS = [0.2, 0.0, 0.3, 0.1]  # a, b, c, d lie along the x axis in name order


def test_write_relations_files_and_values(tmp_path):
    views = plane_views(XS, NAMES)
    summary = write_relations(views, RelationsConfig(), tmp_path)
    assert summary["order"] == ["a.png", "b.png", "c.png", "d.png"]
    assert summary["references"] == {"a.png": None, "b.png": "a.png", "c.png": "b.png", "d.png": "c.png"}
    stored = StoredRelations(tmp_path)
    assert stored.pairs() == [("b.png", "a.png"), ("c.png", "b.png"), ("d.png", "c.png")]
    D = stored.distances()
    assert D.shape == (4, 4) and D[1, 3] == pytest.approx(0.1)
    # Each neighbour is 0.1 to the right: target pixel x sees the reference at x + f·0.1/Z.
    shift = F * 0.1 / Z
    for kind in ("median", "mean"):
        for factor in scale_factors(16):
            disp, mask = stored.load(kind, "c.png", factor)
            h, w = math.ceil(H / factor), math.ceil(W / factor)
            assert disp.shape == (2, h, w) and mask.shape == (h, w)
            full = mask == 1
            assert np.allclose(disp[0][full], shift / factor, atol=1e-3)
        disp, mask = stored.load(kind, "c.png", 1)
        assert mask.dtype == bool and np.array_equal(mask[0], (np.arange(W) + 0.5 + shift) <= W)
        assert summary["trusted"][kind]["c.png"] == pytest.approx(mask.mean())
    with pytest.raises(LmvicError, match="no mean-depth relation"):
        stored.load("mean", "a.png")


def test_relations_match_relate_directly(tmp_path):
    views = plane_views(XS, NAMES)
    write_relations(views, RelationsConfig(tau=0.05), tmp_path)
    disp, mask = StoredRelations(tmp_path).load("median", "d.png")
    t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)[None]  # noqa: E731
    rel = relate(t(views.depth("median", 2)), t(views.K[2]), t(views.T[2]),
                 t(views.depth("median", 0)), t(views.K[0]), t(views.T[0]), tau=0.05)
    assert np.array_equal(mask, rel.mask[0].numpy())
    assert np.allclose(disp, rel.disparity[0].numpy() * mask)


def test_empty_depth_warns_and_gives_empty_mask(tmp_path, caplog):
    views = plane_views(XS, NAMES, empty={2})  # d.png has no depth
    with caplog.at_level(logging.WARNING):
        summary = write_relations(views, RelationsConfig(), tmp_path)
    assert "d.png" in caplog.text and "empty mask" in caplog.text
    assert summary["trusted"]["median"]["d.png"] == 0.0
    _, mask = StoredRelations(tmp_path).load("median", "d.png", 4)
    assert not mask.any()


def test_order_options_and_errors(tmp_path):
    views = plane_views(XS, NAMES)
    order_file = tmp_path / "order.txt"
    order_file.write_text("d.png\nc.png\nb.png\na.png\n")
    summary = write_relations(views, RelationsConfig(order=str(order_file)), tmp_path / "f")
    assert summary["order"] == ["d.png", "c.png", "b.png", "a.png"]
    assert write_relations(views, RelationsConfig(order="greedy", start="c.png"), tmp_path / "g")["order"][0] == "c.png"
    order_file.write_text("d.png\nd.png\nb.png\na.png\n")
    with pytest.raises(LmvicError, match="more than once"):
        write_relations(views, RelationsConfig(order=str(order_file)), tmp_path / "h")
    with pytest.raises(LmvicError, match="power of two"):
        write_relations(views, RelationsConfig(coarsest=12), tmp_path / "i")


def test_inspect_report_writes_every_picture(tmp_path):
    from pipelines.inspect_report import inspect_report

    views = plane_views(XS, NAMES, empty={2})
    write_relations(views, RelationsConfig(), tmp_path / "rel")
    index = inspect_report(views, StoredRelations(tmp_path / "rel"), tmp_path / "inspect")
    page = index.read_text()
    assert (tmp_path / "inspect" / "cameras.png").stat().st_size > 5000
    for name in NAMES:
        folder = tmp_path / "inspect" / "views" / name
        expected = {"depth.png"} if name == "a.png" else {
            "depth.png", "mask_median.png", "mask_mean.png", "warped_median.png", "warped_mean.png",
            "error.png", "sheet.png"}
        assert {p.name for p in folder.iterdir()} == expected
        for f in expected:
            assert f"views/{name}/{f}" in page
    # The warped reference reproduces the target inside the mask (the plane texture is exact).
    from PIL import Image

    warped = np.asarray(Image.open(tmp_path / "inspect" / "views" / "c.png" / "warped_median.png"))
    target = views.image(0)
    err = np.abs(warped.astype(int) - target.astype(int))[:, :150]
    assert err.mean() < 2.0


def write_stage_one(work, views: Views) -> None:
    """Stage one's output layout (pipelines.geometry_stage) for ``views``, as the runner leaves it."""
    from PIL import Image

    from pipelines.cache import atomic_write_json
    from pipelines.geometry_stage import depth_path

    (work / "sfm" / "images").mkdir(parents=True)
    entries = []
    for i, name in enumerate(views.names):
        Image.fromarray(views.image(i)).save(work / "sfm" / "images" / f"{name}.png")
        entries.append({"name": name, "image": f"images/{name}.png", "width": W, "height": H,
                        "K": views.K[i].tolist(), "T": views.T[i].tolist()})
        for kind in ("median", "mean"):
            path = depth_path(work / "depth", kind, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, views.depth(kind, i))
    atomic_write_json(work / "sfm" / "cameras.json", {"views": entries})
    for stage in ("sfm", "depth"):
        atomic_write_json(work / stage / "meta.json", {"stage": stage})


def test_stage_run_and_commands_on_stage_one_outputs(tmp_path, capsys):
    import json
    from types import SimpleNamespace

    from pipelines.cli import main
    from pipelines.relations import run

    views = plane_views(XS, NAMES)
    scene, work = tmp_path / "scene", tmp_path / "scene" / ".lmvic"
    (scene / "images").mkdir(parents=True)
    for i, name in enumerate(NAMES):
        from PIL import Image

        Image.fromarray(views.image(i)).save(scene / "images" / name)
    assert main(["inspect", str(scene), "-q"]) == 2  # nothing computed yet: a one-line error
    assert "run `lmvic run SCENE" in capsys.readouterr().err
    write_stage_one(work, views)
    (work / "relations").mkdir()
    summary = run(SimpleNamespace(work_dir=work, out=work / "relations", config=RelationsConfig()))
    assert summary["order"] == ["a.png", "b.png", "c.png", "d.png"] and summary["empty_masks"]["median"] == []
    (work / "relations" / "meta.json").write_text(json.dumps({"summary": summary}))

    assert main(["align-compare", str(scene), "-q", "--methods", "median,dis", "--max-pairs", "2"]) == 0
    out = capsys.readouterr().out
    assert "median" in out and "dis" in out and "2 pairs" in out
    table = json.loads((work / "align_compare" / "table.json").read_text())["table"]
    assert [r["method"] for r in table] == ["median", "dis"] and table[0]["psnr_valid"] > 35
    assert main(["align-compare", str(scene), "-q", "--methods", "sift"]) == 2
    assert main(["inspect", str(scene), "-q"]) == 0
    assert (work / "inspect" / "index.html").is_file()
