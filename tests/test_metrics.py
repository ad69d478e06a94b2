"""The metrics behind the README's rate-distortion numbers (bench/rd.py): MS-SSIM, BD-rate, PSNR.

bench/rd_metrics.py (which bench/rd.py uses) implements MS-SSIM and BD-rate itself. The
properties below hold for any correct implementation and need no cross-check package (BD-rate
needs scipy, which rd_metrics.py interpolates with); where the bench extras are installed
(``pip install -e '.[bench]'``: pytorch-msssim, the implementation CompressAI uses, and
bjontegaard, with the JVET common-test-conditions piecewise-cubic interpolation) the same
functions are cross-checked against them, on the shipped Kodak image and on the curves of
bench/results/rd_kodak.json that the README quotes.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ncz.codec.train import psnr
from tests.conftest import REPO, load_bench

rd = load_bench("rd")
metrics = load_bench("rd_metrics")
RD_KODAK = json.loads((REPO / "bench" / "results" / "rd_kodak.json").read_text())
CURVE = ([0.15, 0.3, 0.6, 1.2, 2.0], [27.0, 30.1, 33.4, 36.2, 38.0])  # bpp, dB: a typical image codec's shape


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models: tests/conftest.py says why


def _kodim23() -> np.ndarray:
    from ncz.tools.quickstart import sample_image

    return np.asarray(Image.open(sample_image()).convert("RGB"))


def _noisy(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


# --- properties: no extra package needed ----------------------------------------------------------


def _scipy() -> None:
    pytest.importorskip("scipy", reason="bench/rd.py's BD-rate interpolates with scipy (bench extra)")


@pytest.mark.parametrize("method", ["pchip", "cubic"])
def test_bd_rate_of_a_curve_against_itself_is_zero(method):
    _scipy()
    assert metrics.bd_rate(*CURVE, *CURVE, method)["bd_rate"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("method", ["pchip", "cubic"])
def test_bd_rate_of_the_same_curve_at_ten_percent_lower_rate_is_minus_ten_percent(method):
    _scipy()
    cheaper = [0.9 * r for r in CURVE[0]]
    assert metrics.bd_rate(*CURVE, cheaper, CURVE[1], method)["bd_rate"] == pytest.approx(-10.0, abs=1e-6)
    assert metrics.bd_rate(cheaper, CURVE[1], *CURVE, method)["bd_rate"] == pytest.approx(100 / 9, abs=1e-6)


def test_ms_ssim_of_an_image_with_itself_is_one_and_falls_with_noise():
    image = _kodim23()[:256, :256]
    assert metrics.ms_ssim(image, image) == pytest.approx(1.0, abs=1e-6)
    scores = [metrics.ms_ssim(image, _noisy(image, sigma)) for sigma in (2, 5, 10, 20, 40)]
    assert all(1.0 > a > b > 0 for a, b in zip(scores, scores[1:])), scores


def test_bench_psnr_is_the_codec_psnr():
    """bench/rd.py still has its own PSNR (its owner is moving it); until then it must be the same function."""
    for mse in (0.5, 10.0, 123.4, 6502.0):
        assert metrics.psnr_from_mse(mse) == pytest.approx(psnr(mse, peak=255.0), rel=1e-12)
    assert metrics.psnr_from_mse(0.0) == psnr(0.0, peak=255.0) == math.inf


# --- cross-checks against the packages CompressAI and JVET use (bench extras) ----------------------

# Measured on kodim23 (768x512, Gaussian noise σ 5 and 20, JPEG quality 10 and 60): our MS-SSIM is
# within 1.9e-6 of pytorch-msssim in float32 and in float64. The whole difference is pytorch-msssim's
# Gaussian window, built in float32 (its weights sum to 1 - 3e-8): with that window ours agrees to 1e-15.
MS_SSIM_TOLERANCE = 5e-6
# bjontegaard's "pchip" is the same monotone piecewise cubic (scipy's PCHIP, integrated exactly) and its
# "cubic" the same VCEG-M33 polynomial: on the four curves of rd_kodak.json both agree to 1e-9 points.
BD_RATE_TOLERANCE = 1e-6


def _ms_ssim_cases() -> tuple[np.ndarray, list[np.ndarray]]:
    image = _kodim23()[128:384, 192:576]  # 256x384: every scale is still valid, a quarter of the time
    return image, [_noisy(image, 20, seed=1), _jpeg(image, 10)]


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float64)).permute(2, 0, 1)[None]


def _pytorch_msssim():
    return pytest.importorskip("pytorch_msssim", reason="bench extra: pip install -e '.[bench]'")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ms_ssim_agrees_with_pytorch_msssim(dtype):
    reference = _pytorch_msssim().ms_ssim
    image, distorted = _ms_ssim_cases()
    for other in distorted:
        ours = metrics.ms_ssim(image, other, dtype=dtype)
        theirs = float(reference(_tensor(image), _tensor(other), data_range=255.0, size_average=True))
        assert abs(ours - theirs) < MS_SSIM_TOLERANCE, (ours, theirs)


def test_ms_ssim_is_pytorch_msssim_exactly_given_its_window(monkeypatch):
    """Same scales, weights, pooling, clamping and statistics: only the window's rounding differs."""
    package = _pytorch_msssim()
    from pytorch_msssim.ssim import _fspecial_gauss_1d

    window = _fspecial_gauss_1d(11, 1.5).reshape(-1).double()
    monkeypatch.setattr(metrics, "_gaussian_window", lambda *args, **kwargs: window.clone())
    image, distorted = _ms_ssim_cases()
    ours = metrics.ms_ssim(image, distorted[0], dtype=torch.float64)
    theirs = float(package.ms_ssim(_tensor(image), _tensor(distorted[0]), data_range=255.0, size_average=True))
    assert abs(ours - theirs) < 1e-12, (ours, theirs)


