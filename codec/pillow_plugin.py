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
``model=`` save option). Saving goes through :func:`ncz.codec.encode_images`, as ``ncz encode`` does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from PIL import Image, ImageFile, ImageSequence

from ncz.format import MAGIC, Kind, NczError, open_bytes

from .imageio import Pixels, pixels_of

__all__ = ["NczImageFile", "register", "to_image"]


def _accept(prefix: bytes) -> bool:
    return prefix[:8] == MAGIC


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
            from .weights import load_codec

            name = self._frames[self._frame]
            try:
                pixels = decode_section(self._reader, name, load_codec(os.environ.get("NCZ_CODEC_WEIGHTS")))
            except (NczError, RecursionError, MemoryError) as exc:
                raise OSError(f"cannot decode ncz image {name!r}: {exc}") from exc
            image = to_image(pixels)
            self.im = (image if image.mode == self.mode else image.convert(self.mode)).im
        return Image.Image.load(self)


def to_image(pixels: Pixels) -> Image.Image:
    """A PIL image (L, RGB, LA or RGBA) of decoded pixels."""
    if pixels.channels == 1:
        image = Image.fromarray(pixels.rgb[:, :, 0], "L")
    else:
        image = Image.fromarray(pixels.rgb, "RGB")
    if pixels.alpha is not None:
        image.putalpha(Image.fromarray(pixels.alpha, "L"))
    return image


# --- encoding ------------------------------------------------------------------------------------


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
    from .api import encode_images

    fp.write(encode_images(_frames_of(images), runtime=info.get("model"), quality=info.get("quality"),
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
