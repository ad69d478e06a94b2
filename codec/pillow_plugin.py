"""Pillow plugin: ``Image.open("x.ncz")`` decodes the first image section.

Registered when ``ncz.codec`` is imported. Uses the shipped weights (or the
ones named by the environment variable ``NCZ_CODEC_WEIGHTS``).
"""

from __future__ import annotations

import os

from PIL import Image, ImageFile

from ncz.format import MAGIC, Kind, open_bytes

__all__ = ["NczImageFile", "register"]


def _accept(prefix: bytes) -> bool:
    return prefix[:8] == MAGIC


class NczImageFile(ImageFile.ImageFile):
    format = "NCZ"
    format_description = "ncz learned image codec"

    def _open(self) -> None:
        from .image import decode_section
        from .weights import load_codec

        data = self.fp.read()
        reader = open_bytes(data, name=getattr(self.fp, "name", "<ncz>"))
        names = [s.name for s in reader.sections if s.kind == Kind.IMAGE]
        if not names:
            raise SyntaxError("ncz file holds no image section")
        pixels = decode_section(reader, names[0], load_codec(os.environ.get("NCZ_CODEC_WEIGHTS")))
        if pixels.channels == 1:
            image = Image.fromarray(pixels.rgb[:, :, 0], "L")
        else:
            image = Image.fromarray(pixels.rgb, "RGB")
        if pixels.alpha is not None:
            image.putalpha(Image.fromarray(pixels.alpha, "L"))
        self._decoded = image
        self._mode = image.mode
        self._size = image.size
        self.tile = []

    def load(self):
        if self._decoded is not None:
            self.im = self._decoded.im.copy()
            self._decoded = None
        return Image.Image.load(self)


def register() -> None:
    Image.register_open(NczImageFile.format, NczImageFile, _accept)
    Image.register_extension(NczImageFile.format, ".ncz")