@pytest.mark.parametrize("method", ["pchip", "cubic"])
@pytest.mark.parametrize("other", sorted(set(RD_KODAK["codecs"]) - {"ncz"}))
def test_bd_rate_agrees_with_bjontegaard_on_the_measured_curves(other, method):
    """The BD-rates bench/results/rd_kodak.json holds (ncz against each codec; the README quotes the
    PCHIP ones) as bjontegaard computes them."""
    bjontegaard = pytest.importorskip("bjontegaard", reason="bench extra: pip install -e '.[bench]'")
    anchor, test = RD_KODAK["codecs"][other], RD_KODAK["codecs"]["ncz"]
    ours = metrics.bd_rate(anchor["bpp"], anchor["psnr"], test["bpp"], test["psnr"], method)["bd_rate"]
    theirs = bjontegaard.bd_rate(anchor["bpp"], anchor["psnr"], test["bpp"], test["psnr"], method=method,
                                 require_matching_points=False, min_overlap=0)
    assert abs(ours - theirs) < BD_RATE_TOLERANCE, (ours, theirs)
    stored = RD_KODAK["bd_rate_vs"][other] if method == "pchip" else RD_KODAK["bd_rate_detail_cubic"][other]["bd_rate"]
    assert abs(ours - stored) < BD_RATE_TOLERANCE, (ours, stored)


def test_results_page_keeps_the_sections_other_benchmarks_own(tmp_path):
    """docs/RESULTS.md is written by bench/rd.py and holds bench/nlu.py's marked section too: a
    regenerated rate-distortion page must not drop it (nor duplicate it on the next run)."""
    page = tmp_path / "RESULTS.md"
    other = "<!-- nlu: generated by bench/nlu.py -->\n## NLU\n| a | 1 |\n<!-- /nlu -->"
    page.write_text(f"# Rate-distortion (old)\nold table\n\n{other}\n")
    rd._write_page(page, "# Rate-distortion\nnew table\n")
    rd._write_page(page, "# Rate-distortion\nnewer table\n")
    assert page.read_text() == f"# Rate-distortion\nnewer table\n\n{other}\n"
