"""Single-view codec: shapes, gain interpolation, exact coding across processes, weights, metrics."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lmvic  # noqa: F401
from lmvic.layers import EntropyParameters, GainUnit
from lmvic.models.bitstream import BitstreamError, ImageStream
from lmvic.exact import fixed_threads
from lmvic.entropy_models import bits_per_pixel
from lmvic.models.single_view import SingleViewCodec
from lmvic.zoo import WEIGHTS_DIR, WeightsError, export_single_view, load_single_view
from pipelines.metrics import bpp, ms_ssim, psnr

KODAK = Path("/work/shared/kodak")
SHIPPED = "single_view_cpu"
LAMBDAS = (0.001, 0.004, 0.016)


@pytest.fixture(scope="module")
def tiny() -> SingleViewCodec:
    torch.manual_seed(0)
    return SingleViewCodec(N=16, M=24, lambdas=LAMBDAS)


def shipped_model() -> SingleViewCodec:
    if not (WEIGHTS_DIR / f"{SHIPPED}.pt").exists():
        pytest.skip("shipped weights lmvic/weights/single_view_cpu.pt not present")
    return load_single_view(SHIPPED)


def test_stage_features_have_the_documented_resolutions(tiny):
    x = torch.rand(2, 3, 64, 128)
    enc = tiny.analyse(x)
    assert [f.shape for f in enc] == [(2, 16, 32, 64), (2, 16, 16, 32), (2, 16, 8, 16), (2, 24, 4, 8)]
    dec = tiny.synthesise(enc[-1])
    assert [f.shape for f in dec] == [(2, 16, 8, 16), (2, 16, 16, 32), (2, 16, 32, 64), (2, 3, 64, 128)]
    out = tiny(x, torch.tensor([1.0, 3.0]))
    assert out["x_hat"].shape == x.shape
    assert out["likelihoods"]["y"].shape == (2, 24, 4, 8)
    assert out["likelihoods"]["z"].shape == (2, 16, 1, 2)


def test_gain_interpolation_is_geometric():
    g = GainUnit(torch.log(torch.tensor([1.0, 4.0, 16.0])), channels=2)
    got = g.gains(torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0]))[:, 0, 0, 0]
    assert torch.allclose(got, torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0]))


def test_lambda_interpolates_between_levels(tiny):
    lam = tiny.lambda_of(torch.tensor([1.0, 1.5, 3.0]), 3)
    assert torch.allclose(lam, torch.tensor([0.001, 0.002, 0.016]), rtol=1e-5)
    with pytest.raises(ValueError):
        tiny.levels(0.5, 1)


def test_entropy_parameters_take_context_channels():
    ep = EntropyParameters(hyper_ch=8, M=4, context_ch=3)
    scales, means = ep(torch.rand(1, 8, 5, 6), torch.rand(1, 3, 5, 6))
    assert scales.shape == means.shape == (1, 4, 5, 6)
    with pytest.raises(ValueError):
        ep(torch.rand(1, 8, 5, 6))


def test_compress_decompress_matches_encoder_latent(tiny):
    tiny.update(force=True)
    tiny.eval()
    x = torch.rand(1, 3, 64, 128)
    with torch.no_grad():
        strings, shape, y_hat = tiny.encode_latent(x, 2)
        y_dec = tiny.decode_latent(strings, shape, 2)
        assert torch.equal(y_hat, y_dec)
        # hard-quantised forward ≈ coded path (float32 vs float64 parameters)
        ref = tiny(x, 2)["x_hat"].clamp(0, 1)
        got = tiny.decompress(strings, shape, 2)["x_hat"]
    assert (ref - got).abs().max() < 1e-3
    tiny.train()


def test_qpem_codec_starts_as_the_hyperprior_and_round_trips():
    """The QPEM entropy model: zero-initialised it codes the hyperprior's ŷ exactly (in five strings);
    trained (perturbed) it still decodes the encoder's ŷ bit for bit."""
    torch.manual_seed(0)
    plain = SingleViewCodec(N=16, M=24, lambdas=LAMBDAS).eval()
    qpem = SingleViewCodec(N=16, M=24, lambdas=LAMBDAS, entropy="qpem").eval()
    missing, _ = qpem.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(k.startswith("qpem.") for k in missing)
    plain.update(force=True)
    qpem.update(force=True)
    x = torch.rand(1, 3, 64, 128)
    with torch.no_grad():
        _, _, y_plain = plain.encode_latent(x, 2)
        strings, shape, y_hat = qpem.encode_latent(x, 2)
        assert len(strings) == qpem.num_strings == 5 and plain.num_strings == 2
        assert torch.equal(y_plain, y_hat)
        for step in qpem.qpem.steps:
            step.net[-1].weight.normal_(0, 0.05)
        strings, shape, y_hat = qpem.encode_latent(x, 2)
        assert not torch.equal(y_plain, y_hat)
        assert torch.equal(qpem.decode_latent(strings, shape, 2), y_hat)
        with pytest.raises(ValueError, match="expected 5 strings"):
            qpem.decode_latent(strings[:2], shape, 2)
    with pytest.raises(ValueError, match="entropy"):
        SingleViewCodec(N=16, M=24, lambdas=LAMBDAS, entropy="context")


