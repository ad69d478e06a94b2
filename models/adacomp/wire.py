"""The AdaComp wire format: one message per parameter tensor, framed per bucket.

docs/FORMAT.md §9 is normative. A message is a 13-byte header (tag, numel, nnz,
scale), the index gaps in one of three encodings, then the sign bits; the
encoder computes the exact size of all three and emits the smallest (ties:
lowest tag). BITPACK wins for dense or uniform gaps (width 0 costs nothing),
VARINT when a few huge gaps would inflate a fixed width, RICE for the
geometric-looking gaps AdaComp typically produces. The varints are the
container's LEB128 (:mod:`ncz.format.entropy_tables`), held to 5 bytes and the
shortest form. A message's length is implied by its contents and
:func:`decode_message` rejects anything else (trailing bytes, padding bits,
over-long varints), so a message is canonical and self-checking.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Sequence
from typing import Final

import numpy as np

from ncz.format import FormatError
from ncz.format.entropy_tables import decode_varints, encode_varints
from ncz.format.errors import AdaCompWireError

from .compressor import U32_MAX, SparseMessage

__all__ = ["WireEncoding", "encoded_sizes", "encode_message", "decode_message", "frame", "unframe"]

_HEADER = struct.Struct("<BIIf")  # tag, numel, nnz, scale
_U32 = struct.Struct("<I")
_MAX_VARINT_BYTES: Final[int] = 5


class WireEncoding(enum.IntEnum):
    """Index-gap encodings; the value is the tag byte on the wire."""

    BITPACK = 0
    VARINT = 1
    RICE = 2


def _bit_length(values: np.ndarray) -> np.ndarray:
    """Per-element bit length of non-negative integers < 2**52 (0 -> 0)."""
    return np.frexp(values.astype(np.float64))[1].astype(np.int64)


def _gaps(indices: np.ndarray) -> np.ndarray:
    gaps = np.empty(indices.size, dtype=np.int64)
    if indices.size:
        gaps[0] = indices[0]
        gaps[1:] = np.diff(indices) - 1
    return gaps


def _pack_fixed(values: np.ndarray, width: int) -> bytes:
    if width == 0 or values.size == 0:
        return b""
    shifts = np.arange(width, dtype=np.uint64)
    bits = ((values.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def _unpack_fixed(buf: np.ndarray, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`_pack_fixed`; ``buf`` must be exactly the packed bytes."""
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    nbits = count * width
    bits = np.unpackbits(buf, bitorder="little")
    if bits[nbits:].any():
        raise AdaCompWireError("non-zero padding bits in a bit-packed field")
    weights = np.left_shift(np.uint64(1), np.arange(width, dtype=np.uint64))
    vals = (bits[:nbits].reshape(count, width).astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
    return vals.astype(np.int64)


def _varint_lengths(gaps: np.ndarray) -> np.ndarray:
    return np.maximum(1, -(-_bit_length(gaps) // 7))


def _rice_sizes(gaps: np.ndarray) -> tuple[int, int]:
    """(best k, payload bytes incl. the k byte) for Rice coding ``gaps``."""
    nnz = gaps.size
    max_k = min(31, int(_bit_length(gaps).max())) if nnz else 0
    best_k, best = 0, None
    for k in range(max_k + 1):
        unary_bits = int((gaps >> k).sum()) + nnz
        size = 1 + -(-unary_bits // 8) + -(-(nnz * k) // 8)
        if best is None or size < best:
            best_k, best = k, size
    assert best is not None
    return best_k, best


def _encode_rice(gaps: np.ndarray, k: int) -> bytes:
    q = gaps >> k
    ones = np.cumsum(q + 1) - 1  # position of each terminating 1 bit
    total_bits = int(ones[-1]) + 1 if gaps.size else 0
    bits = np.zeros(total_bits, dtype=np.uint8)
    bits[ones] = 1
    unary = np.packbits(bits, bitorder="little").tobytes()
    rem = _pack_fixed(gaps & ((1 << k) - 1), k)
    return bytes([k]) + unary + rem


def encoded_sizes(msg: SparseMessage) -> dict[WireEncoding, int]:
    """Exact encoded length in bytes of ``msg`` under each encoding."""
    gaps = _gaps(msg.indices)
    nnz = gaps.size
    fixed = _HEADER.size + -(-nnz // 8)
    width = int(_bit_length(gaps).max()) if nnz else 0
    return {
        WireEncoding.BITPACK: fixed + 1 + -(-(nnz * width) // 8),
        WireEncoding.VARINT: fixed + int(_varint_lengths(gaps).sum()),
        WireEncoding.RICE: fixed + _rice_sizes(gaps)[1],
    }


def encode_message(msg: SparseMessage, encoding: WireEncoding | None = None) -> bytes:
    """Serialize ``msg``; with ``encoding=None`` the smallest encoding is used.

    See the module docstring for the byte layout.
    """
    gaps = _gaps(msg.indices)
    nnz = gaps.size
    if encoding is None:
        sizes = encoded_sizes(msg)
        encoding = min(sizes, key=lambda e: (sizes[e], int(e)))
    encoding = WireEncoding(encoding)
    if encoding is WireEncoding.BITPACK:
        width = int(_bit_length(gaps).max()) if nnz else 0
        body = bytes([width]) + _pack_fixed(gaps, width)
    elif encoding is WireEncoding.VARINT:
        body = encode_varints(gaps, signed=False)
    else:
        body = _encode_rice(gaps, _rice_sizes(gaps)[0])
    signs = np.packbits(msg.signs.astype(np.uint8), bitorder="little").tobytes()
    return _HEADER.pack(int(encoding), msg.numel, nnz, msg.scale) + body + signs


def _need(buf: np.ndarray, pos: int, count: int, what: str) -> None:
    if count < 0 or pos + count > buf.size:
        raise AdaCompWireError(
            f"truncated message: {what} needs {count} bytes at offset {pos}, only {buf.size - pos} left"
        )


def _decode_varint(region: np.ndarray, nnz: int) -> tuple[np.ndarray, int]:
    """``nnz`` gaps in the container's LEB128, each at most 5 bytes and in its shortest form."""
    try:
        gaps, end = decode_varints(region, nnz, signed=False, where="AdaComp message")
    except FormatError as exc:
        raise AdaCompWireError(f"malformed varints: {exc}") from exc
    if nnz and not 0 <= int(gaps.min()) <= int(gaps.max()) <= U32_MAX:  # wider than 32 bits: > 5 bytes
        raise AdaCompWireError(f"varint longer than {_MAX_VARINT_BYTES} bytes")
    if encode_varints(gaps, signed=False) != region[:end].tobytes():
        raise AdaCompWireError("over-long varint encoding")
    return gaps, end


def _decode_rice(region: np.ndarray, nnz: int) -> tuple[np.ndarray, int]:
    if region.size < 1:
        raise AdaCompWireError("truncated message: missing Rice parameter byte")
    k = int(region[0])
    if k > 31:
        raise AdaCompWireError(f"Rice parameter k={k} > 31")
    if nnz == 0:
        return np.zeros(0, np.int64), 1
    bits = np.unpackbits(region[1:], bitorder="little")
    ones = np.flatnonzero(bits)
    if ones.size < nnz:
        raise AdaCompWireError(f"truncated message: {ones.size} of {nnz} unary codes present")
    last = int(ones[nnz - 1])
    unary_bytes = last // 8 + 1
    if ones.size > nnz and int(ones[nnz]) < unary_bytes * 8:
        raise AdaCompWireError("non-zero padding bits after the unary quotients")
    q = np.diff(np.concatenate(([-1], ones[:nnz]))) - 1
    rem_bytes = -(-(nnz * k) // 8)
    start = 1 + unary_bytes
    _need(region, start, rem_bytes, "Rice remainders")
    rem = _unpack_fixed(region[start : start + rem_bytes], nnz, k)
    if int(q.max()) >= 1 << (32 - k):  # gaps must fit in u32; also keeps the shift in int64
        raise AdaCompWireError("Rice quotient too large")
    return (q.astype(np.int64) << k) | rem, start + rem_bytes


def decode_message(data: bytes | bytearray | memoryview, expected_numel: int | None = None) -> SparseMessage:
    """Parse and validate one message produced by :func:`encode_message`.

    Args:
        data: exactly one message (no trailing bytes).
        expected_numel: if given, the message must describe a tensor of this
            length (the hook passes the local parameter size, so a peer with a
            different model is caught before anything is allocated).

    Raises:
        AdaCompWireError: truncated input, unknown tag, ``nnz > numel``,
            indices out of bounds, bad scale, non-canonical padding or varints,
            trailing bytes.
    """
    raw = bytes(data)
    buf = np.frombuffer(raw, dtype=np.uint8)
    _need(buf, 0, _HEADER.size, "header")
    tag, numel, nnz, scale = _HEADER.unpack_from(raw, 0)
    try:
        encoding = WireEncoding(tag)
    except ValueError:
        raise AdaCompWireError(f"unknown encoding tag {tag}") from None
    if expected_numel is not None and numel != expected_numel:
        raise AdaCompWireError(f"message numel {numel} != expected {expected_numel}")
    if nnz > numel:
        raise AdaCompWireError(f"nnz {nnz} > numel {numel}")
    if not math.isfinite(scale) or scale < 0:
        raise AdaCompWireError(f"scale must be finite and >= 0, got {scale}")
    if nnz == 0 and scale != 0:
        raise AdaCompWireError("empty message with non-zero scale")
    sign_bytes = -(-nnz // 8)
    pos = _HEADER.size
    # cheap lower bound before any allocation proportional to nnz
    _need(buf, pos, sign_bytes, "sign bits")
    region = buf[pos : buf.size - sign_bytes]
    if encoding is WireEncoding.BITPACK:
        _need(region, 0, 1, "bit width")
        width = int(region[0])
        if width > 32:
            raise AdaCompWireError(f"bit width {width} > 32")
        nbytes = -(-(nnz * width) // 8)
        _need(region, 1, nbytes, "bit-packed gaps")
        gaps = _unpack_fixed(region[1 : 1 + nbytes], nnz, width)
        used = 1 + nbytes
    elif encoding is WireEncoding.VARINT:
        if region.size < nnz:
            raise AdaCompWireError(f"truncated message: {nnz} varints need >= {nnz} bytes")
        gaps, used = _decode_varint(region, nnz)
    else:
        gaps, used = _decode_rice(region, nnz)
    if used != region.size:
        raise AdaCompWireError(
            f"message length mismatch: index payload is {used} bytes but {region.size} precede the sign bits"
        )
    if nnz:
        if int(gaps.min()) < 0 or int(gaps.max()) >= numel:
            raise AdaCompWireError(f"index gap out of range for numel {numel}")
        # gaps < 2**32 and nnz < 2**32, so this uint64 sum cannot overflow
        last = int(gaps.astype(np.uint64).sum(dtype=np.uint64)) + nnz - 1
        if last >= numel:
            raise AdaCompWireError(f"index {last} out of range [0, {numel})")
        indices = np.cumsum(gaps + 1) - 1
    else:
        indices = gaps
    sign_buf = buf[buf.size - sign_bytes :]
    sign_bits = np.unpackbits(sign_buf, bitorder="little")
    if sign_bits[nnz:].any():
        raise AdaCompWireError("non-zero padding bits after the sign bits")
    return SparseMessage(numel=numel, indices=indices, signs=sign_bits[:nnz].astype(np.bool_), scale=scale)


def frame(messages: Sequence[bytes]) -> bytes:
    parts = [_U32.pack(len(messages))]
    for m in messages:
        parts.append(_U32.pack(len(m)))
        parts.append(m)
    return b"".join(parts)


def unframe(payload: bytes, expected_count: int) -> list[bytes]:
    if len(payload) < 4:
        raise AdaCompWireError("truncated bucket payload: missing message count")
    (count,) = _U32.unpack_from(payload, 0)
    if count != expected_count:
        raise AdaCompWireError(f"bucket payload has {count} messages, expected {expected_count}")
    out: list[bytes] = []
    pos = 4
    for i in range(count):
        if pos + 4 > len(payload):
            raise AdaCompWireError(f"truncated bucket payload at frame {i}")
        (length,) = _U32.unpack_from(payload, pos)
        pos += 4
        if pos + length > len(payload):
            raise AdaCompWireError(f"truncated bucket payload inside frame {i}")
        out.append(payload[pos : pos + length])
        pos += length
    if pos != len(payload):
        raise AdaCompWireError(f"{len(payload) - pos} trailing bytes after the last frame")
    return out

