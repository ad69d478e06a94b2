"""SGA latent refinement (codec/refine.py): the schedules, the time budget, progress reports, and that
what the encoder estimates and reconstructs is what the file holds. Tiny random models (fast); the
rate check runs the shipped weights on a Kodak crop when ../shared is present."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import time

import numpy as np
import pytest
import torch
from conftest import VECTORS, shared_data

import ncz.format as nf
from ncz.codec import CodecConfig, HyperpriorCodec, Pixels, export_codec, load_codec
from ncz.codec.context import anchor_mask
from ncz.codec.image import ImageEncoder, decode_section, write_image_section
from ncz.codec.layers import lower_bound
from ncz.codec.networks import gaussian_likelihood
from ncz.codec.refine import SGAProgress, SGASchedule, _Relaxation, refine_latents

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models: tests/conftest.py says why


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    net = HyperpriorCodec(CodecConfig(N=16, M=24)).eval()
    path = tmp_path_factory.mktemp("w") / "tiny.ncz"
    export_codec(net, path, [torch.rand(1, 3, 128, 128)])
    return load_codec(path)


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=2)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def _padded(rgb: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0)[None]
    h, w = rgb.shape[:2]
    return torch.nn.functional.pad(x, (0, (-w) % 64, 0, (-h) % 64), mode="replicate")


def _decode_refined(runtime, pixels: Pixels, quality: float, result) -> tuple[np.ndarray, int]:
    """Code ``result``'s latents into an image section as any encoder would, decode it: (pixels, payload bytes)."""
    plain = ImageEncoder(runtime, pixels).encode(quality)
    coded = runtime.latents.encode(result.y[0].numpy(), result.z[0].numpy())
    params = {**plain.params, "streams": [len(s) for s in coded.streams]}
    payload = b"".join(coded.streams)
    buffer = io.BytesIO()
    with nf.Writer(buffer) as writer:
        write_image_section(writer, "img", runtime, pixels, quality, encoded=(params, payload))
    with nf.open_bytes(buffer.getvalue()) as reader:
        return decode_section(reader, "img", runtime).rgb, len(payload)


def test_paper_schedule_is_the_papers():
    """Yang, Bamler & Mandt 2020: 2,000 Adam steps at 5e-3 on y and z, τ = min(0.5, 0.5·exp(−0.001·(t − 700)))."""
    s = SGASchedule.paper()
    assert (s.iterations, s.lr, s.lr_end, s.optimize_z) == (2000, 0.005, 1.0, True)
    for t in (0, 350, 700, 701, 1000, 1500, 1999):
        assert s.temperature(t) == pytest.approx(min(0.5, 0.5 * math.exp(-0.001 * (t - 700))), rel=1e-12)
    assert {s.learning_rate_at(p) for p in (0.0, 0.3, 1.0)} == {0.005}
    short = SGASchedule.paper(500)  # the same shape, stretched
    assert short.temperature(175) == 0.5 and short.temperature(499) == pytest.approx(s.temperature(1999), rel=0.01)


def test_default_schedule_values_and_shape():
    s = SGASchedule.default()
    assert s == SGASchedule(iterations=200, lr=0.03, tau_max=0.5, tau_min=0.15, warmup=0.3, lr_end=0.1,
                            optimize_z=False, checks=4)
    taus = [s.temperature(t) for t in range(s.iterations)]
    assert taus[0] == s.tau_max and taus[-1] == pytest.approx(s.tau_min)
    assert all(a >= b for a, b in zip(taus, taus[1:]))
    assert all(tau == s.tau_max for t, tau in enumerate(taus) if s.progress(t) <= s.warmup)
    lrs = [s.learning_rate_at(p) for p in np.linspace(0, 1, 11)]
    assert lrs[0] == pytest.approx(s.lr) and lrs[-1] == pytest.approx(s.lr * s.lr_end)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    points = s.check_points()
    assert len(points) == s.checks - 1 and all(s.warmup < p < 1 for p in points)
    for bad in (dict(iterations=0), dict(lr=0.0), dict(tau_min=1.0), dict(lr_end=0.0), dict(lr_end=1.5),
                dict(time_budget=0.0), dict(time_budget=math.inf), dict(checks=0), dict(warmup=1.0)):
        with pytest.raises(nf.UsageError):
            dataclasses.replace(s, **bad)


