"""Image sections: pixels <-> entropy-coded latents (FORMAT.md §5.3, layout 2).

One latent grid per image, whatever its size::

    x ─pad to 64─► g_a (windows, :mod:`.windows`) ─► ·gain(q) ─► y ─h_a─► z
    y, z ─► latent coder of the architecture (:mod:`.latents`) ─► streams
    decode: streams ─► ŷ (integer networks: exact) ─► ·inv_gain(q) ─► g_s (windows) ─► crop ─► 8-bit

The transforms run in overlapping windows whose halo covers their receptive
field, so a large image decodes like one piece (no tile seams) in bounded
memory. Alpha, when present, is a separate lossless part.

Section params: ``width``, ``height``, ``channels`` (1 or 3), ``quality``
(float), ``weights`` (bin: the first 16 bytes of the sha256 of the weights
file, which names the architecture too), ``layout`` (2), ``streams`` (byte lengths, in
the architecture's stream order); payload = the streams back to back.
Alpha: part ``#alpha`` (uint8 [h, w]).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ncz.format import Codec, DensityError, InputError, Kind, Reader, SectionInfo, UsageError, Writer, encode_payload

from .imageio import MAX_PIXELS, MAX_SIDE, Pixels
from .latents import LatentShape
from .refine import SGAProgress, SGASchedule, refine_latents
from .weights import CodecRuntime
from .windows import STRIDE, WINDOW, blocks

__all__ = ["LAYOUT", "DEFAULT_MAX_PIXELS", "ImageEncoder", "EncodedImage", "encode_pixels", "decode_section",
           "verify_section", "decode_latents", "write_image_section", "image_pixels"]

LAYOUT = 2  # FORMAT.md §5.3: one latent grid per image (layout 1 coded independent 1024-px tiles)
PAD = 64
#: pixels a decoder accepts per image section by default: decoding costs time in proportion to pixels, not
#: bytes (a flat image codes to almost nothing), so a small file could otherwise demand minutes. Callers raise it.
DEFAULT_MAX_PIXELS = 1 << 26  # 67 megapixels, e.g. 8192 × 8192; about a minute of decoding on 2 cores


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    rgb = np.ascontiguousarray(rgb)
    if not rgb.flags.writeable:  # np.asarray(PIL image) is read-only; torch warns on such arrays
        rgb = rgb.copy()
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)[None]
    if x.shape[1] == 1:
        x = x.expand(1, 3, *x.shape[2:])
    return x


def _pad_replicate(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[2:]
    ph, pw = (-h) % PAD, (-w) % PAD
    if ph or pw:  # replicate edges: cheaper to code than a black border
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
    return x


def _latent_shape(runtime: CodecRuntime, height: int, width: int) -> LatentShape:
    return LatentShape(M=runtime.config.M, N=runtime.config.N,
                       height=(height + (-height) % PAD) // STRIDE, width=(width + (-width) % PAD) // STRIDE)


@dataclass(frozen=True)
class EncodedImage:
    """An image section's params and payload, and what SGA did (None: not run)."""

    params: dict
    payload: bytes
    refined: bool | None = None


