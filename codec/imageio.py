"""Reading and writing pixel files through Pillow, with the checks users expect.

Accepted: PNG, JPEG, PPM/PGM, BMP, WebP, TIFF (whatever Pillow decodes), RGB or
grayscale, 8 bits. Converted with a note: palette, LA/RGBA (alpha kept
separately, losslessly), 16-bit (scaled to 8 bits), CMYK/YCbCr/LAB (to RGB).
Refused with one line: not an image, truncated data, 0×0, beyond the caps.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ncz.format import InputError, LimitError

__all__ = ["Pixels", "read_image", "write_image", "format_for", "pixels_of", "MAX_SIDE", "MAX_PIXELS"]

_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".ppm": "PPM", ".pgm": "PPM", ".bmp": "BMP",
            ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}


def format_for(path: str | os.PathLike[str]) -> str:
    """Pillow's format name for an output path's extension."""
    try:
        return _FORMATS[Path(path).suffix.lower()]
    except KeyError:
        raise InputError(f"{path}: unknown output extension (use .png, .jpg, .ppm, .pgm, .bmp, .webp, .tiff)") from None

MAX_SIDE = 1 << 15  # 32768
MAX_PIXELS = 1 << 28  # 268 megapixels; Pillow's own guard (Image.MAX_IMAGE_PIXELS, the user's) applies first


@dataclass
class Pixels:
    """An image ready for the codec: ``rgb`` is uint8 (H, W, 3) or (H, W, 1)."""

    rgb: np.ndarray
    alpha: np.ndarray | None = None  # uint8 (H, W)
    notes: list[str] = field(default_factory=list)

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def channels(self) -> int:
        return int(self.rgb.shape[2])


def read_image(source: str | os.PathLike[str] | bytes, name: str | None = None) -> Pixels:
    """Decode ``source`` (a path or the file's bytes) into :class:`Pixels`."""
    label = name or (os.fspath(source) if not isinstance(source, bytes) else "<stdin>")
    notes: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            handle = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
            notes.append(f"{handle.size[0]}x{handle.size[1]} is above Pillow's decompression-bomb warning "
                         f"threshold ({Image.MAX_IMAGE_PIXELS} pixels)")
        width, height = handle.size
        if width == 0 or height == 0:
            raise InputError(f"{label}: image is {width}x{height}; nothing to encode")
        if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
            raise LimitError(f"{label}: {width}x{height} exceeds the cap of {MAX_SIDE} per side / {MAX_PIXELS} pixels")
        handle.load()
    except (InputError, LimitError):
        raise
    except FileNotFoundError as exc:
        raise InputError(f"{label}: no such file") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{label}: not an image Pillow can read") from exc
    except Image.DecompressionBombError as exc:
        raise LimitError(f"{label}: {exc} (Pillow's PIL.Image.MAX_IMAGE_PIXELS; raise it to read larger "
                         "images)") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt image data
        raise InputError(f"{label}: corrupt or truncated image ({exc})") from exc
    pixels = pixels_of(handle)
    pixels.notes[:0] = notes
    return pixels


def pixels_of(handle: Image.Image) -> Pixels:
    """A loaded Pillow image as :class:`Pixels` (conversions listed in ``notes``)."""
    notes: list[str] = []
    mode = handle.mode
    alpha = None
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        data = np.asarray(handle, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or data.max(initial=0) > 255 else 255.0
        gray = np.clip(np.rint(data / peak * 255.0), 0, 255).astype(np.uint8)
        notes.append(f"{mode} converted to 8-bit grayscale")
        return Pixels(gray[:, :, None], None, notes)
    if mode == "P":
        handle = handle.convert("RGBA" if "transparency" in handle.info else "RGB")
        notes.append("palette image converted to RGB")
        mode = handle.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = np.asarray(handle.getchannel("A"), dtype=np.uint8).copy()
        handle = handle.convert("L" if mode.startswith("L") else "RGB")
        mode = handle.mode
        if (alpha == 255).all():
            alpha = None  # opaque: nothing to keep
    if mode == "1":
        handle = handle.convert("L")
        mode = "L"
    if mode == "L":
        return Pixels(np.asarray(handle, dtype=np.uint8)[:, :, None].copy(), alpha, notes)
    if mode != "RGB":
        notes.append(f"{mode} converted to RGB")
        handle = handle.convert("RGB")
    return Pixels(np.asarray(handle, dtype=np.uint8).copy(), alpha, notes)


def write_image(pixels: Pixels, target: str | os.PathLike[str] | io.BufferedIOBase, fmt: str | None = None) -> None:
    """Encode ``pixels`` into ``target``; the format follows the extension (or ``fmt``)."""
    rgb = pixels.rgb
    mode = "L" if rgb.shape[2] == 1 else "RGB"
    image = Image.fromarray(rgb[:, :, 0] if mode == "L" else rgb, mode)
    if pixels.alpha is not None:
        image.putalpha(Image.fromarray(pixels.alpha, "L"))
    if fmt is None and isinstance(target, (str, os.PathLike)):
        fmt = format_for(target)
    if fmt == "JPEG" and pixels.alpha is not None:
        image = image.convert("RGB")
    try:
        image.save(target, format=fmt or "PNG")
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{target}: cannot write {fmt or 'PNG'} ({exc})") from exc