def test_time_budget_stops_early_and_keeps_the_best(tiny):
    x = _padded(_photo(64, 96, seed=1))
    refine_latents(tiny, x, (64, 96), 1.0, SGASchedule(2))  # first calls pick kernels: not part of the budget
    schedule = SGASchedule(100_000, lr=0.02, time_budget=1.5, checks=10)
    start = time.perf_counter()
    result = refine_latents(tiny, x, (64, 96), 1.0, schedule)
    elapsed = time.perf_counter() - start
    assert 0 < result.steps < schedule.iterations
    assert elapsed < 1.5 + 1.5  # slack for one step and one evaluation on a loaded machine
    steps = [step for step, _ in result.evaluations]
    assert steps[0] == 0 and steps[-1] == result.steps and len(steps) >= 3
    assert steps == sorted(set(steps))  # checks crossed together are one evaluation
    assert result.evaluations[0][1] == result.loss_before
    assert result.loss_after == min(loss for _, loss in result.evaluations) <= result.loss_before


def test_refinement_that_does_not_pay_returns_the_amortized_latents(tiny):
    """Steps far too large only make the latents worse: every evaluation loses to g_a's, which are returned."""
    rgb = _photo(64, 64, seed=2)
    x = _padded(rgb)
    result = refine_latents(tiny, x, (64, 64), 1.0, SGASchedule(6, lr=20.0, checks=3))
    assert not result.improved and result.loss_after == result.loss_before
    assert all(loss > result.loss_before for _, loss in result.evaluations[1:])
    y0 = tiny.analyze(x, 1.0)
    assert torch.equal(result.y, y0) and torch.equal(result.z, torch.round(tiny.net.hyper_analysis(y0)))


def test_progress_reports(tiny):
    rgb = _photo(64, 96, seed=3)
    schedule = SGASchedule(12, checks=3)
    reports: list[SGAProgress] = []
    calls: list[tuple[int, int]] = []
    result = refine_latents(tiny, _padded(rgb), (64, 96), 2.0, schedule,
                            progress=lambda done, total: calls.append((done, total)), report=reports.append)
    assert [r.step for r in reports] == list(range(1, 13)) and {r.total for r in reports} == {12}
    fractions = [r.fraction for r in reports]
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] == 1.0
    for r in reports:
        assert r.temperature == schedule.temperature_at(r.fraction)
        assert math.isfinite(r.loss) and r.bpp > 0 and 0 < r.psnr < 100 and r.elapsed > 0
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and calls[-1] == (12, 12)
    assert result.steps == 12 and len(result.evaluations) == 1 + 2 + 1  # g_a's, two checks, the end


def test_file_decodes_to_what_the_encoder_reconstructed(tiny):
    """Padding, 8-bit rounding and the latent coder: the encoder's reconstruction and estimate are the file's."""
    rgb = _photo(80, 112, seed=4)
    result = refine_latents(tiny, _padded(rgb), (80, 112), 1.5, SGASchedule(10, checks=2))
    decoded, payload = _decode_refined(tiny, Pixels(rgb), 1.5, result)
    assert np.array_equal(decoded, result.pixels)
    assert result.bpp == 8.0 * payload / (80 * 112)
    mse = np.mean((decoded.astype(np.float64) - rgb) ** 2)
    assert result.psnr == pytest.approx(10 * math.log10(255.0 ** 2 / mse), rel=1e-9)
    again = refine_latents(tiny, _padded(rgb), (80, 112), 1.5, SGASchedule(10, checks=2))
    assert torch.equal(again.y, result.y)  # seeded noise: the same latents every run


def test_estimated_rate_is_the_file_rate_with_the_shipped_weights():
    """On a photo crop with the shipped weights: the rate the loop optimizes (ideal code length of the
    hard-rounded latents) is within 1 % of the coded payload, and the reported rate is the payload."""
    from PIL import Image

    runtime = load_codec()
    with Image.open(shared_data("kodak", "kodim23.png")) as im:
        rgb = np.asarray(im.convert("RGB"))[128:384, 256:512].copy()
    quality = 3.0
    result = refine_latents(runtime, _padded(rgb), (256, 256), quality, SGASchedule(6, checks=2))
    decoded, payload = _decode_refined(runtime, Pixels(rgb), quality, result)
    assert result.bpp == 8.0 * payload / (256 * 256) and np.array_equal(decoded, result.pixels)
    cfg = runtime.config
    mean, raw_scale = (torch.from_numpy(v).float() for v in runtime.int_hs(result.z[0].numpy().astype(np.int64)))
    y_hat, mean, raw_scale = _Relaxation(runtime, *result.y.shape[2:], torch.device("cpu"))(  # either architecture
        result.y, mean, raw_scale, 1e-4, torch.Generator().manual_seed(0))
    bits = -(torch.log2(gaussian_likelihood(y_hat, mean, lower_bound(raw_scale, cfg.scale_bound), cfg.scale_bound,
                                            cfg.likelihood_bound)).sum()
             + torch.log2(runtime.net.entropy_bottleneck.likelihood(result.z, cfg.likelihood_bound)).sum())
    assert abs(8 * payload / float(bits) - 1) < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_refinement_codes_an_ordinary_file(tiny):
    """Networks on CUDA: refinement runs there, the latents come back to the CPU coder, the file decodes."""
    runtime = dataclasses.replace(tiny, net=copy.deepcopy(tiny.net).cuda(), g_a=copy.deepcopy(tiny.g_a).cuda(),
                                  g_s=copy.deepcopy(tiny.g_s).cuda())
    rgb = _photo(64, 96, seed=5)
    result = refine_latents(runtime, _padded(rgb), (64, 96), 1.0, SGASchedule(10, checks=2))
    assert result.y.device.type == "cpu" and result.z.device.type == "cpu"
    decoded, payload = _decode_refined(tiny, Pixels(rgb), 1.0, result)
    assert result.bpp == 8.0 * payload / (64 * 96)
    assert np.abs(decoded.astype(int) - result.pixels.astype(int)).max() <= 1  # CUDA vs CPU g_s rounding


