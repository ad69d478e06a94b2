"""Golden vectors of image sections (FORMAT.md §5.3, layout 2), one per codec architecture.

``python -m ncz.tools.make_vectors`` registers them through :func:`register_vectors`:

- ``codec-tiny-hyperprior`` / ``codec-tiny-checkerboard``: tiny weights (N=16, M=24) of
  each architecture in :data:`ncz.codec.architectures.ARCHITECTURES`; the hyperprior is
  trained for 60 steps (an untrained one decoded two different small images to the same
  pixels; the codec tests use these weights too), the checkerboard is the same model with a
  context whose last layer is non-zero (so the context changes the coded means and scales);
- ``codec-image-hyperprior``: a 70×45 crop of kodim23 with an alpha plane, quality 5.75;
  ``codec-image-checkerboard``: a 53×67 grayscale crop, quality 5.25.

These vectors are built once and then only decoded: the exporter's calibration and the
encoder's g_a run in float32, so another CPU would write other bytes. What they pin is the
decoding. Their JSON holds the sha256 of ŷ (float64; exact on every machine, since every
number that reaches it comes from the integer networks) and of the 8-bit pixels (g_s runs
in float32: exact on this kind of CPU, while another may differ by one level, docs/CODEC.md);
the PNG beside each image vector holds those pixels, so a difference can be measured.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ncz.format import Writer, open_bytes

from .api import image_names
from .architectures import CHECKERBOARD_ARCH, HYPERPRIOR_ARCH, build_codec
from .image import decode_latents, decode_section, write_image_section
from .imageio import Pixels
from .networks import CodecConfig, HyperpriorCodec
from .weights import export_codec, load_codec

__all__ = ["WEIGHTS", "IMAGES", "register_vectors", "decoded_image", "decoded_pixels", "expected_pixels",
           "synthetic_photo"]

Register = Callable[..., None]  # make_vectors.register(name, metadata, fill, decoded=..., built_once=...)

BUILT_ONCE = ("the exporter's calibration and g_a run in float32, so the bytes depend on the CPU; "
              "built once with the committed weights and only decoded since")

#: weights vector -> architecture
WEIGHTS = {"codec-tiny-hyperprior": HYPERPRIOR_ARCH, "codec-tiny-checkerboard": CHECKERBOARD_ARCH}
#: image vector -> (weights vector, crop of kodim23 (left, top, width, height), grayscale, alpha, quality)
IMAGES = {
    "codec-image-hyperprior": ("codec-tiny-hyperprior", (300, 110, 70, 45), False, True, 5.75),
    "codec-image-checkerboard": ("codec-tiny-checkerboard", (520, 260, 53, 67), True, False, 5.25),
}
TINY = {"N": 16, "M": 24}


def synthetic_photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Gradients plus noise, uint8 (h, w, 3): what the tiny hyperprior is trained on."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=2)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def _training_images() -> list[torch.Tensor]:
    return [torch.from_numpy(synthetic_photo(96, 160, seed=s)).permute(2, 0, 1).contiguous() for s in range(4)]


def _calibration() -> list[torch.Tensor]:
    return [image[None, :, :64, :128].float() / 255 for image in _training_images()]


def _trained_hyperprior() -> HyperpriorCodec:
    """60 steps at lr 5e-3 on four synthetic photos: a wide amortization gap, as in any briefly
    trained codec (tests/test_codec.py's SGA tests rely on that)."""
    from .train import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as folder:
        cfg = TrainConfig(out_dir=folder, steps=100, batch_size=4, crop=64, lr=5e-3, warmup_steps=0, bf16=False,
                          channels_last=False, seed=1, ckpt_every=0, ckpt_seconds=1e9, keep_every=0, eval_every=0,
                          log_every=0, **TINY)
        trainer = Trainer(cfg, images=_training_images(), eval_images=[])
        for _ in range(60):
            trainer.train_step()
        return trainer.model.eval().float()


def _checkerboard_from(hyperprior: HyperpriorCodec) -> HyperpriorCodec:
    """The hyperprior plus a checkerboard context whose last layer is non-zero (zero would code
    exactly as the hyperprior does, and the vector would not pin the context)."""
    from .growth import add_checkerboard_context

    state = add_checkerboard_context({"model_config": hyperprior.config.to_dict(), "model": hyperprior.state_dict()})
    net = build_codec(CodecConfig.from_dict(state["model_config"])).eval()
    net.load_state_dict(state["model"])
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        last = net.context_model.params[-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=generator) * 0.05)
        last.bias.copy_(torch.randn(last.bias.shape, generator=generator) * 0.05)
    return net


