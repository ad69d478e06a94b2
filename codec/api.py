"""The image pipeline as a library: files in, files out, with the size promise kept.

``ncz encode``/``ncz decode``, ``Image.save(..., format="NCZ")`` and the
benchmarks all go through here, so a library caller gets exactly what the
command line gives::

    data = ncz.codec.encode(image, bpp=0.3)          # PIL image / array / Pixels -> .ncz bytes
    image = ncz.codec.decode(data)                   # -> PIL image
    data = ncz.codec.encode_images([("a", pa), ("b", pb)], size=50_000)   # several, one budget
    for name, pixels in ncz.codec.decode_images(reader): ...

Rate control (``bpp`` / ``size`` for the whole file, like cwebp's -size): each
image gets its pixel share of the budget and the highest quality whose payload
fits it (bisection on the continuous quality; g_a runs once per image, see
:class:`~ncz.codec.image.ImageEncoder`); the container's own bytes come out of
the budget on a second pass. SGA, being slow, runs once, at the qualities
chosen, and its latents are kept only where they still fit the share.
"""
from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ncz.format import InputError, Kind, Reader, UsageError, Writer, open_bytes

from .image import DEFAULT_MAX_PIXELS, EncodedImage, ImageEncoder, decode_section, write_image_section
from .imageio import Pixels, pixels_of
from .rate import choose_quality
from .refine import SGAProgress, SGASchedule
from .weights import CodecRuntime, load_codec

__all__ = ["encode", "decode", "encode_images", "decode_images", "image_names", "section_name"]

#: ``progress(label, done, total)``: SGA iterations of the image ``label``
Progress = Callable[[str, int, int], None]
#: ``report(label, step)``: every SGA iteration of the image ``label``, with its loss, bpp and PSNR
Report = Callable[[str, SGAProgress], None]


def section_name(label: str, used: set[str]) -> str:
    """A section name for an image read from ``label`` (a path, or ``-``), unique in ``used``."""
    base = "image" if label == "-" else os.path.splitext(os.path.basename(label))[0].replace("#", "_") or "image"
    name, k = base, 1
    while name in used:
        k += 1
        name = f"{base}-{k}"
    used.add(name)
    return name


def _runtime(runtime: CodecRuntime | str | os.PathLike | None) -> CodecRuntime:
    if isinstance(runtime, CodecRuntime):
        return runtime
    return load_codec(runtime or os.environ.get("NCZ_CODEC_WEIGHTS"))


