"""Section codecs: stored bytes <-> decoded bytes (FORMAT.md §5.2).

A codec is a pair of pure functions registered under its :class:`Codec` id.
``encode(decoded, options) -> (stored, params)`` returns the params the decoder
needs (they are written into the section entry); ``decode(stored, params,
decoded_length, where) -> bytes`` checks everything it is told before it
allocates ``decoded_length`` bytes.

Entropy-coded codecs (range, ANS) live in :mod:`ncz.format.entropy` and register
themselves here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import zstandard

from .enums import Codec
from .errors import FormatError, StreamError, UsageError

__all__ = ["SectionCodec", "get_codec", "require_codec", "register_codec", "ZSTD_MAX_RATIO"]

Buffer = bytes | bytearray | memoryview

# A zstd block of 128 KiB can be a 3-byte RLE block plus its byte; nothing
# compresses better, so a declared size beyond this ratio is a lie (a bomb).
ZSTD_MAX_RATIO = 32768


@dataclass(frozen=True)
class SectionCodec:
    """The encoder and decoder of one codec id."""

    codec: Codec
    encode: Callable[[Buffer, Mapping[str, Any]], tuple[Buffer, dict[str, Any]]]  # raw returns its input
    decode: Callable[[Buffer, Mapping[str, Any], int, str], bytes]
    aligned: bool  # writers align its payloads to 64 by default (FORMAT.md §4.4)
    # True when decoding needs data from outside the section (e.g. the means
    # and scales of a conditional entropy stream); verify() then checks only
    # the checksum.
    needs_context: Callable[[Mapping[str, Any]], bool] = lambda params: False
    # check_lengths(stored_length, decoded_length, where): the codec's size rules,
    # checked when the table is read, before anything is decoded (FORMAT.md §6)
    check_lengths: Callable[[int, int, str], None] = lambda stored, decoded, where: None


_REGISTRY: dict[int, SectionCodec] = {}


def register_codec(codec: SectionCodec) -> None:
    if codec.codec in _REGISTRY:
        raise UsageError(f"codec {codec.codec!r} registered twice")
    _REGISTRY[int(codec.codec)] = codec


def get_codec(codec_id: int) -> SectionCodec | None:
    """The registered codec for ``codec_id``, or None if this build lacks it."""
    return _REGISTRY.get(codec_id)


def require_codec(codec_id: int) -> SectionCodec:
    """The registered codec for ``codec_id`` (UsageError if this build lacks it)."""
    spec = _REGISTRY.get(codec_id)
    if spec is None:
        raise UsageError(f"codec {codec_id!r} is not available")
    return spec


# --- raw -------------------------------------------------------------------


def _raw_encode(data: Buffer, options: Mapping[str, Any]) -> tuple[Buffer, dict[str, Any]]:
    if options:
        raise UsageError(f"codec raw takes no options, got {sorted(options)}")
    return data, {}  # no copy: the writer streams the caller's buffer


def _raw_lengths(stored_length: int, decoded_length: int, where: str) -> None:
    if stored_length != decoded_length:
        raise FormatError(f"{where}: raw section has stored_length {stored_length} != decoded_length {decoded_length}")


def _raw_decode(stored: Buffer, params: Mapping[str, Any], decoded_length: int, where: str) -> bytes:
    _raw_lengths(len(stored), decoded_length, where)
    return bytes(stored)


# --- zstd ------------------------------------------------------------------


def _zstd_encode(data: Buffer, options: Mapping[str, Any]) -> tuple[bytes, dict[str, Any]]:
    unknown = set(options) - {"level"}
    if unknown:
        raise UsageError(f"codec zstd: unknown options {sorted(unknown)}")
    level = int(options.get("level", 3))
    if not 1 <= level <= 22:
        raise UsageError(f"codec zstd: level must be in 1..22, got {level}")
    # Content size in the frame lets the reader cross-check the table; the
    # frame checksum and dictionary id are off because xxh3 covers the payload.
    # threads=0 keeps the output identical on every machine.
    compressor = zstandard.ZstdCompressor(
        level=level, write_content_size=True, write_checksum=False, write_dict_id=False, threads=0
    )
    return compressor.compress(data), {}


def _zstd_lengths(stored_length: int, decoded_length: int, where: str) -> None:
    if decoded_length > max(stored_length, 1) * ZSTD_MAX_RATIO:
        raise FormatError(
            f"{where}: decoded_length {decoded_length} is impossible for {stored_length} zstd bytes"
            f" (max ratio {ZSTD_MAX_RATIO})"
        )


def _zstd_decode(stored: Buffer, params: Mapping[str, Any], decoded_length: int, where: str) -> bytes:
    _zstd_lengths(len(stored), decoded_length, where)
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as exc:
        raise StreamError(f"{where}: not a zstd frame ({exc})") from exc
    if declared != decoded_length:
        raise FormatError(
            f"{where}: zstd frame declares {declared} bytes, table says decoded_length={decoded_length}"
        )
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = decompressor.decompress(stored)
    except zstandard.ZstdError as exc:
        raise StreamError(f"{where}: corrupt zstd stream ({exc})") from exc
    if not decompressor.eof:
        raise StreamError(f"{where}: zstd stream is truncated")
    if decompressor.unused_data:
        raise StreamError(f"{where}: {len(decompressor.unused_data)} bytes after the zstd frame")
    if len(out) != decoded_length:
        raise StreamError(f"{where}: zstd decoded {len(out)} bytes, expected {decoded_length}")
    return out


register_codec(SectionCodec(Codec.RAW, _raw_encode, _raw_decode, aligned=True, check_lengths=_raw_lengths))
register_codec(SectionCodec(Codec.ZSTD, _zstd_encode, _zstd_decode, aligned=False, check_lengths=_zstd_lengths))