class ImageEncoder:
    """One image ready to be coded at any quality.

    Why a class: g_a is the costly part of encoding and does not depend on the
    quality (the gain units scale its output per level), so rate control's
    probes all reuse one analysis.
    """

    def __init__(self, runtime: CodecRuntime, pixels: Pixels,
                 progress: Callable[[int, int], None] | None = None):
        h, w = pixels.height, pixels.width
        if h == 0 or w == 0 or h > MAX_SIDE or w > MAX_SIDE or h * w > MAX_PIXELS:
            raise UsageError(f"image size {w}x{h} is outside 1..{MAX_SIDE} per side")
        self.runtime, self.pixels = runtime, pixels
        self.x = _pad_replicate(_to_tensor(pixels.rgb))
        self.shape = _latent_shape(runtime, h, w)
        self._y_raw = runtime.analyze_raw(self.x, progress=progress)

    def _check_quality(self, quality: float) -> float:
        levels = self.runtime.config.num_levels
        if math.isnan(quality) or not (0.0 <= quality <= levels - 1):
            raise UsageError(f"quality must be in [0, {levels - 1}], got {quality}")
        return float(quality)

    def latents(self, quality: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The amortized ``(y, z)`` at ``quality`` (g_a's guess, h_a of it)."""
        with torch.no_grad():
            y = self._y_raw * self.runtime.net.gains.gain(self._check_quality(quality))
            return y, self.runtime.net.hyper_analysis(y)

    def encode(self, quality: float, *, sga: SGASchedule | None = None,
               progress: Callable[[int, int], None] | None = None,
               report: Callable[[SGAProgress], None] | None = None) -> EncodedImage:
        """Params and payload at ``quality``; ``sga`` refines the latents first (:mod:`.refine`;
        ``report`` gets its :class:`~ncz.codec.refine.SGAProgress` every iteration)."""
        quality = self._check_quality(quality)
        refined = None
        if sga is None:
            y, z = self.latents(quality)
        else:
            y, z, refined = self._refine(quality, sga, progress, report)
        coded = self.runtime.latents.encode(y[0].numpy(), z[0].numpy())
        pixels = self.pixels
        params = {"width": pixels.width, "height": pixels.height, "channels": pixels.channels,
                  "quality": quality, "weights": bytes.fromhex(self.runtime.weights_hash[:32]), "layout": LAYOUT,
                  "streams": [len(s) for s in coded.streams]}
        return EncodedImage(params, b"".join(coded.streams), refined)

    def _refine(self, quality: float, sga: SGASchedule, progress, report) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """SGA per block of the latent grid (one block up to 1024 px a side): each block's latents are
        refined against its own pixels; g_a's latents stay where refinement did not pay. A time
        budget is the whole image's: each block gets its share by latent count."""
        y, z = self.latents(quality)
        y, z = y.clone(), torch.round(z)
        h, w = self.pixels.height, self.pixels.width
        parts = [p for p in blocks(self.shape.height, self.shape.width, WINDOW)]
        latents = self.shape.height * self.shape.width
        improved = False
        for index, (top, left, bottom, right) in enumerate(parts):
            x = self.x[:, :, top * STRIDE:bottom * STRIDE, left * STRIDE:right * STRIDE]
            size = (min(h - top * STRIDE, x.shape[2]), min(w - left * STRIDE, x.shape[3]))
            schedule = sga
            if sga.time_budget is not None and len(parts) > 1:
                share = (bottom - top) * (right - left) / latents
                schedule = dataclasses.replace(sga, time_budget=sga.time_budget * share)

            def block_progress(done: int, total: int, index: int = index) -> None:
                if progress:
                    progress(index * total + done, len(parts) * total)

            def block_report(step: SGAProgress, index: int = index) -> None:
                if report:
                    report(dataclasses.replace(step, step=index * step.total + step.step,
                                               total=len(parts) * step.total))
            result = refine_latents(self.runtime, x, size, quality, schedule, seed=index, progress=block_progress,
                                    report=block_report if report else None)
            y[:, :, top:bottom, left:right] = result.y
            z[:, :, top // 4:bottom // 4, left // 4:right // 4] = result.z
            improved |= result.improved
        return y, z, improved


def encode_pixels(runtime: CodecRuntime, pixels: Pixels, quality: float,
                  progress: Callable[[int, int], None] | None = None, *,
                  sga: SGASchedule | None = None) -> tuple[dict, bytes]:
    """(params, payload) of an image section for ``pixels`` at ``quality`` (see :class:`ImageEncoder`)."""
    encoded = ImageEncoder(runtime, pixels, progress if sga is None else None).encode(quality, sga=sga,
                                                                                     progress=progress)
    return encoded.params, encoded.payload


def _alpha_payload(alpha: np.ndarray):
    """The smaller lossless coding of an alpha plane (zstd bytes or ANS symbols), never an empty stream."""
    candidates = [encode_payload(alpha.tobytes(), Codec.ZSTD, {"level": 19})]
    try:
        candidates.append(encode_payload(alpha.astype("<i4").tobytes(), Codec.ANS))
    except DensityError:  # FORMAT §7.1: ≤ 1024 symbols per byte, so a (nearly) constant plane stays zstd
        pass
    return min(candidates, key=lambda p: p.stored_length)


def write_image_section(writer: Writer, name: str, runtime: CodecRuntime, pixels: Pixels, quality: float,
                        progress: Callable[[int, int], None] | None = None, *,
                        sga: SGASchedule | None = None, encoded: tuple[dict, bytes] | None = None) -> None:
    """Add one image (and its alpha part) to ``writer``; ``encoded`` reuses an :func:`encode_pixels` result."""
    params, payload = encoded if encoded is not None else encode_pixels(runtime, pixels, quality, progress, sga=sga)
    writer.add(name, payload, kind=Kind.IMAGE, codec=Codec.RAW, params=params, aligned=False)
    if pixels.alpha is not None:
        best = _alpha_payload(pixels.alpha)
        dtype = "uint8" if best.codec == Codec.ZSTD else "int32"
        writer.add_encoded(f"{name}#alpha", best, kind=Kind.PART,
                           params={"dtype": dtype, "shape": list(pixels.alpha.shape)})


def _uint(params: dict, key: str, where: str) -> int:
    value = params.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InputError(f"{where}: params.{key} must be a non-negative integer, got {value!r}")
    return value


def image_pixels(info: SectionInfo) -> int:
    """Pixels an image section declares (0 when its params are not usable; decoding then fails anyway)."""
    w, h = info.params.get("width"), info.params.get("height")
    return w * h if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0 else 0


def _check(info: SectionInfo, runtime: CodecRuntime, where: str,
           max_pixels: int) -> tuple[int, int, int, float, list[int]]:
    p = info.params
    if "layout" not in p and "tile" in p:
        raise InputError(f"{where}: image layout 1 (independent 1024-px tiles, ncz 0.1) is not decoded by this "
                         "version; re-encode the original")
    layout = _uint(p, "layout", where)
    if layout != LAYOUT:
        raise InputError(f"{where}: params.layout is {layout}; this decoder reads layout {LAYOUT}")
    w, h, c = _uint(p, "width", where), _uint(p, "height", where), _uint(p, "channels", where)
    q = p.get("quality")
    if not isinstance(q, float):
        raise InputError(f"{where}: params.quality must be a float, got {q!r}")
    weights, lengths = p.get("weights"), p.get("streams")
    if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE and w * h <= MAX_PIXELS):
        raise InputError(f"{where}: params width×height {w}x{h} outside 1..{MAX_SIDE}")
    if w * h > max_pixels:
        raise InputError(f"{where}: image of {w}x{h} = {w * h:,} pixels exceeds the decoder's limit of "
                         f"{max_pixels:,} (raise max_pixels / --max-pixels to decode it)")
    if c not in (1, 3):
        raise InputError(f"{where}: params.channels must be 1 or 3, got {c}")
    if not (0.0 <= q <= runtime.config.num_levels - 1):
        raise InputError(f"{where}: params.quality {q} outside the model's 0..{runtime.config.num_levels - 1}")
    if not isinstance(weights, bytes) or weights.hex() != runtime.weights_hash[:32]:
        shown = weights.hex()[:12] if isinstance(weights, bytes) else repr(weights)
        raise InputError(f"{where}: coded with weights {shown}…; the loaded weights are {runtime.path} "
                         f"({runtime.model_id}, {runtime.weights_hash[:12]}…): pass --model with the right file")
    names = runtime.latents.stream_names
    if (not isinstance(lengths, list) or len(lengths) != len(names)
            or any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in lengths)):
        raise InputError(f"{where}: params.streams must list {len(names)} byte lengths ({', '.join(names)})")
    if sum(lengths) != info.decoded_length:
        raise InputError(f"{where}: stream lengths sum to {sum(lengths)}, the payload has {info.decoded_length} bytes")
    return w, h, c, q, lengths


def _alpha(reader: Reader, name: str, h: int, w: int, where: str) -> np.ndarray | None:
    part_name = f"{name}#alpha"
    if part_name not in reader:
        return None
    part = reader.info(part_name)
    dtype = part.params.get("dtype")
    itemsize = {"uint8": 1, "int32": 4}.get(dtype)
    if itemsize is None or part.params.get("shape") != [h, w]:
        raise InputError(f"{where}: alpha part must be uint8 or int32 of shape [{h}, {w}], "
                         f"got {dtype!r} {part.params.get('shape')!r}")
    if part.decoded_length != h * w * itemsize:  # checked before anything is decoded
        raise InputError(f"{where}: alpha part declares {part.decoded_length} bytes, expected {h * w * itemsize}")
    data = np.frombuffer(reader.read(part_name), dtype=np.uint8 if itemsize == 1 else "<i4")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise InputError(f"{where}: alpha values outside 0..255")
    return data.astype(np.uint8).reshape(h, w)


def decode_latents(reader: Reader, name: str, runtime: CodecRuntime, max_pixels: int = DEFAULT_MAX_PIXELS):
    """``((width, height, channels, quality), alpha, ŷ)`` of an image section: everything but the
    synthesis transform. ŷ (float64, (M, h, w)) is exact on every machine (integer networks)."""
    info = reader.info(name)
    where = f"{reader.name}: section {name!r}"
    if info.kind != Kind.IMAGE:
        raise InputError(f"{where}: not an image section (kind {info.kind_name})")
    w, h, c, q, lengths = _check(info, runtime, where, max_pixels)
    reader.charge_pixels(w * h, f"image {name!r}")  # the file's pixel budget (Limits.max_image_pixels)
    alpha = _alpha(reader, name, h, w, where)
    payload = reader.read(name)
    streams, cursor = [], 0
    for n in lengths:
        streams.append(payload[cursor:cursor + n])
        cursor += n
    y_hat = runtime.latents.decode(streams, _latent_shape(runtime, h, w), where)
    return (w, h, c, q), alpha, y_hat


def verify_section(reader: Reader, name: str, runtime: CodecRuntime, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Entropy-decode every stream of image section ``name`` (and its alpha part) without synthesizing
    pixels: a stream that is truncated, padded or corrupt raises, as :func:`decode_section` would."""
    decode_latents(reader, name, runtime, max_pixels)


@torch.no_grad()
def decode_section(reader: Reader, name: str, runtime: CodecRuntime,
                   progress: Callable[[int, int], None] | None = None, *,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> Pixels:
    """Pixels of image section ``name``; sections over ``max_pixels`` are refused before any decoding."""
    (w, h, c, q), alpha, y_hat = decode_latents(reader, name, runtime, max_pixels)
    rgb = runtime.synthesize_pixels(torch.from_numpy(y_hat.astype(np.float32))[None], q, (h, w), progress=progress)
    if c == 1:
        rgb = np.rint(rgb.astype(np.float32).mean(axis=2, keepdims=True)).astype(np.uint8)
    return Pixels(rgb, alpha)