def encode_images(images: Sequence[tuple[str, Pixels]], *, runtime: CodecRuntime | str | None = None,
                  quality: float | None = None, bpp: float | None = None, size: int | None = None,
                  sga: SGASchedule | None = None, progress: Progress | None = None,
                  report: Report | None = None) -> bytes:
    """An archive of ``images`` (label, pixels) at one ``quality`` (default: the middle of the
    model's range) or within a whole-file budget (``bpp`` bits per pixel or ``size`` bytes; the
    lowest quality is used where even that does not fit). ``sga`` refines the latents (slow;
    :mod:`ncz.codec.refine`; a ``time_budget`` is per image), ``progress``/``report`` follow it;
    ``runtime``: weights (default: ``$NCZ_CODEC_WEIGHTS`` or the shipped ones)."""
    runtime = _runtime(runtime)
    top = runtime.config.num_levels - 1
    if sum(v is not None for v in (quality, bpp, size)) > 1:
        raise UsageError("give one of quality, bpp or size")
    if quality is not None and not 0 <= quality <= top:  # NaN fails too
        raise UsageError(f"quality must be in 0..{top} for these weights, got {quality}")
    if (bpp is not None and not bpp > 0) or (size is not None and not size > 0):
        raise UsageError("bpp and size must be > 0")
    if not images:
        raise UsageError("no images to encode")
    encoders = [ImageEncoder(runtime, pixels) for _, pixels in images]  # g_a once per image
    total_pixels = sum(pixels.width * pixels.height for _, pixels in images)
    budget = size if size is not None else None if bpp is None else bpp * total_pixels / 8

    def share(pixels: Pixels, payload_bits: float) -> float:
        return payload_bits * pixels.width * pixels.height / total_pixels

    def qualities_for(payload_bits: float | None) -> list[float]:
        if payload_bits is None:
            return [top / 2 if quality is None else float(quality)] * len(images)
        return [choose_quality(runtime, encoder, share(encoder.pixels, payload_bits)) for encoder in encoders]

    def build(coded: list[EncodedImage]) -> bytes:
        buffer, used = io.BytesIO(), set()
        with Writer(buffer) as writer:
            for (label, pixels), encoded, q in zip(images, coded, qualities):
                write_image_section(writer, section_name(label, used), runtime, pixels, q,
                                    encoded=(encoded.params, encoded.payload))
        return buffer.getvalue()

    payload_bits = None if budget is None else 8 * budget
    qualities = qualities_for(payload_bits)
    coded = [encoder.encode(q) for encoder, q in zip(encoders, qualities)]
    data = build(coded)
    if budget is not None and len(data) > budget:  # the container's own bytes come out of the budget too
        payload_bits = max(8 * (budget - (len(data) - sum(len(c.payload) for c in coded))), 0.0)
        qualities = qualities_for(payload_bits)
        coded = [encoder.encode(q) for encoder, q in zip(encoders, qualities)]
        data = build(coded)
    if sga is None:
        return data
    refined = []
    for (label, _), encoder, plain, q in zip(images, encoders, coded, qualities):
        step = (lambda done, total, label=label: progress(label, done, total)) if progress else None
        told = (lambda state, label=label: report(label, state)) if report else None
        candidate = encoder.encode(q, sga=sga, progress=step, report=told)
        fits = payload_bits is None or 8 * len(candidate.payload) <= share(encoder.pixels, payload_bits)
        refined.append(candidate if fits else plain)  # SGA may trade rate for distortion: keep the promise
    data_refined = build(refined)
    return data_refined if budget is None or len(data_refined) <= max(budget, len(data)) else data


def image_names(reader: Reader) -> list[str]:
    """Names of the image sections of an archive, in file order."""
    return [s.name for s in reader.sections if s.kind == Kind.IMAGE]


def decode_images(reader: Reader, *, runtime: CodecRuntime | str | None = None, names: Sequence[str] | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[tuple[str, Pixels]]:
    """``(name, pixels)`` of each image section (or of ``names``), one at a time (bounded memory).

    Every image's pixels count against the reader's per-file budget (``Limits.max_image_pixels``)
    before it is decoded; ``max_pixels`` caps each image.
    """
    runtime = _runtime(runtime)
    for name in (image_names(reader) if names is None else names):
        yield name, decode_section(reader, name, runtime, max_pixels=max_pixels)


def _pixels(image: Any) -> Pixels:
    if isinstance(image, Pixels):
        return image
    if isinstance(image, np.ndarray):
        return Pixels(image if image.ndim == 3 else image[:, :, None])
    return pixels_of(image)  # a PIL image


def encode(image: Any, **options: Any) -> bytes:
    """One image (PIL image, ``(h, w, 3|1)`` uint8 array or :class:`Pixels`) as ``.ncz`` bytes;
    ``options`` as for :func:`encode_images`."""
    return encode_images([("image", _pixels(image))], **options)


def decode(data: bytes, *, runtime: CodecRuntime | str | None = None, name: str | None = None,
           max_pixels: int = DEFAULT_MAX_PIXELS):
    """The (first, or ``name``) image of ``.ncz`` bytes as a PIL image."""
    from .pillow_plugin import to_image

    with open_bytes(data) as reader:
        names = image_names(reader)
        if not names:
            raise InputError(f"{reader.name}: holds no image sections")
        chosen = names[0] if name is None else name
        return to_image(next(decode_images(reader, runtime=runtime, names=[chosen], max_pixels=max_pixels))[1])
