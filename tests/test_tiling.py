"""Large images are one latent grid: no seams where the transforms' windows meet.

The transforms run in windows of 1024 px with a halo (codec/windows.py); the
result must equal the whole-image computation up to float rounding, and the
decoded image must not jump at any window boundary.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import ncz.format as nf
from ncz.codec import HyperpriorCodec, Pixels, decode_section, export_codec, load_codec
from ncz.codec.image import ImageEncoder, write_image_section
from ncz.codec.windows import STRIDE, WINDOW, analyze, synthesize

BOUNDARY = WINDOW * STRIDE  # 1024


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    torch.manual_seed(0)
    net = HyperpriorCodec(N=16, M=24).eval()
    path = tmp_path_factory.mktemp("w") / "tiny.ncz"
    export_codec(net, path, [torch.rand(1, 3, 128, 128)])
    return load_codec(path)


def _smooth_photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus a red stripe crossing the boundaries: seams would show as jumps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([128 + 100 * np.sin(xx / 97), 128 + 90 * np.cos(yy / 83), 128 + 60 * np.sin((xx + yy) / 131)], 2)
    stripe = np.abs((xx - 0.6 * yy) % 400 - 200) < 12
    rgb[stripe] = (220, 30, 30)
    return np.clip(rgb + rng.normal(0, 3, rgb.shape), 0, 255).astype(np.uint8)


def test_windowed_transforms_equal_the_whole_image(runtime):
    """2×2 windows: g_a and g_s by windows match one pass over the whole image (float rounding only)."""
    torch.manual_seed(1)
    x = torch.rand(1, 3, 1152, 1088)  # 72 × 68 latents: 2 × 2 windows

    def ga(t: torch.Tensor) -> torch.Tensor:
        return runtime.g_a(t.contiguous(memory_format=torch.channels_last)).contiguous()

    def gs(t: torch.Tensor) -> torch.Tensor:
        return runtime.g_s(t.contiguous(memory_format=torch.channels_last)).contiguous()

    with torch.no_grad():
        whole_y = ga(x)
        windowed_y = analyze(ga, x)
        torch.testing.assert_close(windowed_y, whole_y, rtol=1e-4, atol=1e-4 * float(whole_y.abs().max()))
        y = torch.round(whole_y * 4) / 4
        whole = (gs(y)[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)[:1100, :1070]
    windowed = synthesize(gs, y, (1100, 1070))
    assert np.abs(whole.astype(int) - windowed.astype(int)).max() <= 1


def test_large_image_has_no_seams_and_matches_an_untiled_decode(runtime):
    """An image spanning 2×2 windows: the gradient across each window boundary stays within the image's
    own spread of gradients, and the decode equals one whole-image synthesis within one level."""
    h, w = 1100, 1090
    rgb = _smooth_photo(h, w)
    buffer = io.BytesIO()
    with nf.Writer(buffer) as writer:
        write_image_section(writer, "img", runtime, Pixels(rgb), 3.0)
    with nf.open_bytes(buffer.getvalue()) as reader:
        decoded = decode_section(reader, "img", runtime).rgb.astype(np.int32)
    assert decoded.shape == rgb.shape

    # the same latents through one whole-image g_s: the windows must not change the result
    encoder = ImageEncoder(runtime, Pixels(rgb))
    y, z = encoder.latents(3.0)
    coded = runtime.latents.encode(y[0].numpy(), z[0].numpy())
    y_hat = torch.from_numpy(coded.y_hat.astype(np.float32))[None]
    whole = runtime.synthesize(y_hat, 3.0)[0, :, :h, :w].clamp(0, 1)
    whole = (whole.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.int32)
    assert np.abs(whole - decoded).max() <= 1

    # no jump at the boundary: the step across column/row 1023→1024 is like steps elsewhere
    col_steps = np.abs(np.diff(decoded, axis=1)).mean(axis=(0, 2))
    row_steps = np.abs(np.diff(decoded, axis=0)).mean(axis=(1, 2))
    for steps in (col_steps, row_steps):
        inside = np.delete(steps, BOUNDARY - 1)
        assert steps[BOUNDARY - 1] <= np.percentile(inside, 99) + 1.0, (steps[BOUNDARY - 1], np.percentile(inside, 99))


def test_layout_one_sections_are_refused_clearly(runtime):
    buffer = io.BytesIO()
    params = {"width": 64, "height": 64, "channels": 3, "quality": 1.0, "model": runtime.model_id,
              "weights": bytes.fromhex(runtime.weights_hash[:32]), "tile": 1024, "streams": [0, 0]}
    with nf.Writer(buffer) as writer:
        writer.add("img", b"", kind=nf.Kind.IMAGE, params=params, aligned=False)
    with nf.open_bytes(buffer.getvalue()) as reader, pytest.raises(nf.InputError, match="layout 1"):
        decode_section(reader, "img", runtime)


def test_pixel_limit_is_checked_before_decoding(runtime):
    buffer = io.BytesIO()
    with nf.Writer(buffer) as writer:
        write_image_section(writer, "img", runtime, Pixels(_smooth_photo(64, 96)), 1.0)
    with nf.open_bytes(buffer.getvalue()) as reader:
        with pytest.raises(nf.InputError, match="max_pixels"):
            decode_section(reader, "img", runtime, max_pixels=64 * 96 - 1)
        assert decode_section(reader, "img", runtime, max_pixels=64 * 96).rgb.shape == (64, 96, 3)


def test_integer_networks_give_the_same_integers_in_row_bands(runtime):
    """Banding bounds memory on large grids; the integer h_s must not notice it."""
    from ncz.codec import integer

    rng = np.random.default_rng(3)
    z = rng.integers(-6, 7, size=(16, 23, 9)).astype(np.int64)  # 23 z rows: several bands of 8
    old = integer.BAND_ROWS
    try:
        integer.BAND_ROWS = 10 ** 6
        whole = runtime.int_hs(z)
        integer.BAND_ROWS = 32  # bands of 8 z rows
        banded = runtime.int_hs(z)
    finally:
        integer.BAND_ROWS = old
    for a, b in zip(whole, banded):
        assert np.array_equal(a, b)


def test_verify_section_decodes_every_stream(runtime):
    """A y stream padded by 4 bytes (checksums valid) is caught without synthesizing pixels."""
    from ncz.codec.image import verify_section

    buffer = io.BytesIO()
    with nf.Writer(buffer) as writer:
        write_image_section(writer, "img", runtime, Pixels(_smooth_photo(64, 128)), 2.0)
    with nf.open_bytes(buffer.getvalue()) as reader:
        verify_section(reader, "img", runtime)
        params, payload = dict(reader.info("img").params), reader.read("img")
    params["streams"] = params["streams"][:-1] + [params["streams"][-1] + 4]
    padded = io.BytesIO()
    with nf.Writer(padded) as writer:
        writer.add("img", payload + b"\0\0\0\0", kind=nf.Kind.IMAGE, params=params, aligned=False)
    with nf.open_bytes(padded.getvalue()) as reader:
        reader.verify()  # the container is sound
        with pytest.raises(nf.NczError, match="y stream"):
            verify_section(reader, "img", runtime)
