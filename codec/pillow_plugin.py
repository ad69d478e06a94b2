"""Pillow plugin: ``Image.open("x.ncz")`` and ``image.save("x.ncz")``, as Pillow users expect.

Registered when ``ncz.codec`` is imported; Pillow's own settings are left alone.

- Opening is lazy: ``_open`` validates the container and reads size and mode from
  the image section's params, so Pillow's decompression-bomb check
  (``Image.MAX_IMAGE_PIXELS``) runs before any decoding; ``load()`` decodes.
- Several image sections are frames: ``n_frames``, ``seek(i)``, ``tell()``.
- Errors: a file that is not a readable ncz image raises ``UnidentifiedImageError``
  from ``Image.open``; corrupt image data raises ``OSError`` from ``load()``.
- Saving: ``image.save("x.ncz", quality=3.5)`` (0 .. top level of the weights,
  fractional values interpolate), or ``bpp=`` / ``size=`` (bits per pixel or
  bytes of the whole file); ``save_all=True, append_images=[...]`` writes several.

Weights: the shipped ones, or the file named by ``NCZ_CODEC_WEIGHTS`` (or the
``model=`` save option). :func:`encode_images` is the encoder ``ncz encode`` uses too.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image, ImageFile, ImageSequence

from ncz.format import MAGIC, Kind, NczError, UsageError, Writer, open_bytes

from .imageio import Pixels, pixels_of

__all__ = ["NczImageFile", "register", "encode_images", "image_name"]


def _accept(prefix: bytes) -> bool:
    return prefix[:8] == MAGIC


def _runtime(model: str | None = None):
    from .weights import load_codec

    return load_codec(model or os.environ.get("NCZ_CODEC_WEIGHTS"))


class NczImageFile(ImageFile.ImageFile):
    format = "NCZ"
    format_description = "ncz learned image codec"

    def _open(self) -> None:
        try:
            reader = open_bytes(self.fp.read(), name=getattr(self.fp, "name", None) or "<ncz>")
        except (NczError, RecursionError, MemoryError) as exc:  # Pillow turns SyntaxError into "cannot identify"
            raise SyntaxError(f"not a readable ncz file ({exc})") from exc
        self._reader = reader
        self._frames = [s.name for s in reader.sections if s.kind == Kind.IMAGE]
        if not self._frames:
            raise SyntaxError("ncz file holds no image section")
        self._select(0)

    def _select(self, frame: int) -> None:
        """Size and mode of frame ``frame`` from its params (the reader checked their types and ranges)."""
        name = self._frames[frame]
        params = self._reader.info(name).params
        mode = "L" if params["channels"] == 1 else "RGB"
        if f"{name}#alpha" in self._reader:
            mode += "A"
        self._frame = frame
        self._size = (params["width"], params["height"])
        self._mode = mode
        self.tile = []

    @property
    def n_frames(self) -> int:
        return len(self._frames)

    @property
    def is_animated(self) -> bool:
        return len(self._frames) > 1

    def seek(self, frame: int) -> None:
        if not self._seek_check(frame):
            return
        self._select(frame)
        self._im = None
        Image._decompression_bomb_check(self.size)

    def tell(self) -> int:
        return self._frame

    def load(self):
        if self._im is None:
            from .image import decode_section

            name = self._frames[self._frame]
            try:
                self._reader.charge_pixels(self.size[0] * self.size[1], f"image {name!r}")
                pixels = decode_section(self._reader, name, _runtime())
            except (NczError, RecursionError, MemoryError) as exc:
                raise OSError(f"cannot decode ncz image {name!r}: {exc}") from exc
            image = _to_image(pixels)
            self.im = (image if image.mode == self.mode else image.convert(self.mode)).im
        return Image.Image.load(self)


def _to_image(pixels: Pixels) -> Image.Image:
    if pixels.channels == 1:
        image = Image.fromarray(pixels.rgb[:, :, 0], "L")
    else:
        image = Image.fromarray(pixels.rgb, "RGB")
    if pixels.alpha is not None:
        image.putalpha(Image.fromarray(pixels.alpha, "L"))
    return image


# --- encoding ------------------------------------------------------------------------------------


def image_name(label: str, used: set[str]) -> str:
    """A section name for an image read from ``label`` (a path, or ``-``), unique in ``used``."""
    base = "image" if label == "-" else os.path.splitext(os.path.basename(label))[0].replace("#", "_") or "image"
    name, k = base, 1
    while name in used:
        k += 1
        name = f"{base}-{k}"
    used.add(name)
    return name


def encode_images(runtime, images: Sequence[tuple[str, Pixels]], *, quality: float | None = None,
                  bpp: float | None = None, size: int | None = None, sga=None,
                  sga_progress: Callable[[str], Any] | None = None) -> bytes:
    """An archive of ``images`` (label, pixels) at one ``quality`` or within a whole-file budget
    (``bpp`` or ``size`` bytes, like cwebp -size); ``sga`` (an :class:`SGASchedule`) refines the
    latents at the qualities chosen. ``sga_progress(label)`` returns a progress callback
    ``(done, total, name)`` with ``close()``, one per refined image."""
    from ncz.codec import choose_quality, encode_pixels, write_image_section  # the package's (patchable) names

    top = runtime.config.num_levels - 1
    if quality is not None and not 0 <= quality <= top:
        raise UsageError(f"quality must be in 0..{top} for these weights, got {quality}")
    total_pixels = sum(pixels.width * pixels.height for _, pixels in images)
    budget = size if size is not None else None if bpp is None else bpp * total_pixels / 8

    def share(pixels: Pixels, payload_bits: float) -> float:
        """An image's pixel share of ``payload_bits``."""
        return payload_bits * pixels.width * pixels.height / total_pixels

    def qualities_for(payload_bits: float | None) -> list[float]:
        """Per image: the fixed quality, or the highest that fits its share of ``payload_bits``."""
        if payload_bits is None:
            return [top / 2 if quality is None else quality] * len(images)
        return [choose_quality(runtime, pixels, share(pixels, payload_bits)) for _, pixels in images]

    def build(qualities: list[float], refine: bool = False, payload_bits: float | None = None) -> tuple[bytes, int]:
        """The archive, and the bytes of its image payloads. With ``refine``, SGA latents replace the
        plain ones where they fit the image's share of ``payload_bits`` (SGA may trade rate for distortion)."""
        buffer, used, payload_bytes = io.BytesIO(), set(), 0
        with Writer(buffer, metadata={"format": "ncz-images", "images": len(images)}) as writer:
            for (label, pixels), q in zip(images, qualities):
                encoded = None
                if refine:
                    bar = sga_progress(label) if sga_progress else None
                    try:
                        encoded = encode_pixels(runtime, pixels, q, (lambda d, t: bar(d, t, "")) if bar else None,
                                                sga=sga)
                    finally:
                        if bar:
                            bar.close()
                    if payload_bits is not None and 8 * len(encoded[1]) > share(pixels, payload_bits):
                        encoded = None  # refined latents may trade rate for distortion: keep the size promise
                if encoded is None:
                    encoded = encode_pixels(runtime, pixels, q)
                payload_bytes += len(encoded[1])
                write_image_section(writer, image_name(label, used), runtime, pixels, q, encoded=encoded)
        return buffer.getvalue(), payload_bytes

    # Rate control runs on the plain encoder; SGA (slow) runs once, at the qualities chosen.
    payload_bits = None if budget is None else 8 * budget
    qualities = qualities_for(payload_bits)
    data, payload_bytes = build(qualities)
    if budget is not None and len(data) > budget:  # the container's own bytes come out of the budget too
        payload_bits = max(8 * (budget - (len(data) - payload_bytes)), 0.0)
        qualities = qualities_for(payload_bits)
        data, _ = build(qualities)
    if sga is not None:
        refined, _ = build(qualities, refine=True, payload_bits=payload_bits)
        if budget is None or len(refined) <= budget or len(refined) <= len(data):
            data = refined
    return data