def test_loop_synthesis_has_the_coding_synthesis_gradients(tiny):
    """The loop's g_s (bfloat16, hand-written inverse-GDN backward) against autograd through the coding g_s."""
    from ncz.codec.refine import _GradientSynthesis

    torch.manual_seed(3)
    y = torch.randn(1, 24, 6, 8) * 3
    reference = y.clone().requires_grad_(True)
    expected = tiny.g_s(reference.contiguous(memory_format=torch.channels_last))
    expected.square().mean().backward()
    for bf16, tolerance in ((False, 1e-5), (True, 0.02)):
        synthesis = _GradientSynthesis(tiny.g_s, torch.device("cpu"), bf16)
        assert synthesis.layers is not None  # the layout was recognized, not the autocast fallback
        variable = y.clone().requires_grad_(True)
        out = synthesis(variable)
        out.square().mean().backward()
        assert (out - expected).norm() < tolerance * expected.norm()
        assert (variable.grad - reference.grad).norm() < tolerance * reference.grad.norm()


def test_checkerboard_loop_counts_the_rate_the_coder_pays():
    """Checkerboard weights: at a near-zero temperature the loop's relaxed latents are the coder's
    quantized ones, their means and scales the integer context's up to its activation steps, and
    their ideal code length is within 1 % of what those parameters give (the context term is in)."""
    runtime = load_codec(VECTORS / "codec-tiny-checkerboard.ncz")
    encoder = ImageEncoder(runtime, Pixels(_photo(128, 192, seed=9)))
    y, z = encoder.latents(4.0)
    z = torch.round(z)
    mean, raw_scale = (torch.from_numpy(v).float() for v in runtime.int_hs(z[0].numpy().astype(np.int64)))
    y_t, loop_mean, loop_scale = _Relaxation(runtime, y.shape[2], y.shape[3], torch.device("cpu"))(
        y, mean, raw_scale, 1e-4, torch.Generator().manual_seed(0))
    coded = runtime.latents.encode(y[0].double().numpy(), z[0].numpy())
    anchors = anchor_mask(y.shape[2], y.shape[3]).bool()[0, 0]
    y_hat = torch.from_numpy(coded.y_hat).float()
    assert torch.allclose(y_t[0], y_hat, atol=1e-3)  # non-anchors too: rounded around the context's mean
    d_mean, d_scale = runtime.int_context(np.where(anchors.numpy(), coded.y_hat, 0.0), mean.numpy(), raw_scale.numpy())
    coder_mean = torch.where(anchors, mean, mean + torch.from_numpy(d_mean).float())
    coder_scale = torch.where(anchors, raw_scale, raw_scale + torch.from_numpy(d_scale).float())
    assert float((coder_mean - mean)[0][:, ~anchors].abs().max()) > 0.05  # the context moves the means
    assert float((loop_mean - coder_mean).abs().max()) < 1e-3
    assert float((loop_scale - coder_scale).abs().max()) < 1e-3
    cfg = runtime.config

    def bits(values, m, s):
        return float(-torch.log2(gaussian_likelihood(values, m, lower_bound(s, cfg.scale_bound), cfg.scale_bound,
                                                     cfg.likelihood_bound)).sum())

    assert bits(y_t, loop_mean, loop_scale) == pytest.approx(bits(y_hat[None], coder_mean, coder_scale), rel=0.01)


def test_checkerboard_refinement_codes_a_file_that_decodes_exactly():
    runtime = load_codec(VECTORS / "codec-tiny-checkerboard.ncz")
    rgb = _photo(96, 128, seed=10)
    result = refine_latents(runtime, _padded(rgb), (96, 128), 3.0, SGASchedule(8, checks=2))
    decoded, payload = _decode_refined(runtime, Pixels(rgb), 3.0, result)
    assert np.array_equal(decoded, result.pixels) and result.bpp == 8.0 * payload / (96 * 128)
