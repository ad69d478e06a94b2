"""The Pillow plugin behaves as Pillow users expect (issue 12, item 4 and "Pillow, as its users expect")."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

import ncz.codec  # noqa: F401 - registers the plugin
import ncz.format as nf
from ncz.codec.train import psnr
from tests.conftest import VECTORS
from tests.hostile_files import Section, build, image_params


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` × ``height`` (Pillow checks the size before reading any pixel)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def test_import_leaves_pillows_guard_alone():
    code = ("import PIL.Image as I; before = I.MAX_IMAGE_PIXELS; import ncz.codec; "
            "assert I.MAX_IMAGE_PIXELS == before, I.MAX_IMAGE_PIXELS")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    with pytest.raises(Image.DecompressionBombError):  # a 16000² PNG is still refused, as without ncz
        Image.open(io.BytesIO(_png_header_only(16000, 16000)))


def _garbage_image(width: int, height: int, frames: int = 1) -> io.BytesIO:
    """An archive whose image sections declare a size but hold nothing decodable."""
    return io.BytesIO(build([Section(f"img{i}", nf.Kind.IMAGE, nf.Codec.RAW, b"", 0, image_params(width, height))
                             for i in range(frames)]))


def test_open_is_lazy_and_the_bomb_check_comes_first():
    start = time.perf_counter()
    with pytest.raises(Image.DecompressionBombError):  # 2^28 pixels: refused from the params alone
        Image.open(_garbage_image(16384, 16384))
    image = Image.open(_garbage_image(4096, 4096, frames=3))
    assert time.perf_counter() - start < 5  # nothing was decoded
    assert (image.format, image.size, image.mode, image.n_frames, image.is_animated) == ("NCZ", (4096, 4096), "RGB",
                                                                                        3, True)
    with pytest.raises(OSError, match="cannot decode ncz image 'img0'"):
        image.load()


@pytest.mark.parametrize("data", [
    b"\x89NCZ\r\n\x1a\n" + bytes(100),  # not a readable container
    bytearray((VECTORS / "basic.ncz").read_bytes()),  # a table checksum error, below
    build([], {"a": 1}),  # a valid archive without images
], ids=["garbage", "checksum", "no-image"])
def test_unreadable_files_are_unidentified(data):
    if isinstance(data, bytearray):
        data[-40] ^= 0xFF  # inside the section table: ChecksumError when the container is opened
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(bytes(data)))


def test_deeply_nested_header_is_unidentified_not_recursion():
    from tests.hostile_files import CASES

    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(CASES["header-nested-1000"][0]))


def test_save_frames_and_rate_options(tmp_path):
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:48, 0:64]
    smooth = np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=2) + rng.normal(0, 3, (48, 64, 3))
    rgb = Image.fromarray(np.clip(smooth, 0, 255).astype(np.uint8))
    gray = Image.fromarray((rng.random((40, 56)) * 255).astype(np.uint8))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray((rng.random((48, 64)) * 255).astype(np.uint8)))

    rgb.save(tmp_path / "q.ncz", quality=2.0)
    rgb.save(tmp_path / "b.ncz", bpp=3.0)
    assert (tmp_path / "b.ncz").stat().st_size <= 64 * 48 * 3.0 / 8
    rgb.save(tmp_path / "s.ncz", size=600)
    assert (tmp_path / "s.ncz").stat().st_size <= 600
    with pytest.raises(ValueError, match="one of quality=, bpp= or size="):
        rgb.save(tmp_path / "x.ncz", quality=2.0, bpp=1.0)
    with pytest.raises(ValueError, match="quality must be in"):
        rgb.save(tmp_path / "x.ncz", quality=99.0)

    rgb.save(tmp_path / "all.ncz", save_all=True, append_images=[gray, rgba], quality=3.0)
    image = Image.open(tmp_path / "all.ncz")
    assert image.n_frames == 3 and image.mode == "RGB" and image.size == (64, 48)
    first = np.asarray(image)
    assert first.shape == (48, 64, 3)
    image.seek(1)
    assert (image.tell(), image.mode, image.size) == (1, "L", (56, 40))
    assert np.asarray(image).shape == (40, 56)
    image.seek(2)
    assert image.mode == "RGBA" and np.array_equal(np.asarray(image)[:, :, 3], np.asarray(rgba)[:, :, 3])
    with pytest.raises(EOFError):
        image.seek(3)
    assert psnr(float(np.mean((first.astype(float) - np.asarray(rgb, dtype=float)) ** 2)), peak=255.0) > 20
