"""RD bookkeeping, BD-rate, CompressAI-format JSON, table, plot and the ``lmvic eval`` command."""
from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.metrics import ms_ssim, psnr
from pipelines.rd import (BDRateError, Coded, RDCurve, RDPoint, bd_rate, crop_common, from_compressai_json,
                          measure, ms_ssim_views, plot_rd, to_compressai_json, write_table)
from tests.conftest import run_lmvic

KODAK_RESULTS = Path(__file__).resolve().parents[2] / "shared" / "kodak" / "compressai-results"
RESULT_KEYS = {"psnr-rgb", "ms-ssim-rgb", "bpp", "encoding_time", "decoding_time"}


@dataclass(frozen=True)
class Posterize:
    """A toy codec for bookkeeping tests: drops ``q`` low bits; 'bytes' = bits kept × pixels / 8."""

    name: str = "posterize"
    description: str = "drops low bits"
    qualities: tuple[int, ...] = (4, 2)

    def encode_decode(self, views, quality):
        decoded = [((v >> quality) << quality) + (1 << quality) // 2 for v in views]
        return Coded([v.size * (8 - quality) // 8 for v in views], decoded, 0.5, 0.25)


def _views(n: int = 3, h: int = 192, w: int = 256) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    base = np.cumsum(np.cumsum(rng.normal(size=(h, w + 8 * n, 3)), 0), 1)
    base = (base - base.min()) / np.ptp(base) * 255
    return [np.ascontiguousarray(base[:, 8 * i: 8 * i + w].astype(np.uint8)) for i in range(n)]


def test_measure_bpp_psnr_ms_ssim_against_direct_computation():
    views = _views()
    curve = measure(Posterize(), views, ["a", "b", "c"], log=lambda s: None)
    assert [p.quality for p in curve.points] == [4, 2]
    for point, q in zip(curve.points, (4, 2)):
        decoded = Posterize().encode_decode(views, q).decoded
        assert point.view_bpp == pytest.approx([3 * (8 - q)] * 3)  # 3 channels × (8 − q) bits
        assert point.bpp == pytest.approx(8 * sum(point.num_bytes) / (3 * 192 * 256))
        assert point.psnr == pytest.approx([psnr(v, d) for v, d in zip(views, decoded)])
        assert point.ms_ssim == pytest.approx([ms_ssim(v, d) for v, d in zip(views, decoded)], abs=1e-5)
    assert curve.points[1].mean_psnr > curve.points[0].mean_psnr


def test_ms_ssim_views_matches_the_float64_metric():
    views = _views(2)
    noisy = [np.clip(v.astype(int) + np.random.default_rng(1).integers(-9, 10, v.shape), 0, 255).astype(np.uint8)
             for v in views]
    assert ms_ssim_views(views, noisy) == pytest.approx([ms_ssim(a, b) for a, b in zip(views, noisy)], abs=1e-5)
    assert ms_ssim_views(views, views) == [1.0, 1.0]


def test_measure_rejects_views_too_small_for_ms_ssim():
    with pytest.raises(ValueError, match="too small"):
        measure(Posterize(), _views(1, 128, 256), ["a"], log=lambda s: None)


def test_crop_common():
    views = [np.zeros((200, 300, 3), np.uint8), np.ones((260, 280, 3), np.uint8)]
    out = crop_common(views)
    assert [v.shape for v in out] == [(192, 256, 3)] * 2
    assert out[1].all()
    with pytest.raises(ValueError):
        crop_common([np.zeros((50, 300, 3), np.uint8)])


RATES = [0.1, 0.2, 0.4, 0.8]
PSNRS = [28.0, 31.0, 34.5, 37.0]


@pytest.mark.filterwarnings("ignore:Polyfit may be poorly conditioned")  # the package's cubic fit
@pytest.mark.parametrize("method", ["akima", "pchip", "cubic"])
def test_bd_rate_identity_and_ten_percent(method):
    assert bd_rate(RATES, PSNRS, RATES, PSNRS, method) == pytest.approx(0.0, abs=1e-9)
    fewer = [0.9 * r for r in RATES]
    assert bd_rate(RATES, PSNRS, fewer, PSNRS, method) == pytest.approx(-10.0, abs=1e-6)
    assert bd_rate(RATES[::-1], PSNRS[::-1], fewer, PSNRS, method) == pytest.approx(-10.0, abs=1e-6)  # unsorted
    # PSNR linear in log-rate: every interpolation is exact, so point counts may differ.
    log_psnr = [30 + 10 * np.log10(r) for r in RATES]
    assert bd_rate(RATES, log_psnr, fewer[:3], log_psnr[:3], method) == pytest.approx(-10.0, abs=1e-6)


def test_bd_rate_clear_errors():
    with pytest.raises(BDRateError, match="does not rise"):
        bd_rate(RATES, [28.0, 31.0, 30.0, 37.0], RATES, PSNRS)
    with pytest.raises(BDRateError, match="overlap"):
        bd_rate(RATES, PSNRS, RATES, [p + 20 for p in PSNRS])
    with pytest.raises(BDRateError, match="at least 2"):
        bd_rate(RATES, PSNRS, [0.1], [30.0])


def _curve() -> RDCurve:
    points = [RDPoint(q, [1000 * q, 1200 * q], 192, 256, [30.0 + q, 40.0 if q == 1 else float("inf")],
                      [0.95, 1.0], 2.0, 1.0) for q in (1, 2)]
    return RDCurve("toy", "a toy curve", ["v0", "v1"], points)


def test_compressai_json_layout_and_round_trip(tmp_path):
    data = to_compressai_json(_curve(), {"anchor": "x265-ldp", "psnr": -3.0, "ms-ssim": "no overlap"})
    assert {"name", "description", "results"} <= set(data)
    assert set(data["results"]) == RESULT_KEYS
    if KODAK_RESULTS.is_dir():  # the published files' layout, where the shared data exists
        published = json.loads((KODAK_RESULTS / "jpeg.json").read_text())
        assert set(data["results"]) == set(published["results"])
    assert all(len(v) == 2 for v in data["results"].values())
    assert data["results"]["encoding_time"] == [1.0, 1.0]  # seconds per view
    assert data["results"]["psnr-rgb"] == [pytest.approx(35.5), None]  # a lossless view: mean is infinite
    text = json.dumps(data, allow_nan=False)  # lossless views' infinite PSNR is written as null
    back = from_compressai_json(json.loads(text))
    assert back.bpp == _curve().bpp
    assert back.points[1].psnr == [32.0, float("inf")]
    assert back.points[0].streams is None and "streams" not in data["per_view"][0]
    streams = [{"depth": 100, "image": 880}, {"depth": 90, "image.intra": 1100}]
    curve = _curve()
    curve = dataclasses.replace(curve, points=[dataclasses.replace(curve.points[0], streams=streams)])
    back = from_compressai_json(json.loads(json.dumps(to_compressai_json(curve))))
    assert back.points[0].streams == streams


def test_table_and_plot(tmp_path):
    curve = _curve()
    rows = list(csv.reader(write_table([curve], tmp_path / "t.csv").open()))
    assert rows[0][:3] == ["codec", "quality", "bpp"] and len(rows) == 3
    assert float(rows[1][2]) == pytest.approx(8 * 2200 / (2 * 192 * 256), rel=1e-5)
    png = plot_rd([curve], tmp_path / "rd.png", "toy")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ lmvic eval
def _work_dir_with_sfm(tmp_path: Path, views: list[np.ndarray]) -> tuple[Path, Path, list[str]]:
    """A scene folder and a work folder whose sfm stage output is written directly (cameras.json
    and undistorted images), as the sfm stage leaves them."""
    scene, work = tmp_path / "scene", tmp_path / "work"
    (scene / "images").mkdir(parents=True)
    (work / "sfm" / "images").mkdir(parents=True)
    names = [f"{i:04d}.png" for i in range(len(views))]
    entries = []
    for name, img in zip(names, views):
        Image.fromarray(img).save(scene / "images" / name)
        Image.fromarray(img).save(work / "sfm" / "images" / name)
        T = np.eye(4)
        T[0, 3] = float([0, 2, 1, 3][len(entries)])  # camera x positions: greedy order 0, 2, 1, 3
        entries.append({"name": name, "image": f"images/{name}", "width": img.shape[1], "height": img.shape[0],
                        "K": [[200.0, 0, 128], [0, 200.0, 100], [0, 0, 1]], "T": T.tolist()})
    (work / "sfm" / "cameras.json").write_text(json.dumps({"views": entries}))
    (work / "sfm" / "meta.json").write_text("{}")  # the runner's completion marker
    return scene, work, names


def test_eval_command_end_to_end(tmp_path):
    views = [np.pad(v, ((0, 8), (0, 4), (0, 0)), mode="edge") for v in _views(3)]  # 200×260: cropped
    scene, work, names = _work_dir_with_sfm(tmp_path, views)
    order = [names[2], names[0], names[1]]
    (work / "relations").mkdir()
    (work / "relations" / "order.json").write_text(json.dumps({"names": names, "order": order}))
    (work / "relations" / "meta.json").write_text("{}")
    proc = run_lmvic("eval", scene, "--work-dir", work, "--codecs", "x265-ldp,jpeg,lmvic-single", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "BD-rate vs x265-ldp" in proc.stdout and "cropped views" in proc.stdout
    out = work / "eval"
    jpeg = json.loads((out / "jpeg.json").read_text())
    assert jpeg["views"] == order
    assert set(jpeg["results"]) == RESULT_KEYS
    assert jpeg["per_view"][0]["height"] == 192 and jpeg["per_view"][0]["width"] == 256
    assert set(jpeg["bd_rate_percent"]) == {"anchor", "psnr", "ms-ssim"}
    assert (out / "rd.png").stat().st_size > 0
    rows = list(csv.reader((out / "table.csv").open()))
    assert len(rows) == 1 + 5 + 7 + 6
    single = json.loads((out / "lmvic-single.json").read_text())["per_view"]
    for point in single:  # the container's streams per view: every byte but the header's and length fields
        assert [set(v) for v in point["streams"]] == [{"image"}] * 3
        assert all(0 < sum(v.values()) < b for v, b in zip(point["streams"], point["bytes"]))
        overhead = [b - sum(v.values()) for v, b in zip(point["streams"], point["bytes"])]
        assert max(overhead[1:]) < 32 and overhead[0] > 64  # a record's varint fields and CRC; the header counts with view 0


def test_eval_command_errors(tmp_path, capsys):
    from pipelines.cli import main

    scene, work, _ = _work_dir_with_sfm(tmp_path, _views(2))
    assert main(["eval", str(scene), "--work-dir", str(tmp_path / "empty")]) != 0
    assert "no completed sfm stage" in capsys.readouterr().err
    assert main(["eval", str(scene), "--work-dir", str(work), "--codecs", "jpeg,bpg"]) != 0
    assert "unknown codec(s) bpg" in capsys.readouterr().err


def test_eval_command_orders(tmp_path, capsys):
    from pipelines.cli import main

    scene, work, names = _work_dir_with_sfm(tmp_path, _views(3))
    assert main(["eval", str(scene), "--work-dir", str(work), "--codecs", "jpeg"]) == 0
    assert "no relations stage" in capsys.readouterr().out
    assert json.loads((work / "eval" / "jpeg.json").read_text())["views"] == names
    assert main(["eval", str(scene), "--work-dir", str(work), "--codecs", "jpeg"]) == 0
    assert "jpeg: reusing" in capsys.readouterr().out  # same views, order and settings
    assert main(["eval", str(scene), "--work-dir", str(work), "--codecs", "jpeg", "--rerun"]) == 0
    assert "reusing" not in capsys.readouterr().out
    assert main(["eval", str(scene), "--work-dir", str(work), "--codecs", "webp"]) == 0
    assert "measured earlier on the same views: jpeg" in capsys.readouterr().out
    table = {row[0] for row in csv.reader((work / "eval" / "table.csv").open())}
    assert table == {"codec", "jpeg", "webp"}  # one more codec keeps the earlier one in the table
    assert main(["eval", str(scene), "--work-dir", str(work), "--codecs", "jpeg", "--order", "greedy"]) == 0
    out = capsys.readouterr().out
    assert "greedy order from the SfM cameras" in out and "reusing" not in out  # another order: re-measured
    assert json.loads((work / "eval" / "jpeg.json").read_text())["views"] == [names[0], names[2], names[1]]


def test_ssim_loss_matches_pytorch_msssim_and_has_its_gradient():
    import torch
    from pytorch_msssim import ssim as reference

    from pipelines.metrics import ssim

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 40, 56, generator=gen, dtype=torch.float64, requires_grad=True)
    y = (x.detach() + 0.1 * torch.randn(2, 3, 40, 56, generator=gen, dtype=torch.float64)).clamp(0, 1)
    ours, theirs = ssim(x, y), reference(x, y, data_range=1.0, size_average=True)
    assert float(ours) == pytest.approx(float(theirs), abs=1e-7)  # its window is built in float32
    (g_ours,) = torch.autograd.grad(ours, x)
    (g_theirs,) = torch.autograd.grad(theirs, x)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-9)
