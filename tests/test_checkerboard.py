"""The checkerboard context architecture end to end (tiny random model, fast).

A hyperprior turns into a checkerboard model without changing its function;
the coded streams decode to exactly what the encoder reconstructs; the
integer context agrees with the float one it was quantized from.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import ncz.format as nf
from ncz.codec import CodecConfig, Pixels, decode_section, export_codec, load_codec
from ncz.codec.architectures import CHECKERBOARD_ARCH, build_codec
from ncz.codec.context import anchor_mask
from ncz.codec.growth import add_checkerboard_context
from ncz.codec.image import ImageEncoder, write_image_section

TINY = dict(N=16, M=24)


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=2)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def checkerboard_weights(tmp_path_factory):
    torch.manual_seed(0)
    net = build_codec(CodecConfig(arch=CHECKERBOARD_ARCH, **TINY)).eval()
    with torch.no_grad():  # a context that matters: the trained-from-zero last layer made non-zero
        last = net.context_model.params[-1]
        last.weight.normal_(0, 0.05)
        last.bias.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("cb") / "tiny-cb.ncz"
    export_codec(net, path, [torch.rand(1, 3, 128, 128), torch.rand(1, 3, 64, 192)])
    return path, net


def test_hyperprior_state_becomes_the_same_checkerboard_function():
    torch.manual_seed(0)
    config = CodecConfig(**TINY)
    hyperprior = build_codec(config).eval()
    state = {"model_config": config.to_dict(), "model": hyperprior.state_dict(), "optimizer": {"x": 1},
             "ema": hyperprior.state_dict()}
    upgraded = add_checkerboard_context(state)
    assert "optimizer" not in upgraded and upgraded["model_config"]["arch"] == CHECKERBOARD_ARCH
    checkerboard = build_codec(CodecConfig.from_dict(upgraded["model_config"])).eval()
    checkerboard.load_state_dict(upgraded["model"])
    x = torch.rand(2, 3, 64, 128)
    with torch.no_grad():
        a, lik_a = hyperprior(x, 2.0)
        b, lik_b = checkerboard(x, 2.0)
    assert torch.equal(a, b) and torch.equal(lik_a["y"], lik_b["y"]) and torch.equal(lik_a["z"], lik_b["z"])


def test_context_sees_only_anchors():
    torch.manual_seed(1)
    net = build_codec(CodecConfig(arch=CHECKERBOARD_ARCH, **TINY)).eval()
    net.context_model.params[-1].weight.data.normal_(0, 0.1)
    mean, raw = torch.zeros(1, 24, 8, 8), torch.ones(1, 24, 8, 8)
    y = torch.randn(1, 24, 8, 8)
    anchors = anchor_mask(8, 8)
    m1, s1 = net.context_params(y, mean, raw)
    m2, s2 = net.context_params(y * anchors + 5 * (1 - anchors), mean, raw)  # non-anchor values must not matter
    assert torch.equal(m1, m2) and torch.equal(s1, s2)
    assert torch.equal(m1 * anchors, mean * anchors)  # anchors keep the hyperprior's parameters
    assert not torch.equal(m1, mean)


def test_streams_round_trip_exactly(checkerboard_weights):
    path, _ = checkerboard_weights
    runtime = load_codec(path)
    assert runtime.latents.stream_names == ("z", "y-anchors", "y-rest")
    pixels = Pixels(_photo(70, 150, seed=2))
    encoder = ImageEncoder(runtime, pixels)
    y, z = encoder.latents(2.5)
    coded = runtime.latents.encode(y[0].numpy(), z[0].numpy())
    decoded = runtime.latents.decode(coded.streams, encoder.shape, "test")
    assert np.array_equal(decoded, coded.y_hat)
    buffer = io.BytesIO()
    with nf.Writer(buffer) as writer:
        write_image_section(writer, "img", runtime, pixels, 2.5)
    with nf.open_bytes(buffer.getvalue()) as reader:
        assert len(reader.info("img").params["streams"]) == 3
        out = decode_section(reader, "img", runtime)
    assert out.rgb.shape == pixels.rgb.shape


def test_integer_context_tracks_the_float_one_and_bands_exactly(checkerboard_weights):
    from ncz.codec import integer

    path, net = checkerboard_weights
    runtime = load_codec(path)
    torch.manual_seed(4)
    x = torch.rand(1, 3, 128, 192)
    with torch.no_grad():
        y = net.analysis(x, 3.0).double()
        mean, raw = (torch.from_numpy(v) for v in runtime.int_hs(torch.round(net.hyper_analysis(y.float()))[0]))
        y_anchor = (torch.round(y - mean) + mean) * anchor_mask(*y.shape[-2:]).double()
        d_mean_f, d_scale_f = net.context_model(y_anchor.float(), mean.float(), raw.float())
    d_mean, d_scale = runtime.int_context(y_anchor.numpy(), mean.numpy(), raw.numpy())
    rest = ~anchor_mask(*y.shape[-2:]).numpy()[0, 0].astype(bool)  # the context serves the non-anchors
    for exact, approx in ((d_mean, d_mean_f), (d_scale, d_scale_f)):
        exact, approx = exact[0][:, rest], approx.numpy()[0][:, rest]
        assert np.abs(exact - approx).max() < 0.05 * max(np.abs(approx).max(), 1e-3)
    old = integer.BAND_ROWS
    try:
        integer.BAND_ROWS = 3  # 8 latent rows in bands of 3
        banded = runtime.int_context(y_anchor.numpy(), mean.numpy(), raw.numpy())
    finally:
        integer.BAND_ROWS = old
    assert np.array_equal(banded[0], d_mean) and np.array_equal(banded[1], d_scale)
    # the fast path (non-anchors, non-zero taps) is the dense convolution's function, exactly
    dense = runtime.int_context.dense(y_anchor[0].numpy(), mean[0].numpy(), raw[0].numpy())
    assert np.array_equal(dense[0][0][:, rest], d_mean[0][:, rest])
    assert np.array_equal(dense[1][0][:, rest], d_scale[0][:, rest])


def test_context_trains_at_its_own_learning_rate(tmp_path):
    from ncz.codec.train import TrainConfig, Trainer

    images = [torch.from_numpy(_photo(96, 96, seed=s)).permute(2, 0, 1).contiguous() for s in range(2)]
    cfg = TrainConfig(out_dir=str(tmp_path), steps=10, batch_size=2, crop=64, lr=1e-4, warmup_steps=0, bf16=False,
                      channels_last=False, ckpt_every=0, ckpt_seconds=1e9, keep_every=0, eval_every=0, log_every=0,
                      context_lr_scale=10.0, **TINY)
    trainer = Trainer(cfg, model_config=CodecConfig(arch=CHECKERBOARD_ARCH, **TINY), images=images, eval_images=[])
    trainer.train_step()
    rates = sorted(group["lr"] for group in trainer.optimizer.param_groups)
    assert rates == [1e-4, pytest.approx(1e-3)]
    context_ids = {id(p) for p in trainer.model.context_model.parameters()}
    fast = [g for g in trainer.optimizer.param_groups if g["lr_scale"] == 10.0][0]
    assert {id(p) for p in fast["params"]} == context_ids


def test_context_surrogate_tracks_the_integer_context(checkerboard_weights):
    """SGA differentiates through the surrogate: it must agree with what the coder computes."""
    from ncz.codec.context import ContextSurrogate

    path, net = checkerboard_weights
    runtime = load_codec(path)
    torch.manual_seed(5)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        y = net.analysis(x, 2.0).double()
        mean, raw = (torch.from_numpy(v) for v in runtime.int_hs(torch.round(net.hyper_analysis(y.float()))[0]))
        y_anchor = (torch.round(y - mean) + mean) * anchor_mask(*y.shape[-2:]).double()
        approx = ContextSurrogate(runtime.int_context)(y_anchor.float(), mean.float(), raw.float())
    exact = runtime.int_context(y_anchor.numpy(), mean.numpy(), raw.numpy())
    rest = ~anchor_mask(*y.shape[-2:]).numpy()[0, 0].astype(bool)
    for e, a in zip(exact, approx):
        e, a = e[0][:, rest], a.numpy()[0][:, rest]
        assert np.abs(e - a).max() < 0.02 * max(np.abs(e).max(), 1e-3)