def test_bitstream_rejects_bad_input():
    for chunks in ((b"yy", b"zzz"), (b"a", b"", b"ccc", b"d", b"zz")):
        data = ImageStream(3, 10, 20, chunks).to_bytes()
        s = ImageStream.from_bytes(data)
        assert (s.quality, s.height, s.width, s.chunks) == (3, 10, 20, chunks)
        assert len(data) == s.header_bytes + sum(map(len, chunks))
    no_chunks = data[:9] + bytes([0]) + data[10:]
    for bad in (data[:5], b"XXX" + data[3:], data[:3] + bytes([9]) + data[4:], data[:12], data[:s.header_bytes + 3],
                no_chunks):
        with pytest.raises(BitstreamError):
            ImageStream.from_bytes(bad)


def test_weights_missing_or_corrupt_raise_clear_errors(tmp_path):
    from lmvic.models.single_view import build_single_view

    with pytest.raises(WeightsError, match="not found"):
        load_single_view("nothing", tmp_path)
    torch.manual_seed(1)
    m = build_single_view("cpu", LAMBDAS)
    export_single_view(m.state_dict(), "cpu", LAMBDAS, "w", directory=tmp_path)
    assert load_single_view("w", tmp_path).num_qualities == 3
    raw = bytearray((tmp_path / "w.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "w.pt").write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="corrupt"):
        load_single_view("w", tmp_path)


def test_rebase_repoints_a_dependent_model_only_when_its_base_weights_are_unchanged(tmp_path):
    from compressai.models import CompressionModel
    from lmvic.models.single_view import build_single_view
    from lmvic.zoo import base_reference, load_base, read_weights, rebase, write_weights

    torch.manual_seed(2)
    base = build_single_view("cpu", LAMBDAS)
    export_single_view(base.state_dict(), "cpu", LAMBDAS, "b", directory=tmp_path)
    (tmp_path / "old").mkdir()
    for suffix in (".pt", ".json"):
        (tmp_path / "old" / f"b{suffix}").write_bytes((tmp_path / f"b{suffix}").read_bytes())
    dependent = CompressionModel()  # what a model built on "b" adds: here one layer
    dependent.layer = torch.nn.Linear(2, 2)
    write_weights(dependent, tmp_path / "dep.pt", {"format": 7, **base_reference("b", tmp_path)}, {})
    # the base gains a trained QPEM, everything else unchanged: the dependent model is re-pointed
    with_qpem = build_single_view("cpu", LAMBDAS, entropy="qpem")
    with_qpem.load_state_dict(load_single_view("b", tmp_path).state_dict(), strict=False)
    torch.nn.init.normal_(with_qpem.qpem.steps[0].linear.weight, std=0.01)
    export_single_view(with_qpem.state_dict(), "cpu", LAMBDAS, "b", directory=tmp_path, entropy="qpem")
    with pytest.raises(WeightsError, match="other 'b' weights"):
        load_base(read_weights(tmp_path / "dep.pt", 7, "dep"), "dep", tmp_path)
    rebase("dep", tmp_path / "old" / "b.pt", tmp_path)
    assert load_base(read_weights(tmp_path / "dep.pt", 7, "dep"), "dep", tmp_path).qpem is not None
    # a base whose transforms changed cannot be re-pointed to
    changed = load_single_view("b", tmp_path).state_dict()
    changed["analysis.0.0.weight"] += 1
    export_single_view(changed, "cpu", LAMBDAS, "b", directory=tmp_path, entropy="qpem")
    with pytest.raises(WeightsError, match="re-training"):
        rebase("dep", tmp_path / "old" / "b.pt", tmp_path)


def test_metrics_closed_form():
    a = np.full((200, 200, 3), 100, np.uint8)
    assert psnr(a, a + 1) == pytest.approx(10 * math.log10(255**2))
    assert psnr(a, a) == math.inf
    assert bpp(1000, 100, 80) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    b = rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)
    assert ms_ssim(b, b) == pytest.approx(1.0)
    assert ms_ssim(b, np.clip(b.astype(int) + rng.integers(-40, 40, b.shape), 0, 255).astype(np.uint8)) < 0.99


DECODE_SCRIPT = """
import sys, numpy as np, torch
torch.set_num_threads(int(sys.argv[3]))
import lmvic
from lmvic.zoo import load_single_view
from pipelines.commands.eval_image import decode_image, encode_image
m = load_single_view("single_view_cpu")
data = open(sys.argv[1], "rb").read()
rec = decode_image(m, data)
np.save(sys.argv[2], rec)
assert encode_image(m, np.load(sys.argv[2] + ".src.npy"), data[4]) == data, "re-encode differs"
"""


@pytest.mark.skipif(not KODAK.is_dir(), reason="Kodak not available at /work/shared/kodak")
def test_shipped_weights_decode_bit_exactly_in_another_process(tmp_path):
    from pipelines.commands.eval_image import decode_image, encode_image, read_image

    model = shipped_model()
    img = np.ascontiguousarray(read_image(KODAK / "kodim23.png")[:192, :256])  # not a multiple of 64 in H
    with fixed_threads(2):  # the decoding process below runs on 1 thread
        data = encode_image(model, img, 3)
        rec = decode_image(model, data)
    (tmp_path / "s.bin").write_bytes(data)
    np.save(tmp_path / "rec.npy.src.npy", img)
    subprocess.run([sys.executable, "-c", DECODE_SCRIPT, str(tmp_path / "s.bin"), str(tmp_path / "rec.npy"), "1"],
                   check=True, cwd=Path(__file__).parents[1])
    assert np.array_equal(np.load(tmp_path / "rec.npy"), rec)
    assert psnr(img, rec) > 20


@pytest.mark.skipif(not KODAK.is_dir(), reason="Kodak not available at /work/shared/kodak")
def test_shipped_likelihoods_predict_the_bytes():
    from pipelines.commands.eval_image import encode_image, read_image

    model = shipped_model()
    img = np.ascontiguousarray(read_image(KODAK / "kodim05.png")[:256, :256])
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    for q in (1, model.num_qualities):
        with torch.no_grad():
            est_bits = float(bits_per_pixel(model(x, q)["likelihoods"], 1))
        data = encode_image(model, img, q)
        real_bits = 8 * (len(data) - ImageStream.from_bytes(data).header_bytes)
        assert abs(real_bits - est_bits) / est_bits < 0.05