def _export(net: HyperpriorCodec) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "weights.ncz"
        export_codec(net, path, _calibration())
        return path.read_bytes()


def _build_weights(name: str) -> Callable[[Path], dict[str, bytes]]:
    def build(folder: Path) -> dict[str, bytes]:
        net = _trained_hyperprior()
        if WEIGHTS[name] == CHECKERBOARD_ARCH:
            net = _checkerboard_from(net)
        return {".ncz": _export(net)}
    return build


def _source_pixels(name: str) -> Pixels:
    _, (left, top, width, height), grayscale, alpha, _ = IMAGES[name]
    sample = resources.files("ncz.codec").joinpath("samples/kodim23.png")
    with Image.open(io.BytesIO(sample.read_bytes())) as image:
        crop = image.convert("L" if grayscale else "RGB").crop((left, top, left + width, top + height))
        rgb = np.array(crop, dtype=np.uint8)
    if grayscale:
        rgb = rgb[:, :, None]
    plane = None
    if alpha:  # a radial ramp, transparent at the centre, opaque towards the corners: many distinct values
        yy, xx = np.mgrid[0:height, 0:width]
        plane = np.clip(np.hypot(yy - height / 2, xx - width / 2) * 9 - 60, 0, 255).astype(np.uint8)[::-1, ::-1].copy()
    return Pixels(np.ascontiguousarray(rgb), plane)


def _weights_path(folder: Path, image: str) -> Path:
    return folder / f"{IMAGES[image][0]}.ncz"


def _build_image(name: str) -> Callable[[Path], dict[str, bytes]]:
    def build(folder: Path) -> dict[str, bytes]:
        runtime = load_codec(_weights_path(folder, name))
        pixels = _source_pixels(name)
        buffer = io.BytesIO()
        with Writer(buffer, metadata={"weights": f"{IMAGES[name][0]}.ncz"}) as writer:
            write_image_section(writer, "image", runtime, pixels, IMAGES[name][4])
        data = buffer.getvalue()
        return {".ncz": data, ".png": _png(decoded_pixels(data, folder, name)["image"])}
    return build


def _png(pixels: Pixels) -> bytes:
    planes = pixels.rgb if pixels.alpha is None else np.dstack([pixels.rgb, pixels.alpha])
    buffer = io.BytesIO()  # L, LA, RGB or RGBA
    Image.fromarray(planes[:, :, 0] if planes.shape[2] == 1 else planes).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def expected_pixels(path: str | os.PathLike[str]) -> Pixels:
    """The pixels a committed PNG holds, shaped as the decoder returns them."""
    with Image.open(path) as image:
        array, has_alpha = np.asarray(image), image.mode.endswith("A")
    if array.ndim == 2:
        array = array[:, :, None]
    if has_alpha:
        return Pixels(np.ascontiguousarray(array[:, :, :-1]), np.ascontiguousarray(array[:, :, -1]))
    return Pixels(array)


def decoded_pixels(data: bytes, folder: Path, name: str) -> dict[str, Pixels]:
    """Every image section of vector ``name`` decoded with its committed weights."""
    runtime = load_codec(_weights_path(folder, name))
    with open_bytes(data, name=name) as reader:
        return {section: decode_section(reader, section, runtime) for section in image_names(reader)}


def decoded_image(data: bytes, folder: Path, name: str) -> dict[str, bytes]:
    """What the JSON pins of image vector ``name``, per section: ``<section>/y_hat`` (float64 (M, h, w),
    little-endian), ``<section>/pixels`` (uint8 (h, w, channels)) and ``<section>/alpha`` (uint8 (h, w))."""
    runtime = load_codec(_weights_path(folder, name))
    out = {}
    with open_bytes(data, name=name) as reader:
        for section in image_names(reader):
            _, _, y_hat = decode_latents(reader, section, runtime)
            out[f"{section}/y_hat"] = np.ascontiguousarray(y_hat, dtype="<f8").tobytes()
    for section, pixels in decoded_pixels(data, folder, name).items():
        out[f"{section}/pixels"] = np.ascontiguousarray(pixels.rgb).tobytes()
        if pixels.alpha is not None:
            out[f"{section}/alpha"] = np.ascontiguousarray(pixels.alpha).tobytes()
    return out


def register_vectors(register: Register) -> None:
    """Add this layer's vectors to ``ncz.tools.make_vectors`` (its plugin hook); weights first, since
    the images are built from them."""
    for name in WEIGHTS:
        register(name, None, _build_weights(name), built_once=BUILT_ONCE)
    for name in IMAGES:
        register(name, None, _build_image(name), built_once=BUILT_ONCE,
                 decoded=lambda data, folder, name=name: decoded_image(data, folder, name))