def _frames_of(images: Sequence[Image.Image]) -> list[tuple[str, Pixels]]:
    out = []
    for image in images:
        for frame in ImageSequence.Iterator(image):
            frame.load()
            out.append((getattr(image, "filename", "") or "image", pixels_of(frame)))
    return out


def _save_images(images: Sequence[Image.Image], fp, info: dict) -> None:
    unknown = set(info) - {"quality", "bpp", "size", "model", "append_images", "save_all", "sga"}
    if unknown:
        raise ValueError(f"NCZ save: unknown options {sorted(unknown)} (use quality=, bpp=, size=, model=, sga=)")
    if sum(info.get(k) is not None for k in ("quality", "bpp", "size")) > 1:
        raise ValueError("NCZ save: give one of quality=, bpp= or size=")
    sga = None
    if info.get("sga"):
        from .refine import SGASchedule

        sga = SGASchedule(int(info["sga"]))
    fp.write(encode_images(_runtime(info.get("model")), _frames_of(images), quality=info.get("quality"),
                           bpp=info.get("bpp"), size=info.get("size"), sga=sga))


def _save(image: Image.Image, fp, filename) -> None:
    _save_images([image], fp, dict(image.encoderinfo))


def _save_all(image: Image.Image, fp, filename) -> None:
    info = dict(image.encoderinfo)
    _save_images([image, *info.get("append_images", [])], fp, info)


def register() -> None:
    Image.register_open(NczImageFile.format, NczImageFile, _accept)
    Image.register_save(NczImageFile.format, _save)
    Image.register_save_all(NczImageFile.format, _save_all)
    Image.register_extension(NczImageFile.format, ".ncz")
    Image.register_mime(NczImageFile.format, "image/x-ncz")
