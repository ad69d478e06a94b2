"""Lossless tensors: raw, zstd, or byte planes with per-plane entropy coding.

Float bytes are not alike: in a float32 weight the top byte (sign + 7 exponent
bits) takes a few dozen values, the next one is skewed, the low two are close
to uniform. Grouping each byte position into its own plane and coding it with
a fitted order-0 table (ANS) or zstd, whichever is smaller per plane, beats
zstd on the interleaved bytes. Per tensor the smallest of {raw, zstd-19, byte
planes} is stored, counting what its sections add to the file's table (a
LayerNorm's 384 floats fit in fewer bytes as one zstd section than as a head and
four planes); all are bit-exact, NaN payloads, ±inf and −0.0 included.

Speed (packing MiniLM's 91 MB in seconds, not minutes): zstd runs at the
requested level on payloads up to 64 KiB and at most at level 9 above (on float
bytes levels 1–19 differ by < 1 %, measured on MiniLM, while level 19 costs
~3 s per MB); ANS is tried on a plane only when its order-0 entropy promises
> 0.5 % over the best so far (the low mantissa bytes are ~uniform: raw, which
also decodes fastest); zstd over the whole interleaved tensor is tried on large
tensors only when a 64 KiB sample says it could beat the planes.

Byte planes (kind ``BYTE_PLANES``): head params ``dtype``, ``shape``; parts
``#p0`` … ``#p{k−1}`` for byte k of each element (little-endian, byte 0 lowest).
A part is uint8 ``[n]`` (raw/zstd) or int32 ``[n]`` symbols (ANS).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ncz.format import Codec, DensityError, FormatError, Kind, Reader, SectionInfo, encode_payload
from ncz.format.entropy import read_symbols

from .representation import (
    Encoded,
    PendingSection,
    Representation,
    dtype_name,
    part_name,
    read_part,
    smallest_payload,
    tensor_bytes,
    tensor_label,
    torch_dtype,
)

__all__ = ["encode_lossless", "decode_lossless", "check_lossless_head", "LOSSLESS"]

_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


_BIG = 1 << 16  # bytes: above this zstd is capped at level 9 and whole-tensor zstd is sampled first
_BIG_LEVEL = 9


def _order0_bytes(plane: np.ndarray) -> float:
    counts = np.bincount(plane, minlength=256).astype(np.float64)
    p = counts[counts > 0] / plane.size
    return float(-(p * np.log2(p)).sum()) * plane.size / 8


def _raw_or_zstd(data: bytes | memoryview, level: int):
    level = level if len(data) <= _BIG else min(level, _BIG_LEVEL)
    return smallest_payload(data, [(Codec.RAW, None), (Codec.ZSTD, {"level": level})])


def _plane_payload(plane: np.ndarray, level: int):
    best, dtype = _raw_or_zstd(plane.tobytes(), level), "uint8"
    if plane.size >= 64 and _order0_bytes(plane) + 64 < 0.995 * best.stored_length:
        try:
            ans = encode_payload(plane.astype("<i4").tobytes(), Codec.ANS)
        except DensityError:  # too predictable for ANS (FORMAT.md §7.1): zstd/raw it is
            ans = None
        if ans is not None and ans.stored_length < best.stored_length:
            best, dtype = ans, "int32"
    return best, dtype


def encode_lossless(name: str, tensor: torch.Tensor, *, zstd_level: int = 19, planes: bool = True) -> Encoded:
    """The smallest exact encoding of ``tensor`` (see the module docstring for what is tried)."""
    dtype = dtype_name(tensor.dtype)
    shape = list(tensor.shape)
    raw = tensor_bytes(tensor)
    params = {"dtype": dtype, "shape": shape}
    use_planes = planes and dtype in _ITEMSIZE and tensor.numel() >= 256
    best = None
    if use_planes:
        size = _ITEMSIZE[dtype]
        matrix = np.frombuffer(raw, dtype=np.uint8).reshape(-1, size)
        sections = [PendingSection(name, encode_payload(b"", Codec.RAW), Kind.BYTE_PLANES, dict(params))]
        for k in range(size):
            plane = np.ascontiguousarray(matrix[:, k])
            payload, part_dtype = _plane_payload(plane, zstd_level)
            sections.append(PendingSection(part_name(name, f"p{k}"), payload, Kind.PART,
                                           {"dtype": part_dtype, "shape": [plane.size]}))
        best = Encoded(name, "lossless", sections, tensor.numel(), 0.0)
    whole_worth_trying = True
    if best is not None and len(raw) > _BIG:
        sample = raw[:_BIG]
        ratio = encode_payload(sample, Codec.ZSTD, {"level": min(zstd_level, _BIG_LEVEL)}).stored_length / len(sample)
        whole_worth_trying = ratio < 1.02 * best.stored_bytes / len(raw)
    if whole_worth_trying:
        whole = _raw_or_zstd(raw, zstd_level)
    else:
        whole = encode_payload(raw, Codec.RAW)
    candidate = Encoded(name, "lossless", [PendingSection(name, whole, Kind.TENSOR, params)], tensor.numel(), 0.0)
    if best is None or candidate.file_bytes <= best.file_bytes:  # planes cost five table entries, not one
        best = candidate
    return best


def decode_tensor(head: SectionInfo, reader: Reader) -> torch.Tensor:
    """Kind TENSOR: the decoded bytes are the tensor."""
    dtype = torch_dtype(head.params["dtype"])
    data = bytearray(reader.read(head.name))
    if not data:
        return torch.empty(head.params["shape"], dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(head.params["shape"])


def _plane(reader: Reader, head: SectionInfo, k: int, count: int) -> np.ndarray:
    """Plane ``k`` as uint8 values (uint8 array, or int32 symbols checked to lie in 0..255)."""
    name = part_name(head.name, f"p{k}")
    info = reader.info(name) if name in reader else None
    if info is not None and info.kind == Kind.PART and info.codec in (Codec.ANS, Codec.RANGE) \
            and info.params.get("dtype") == "int32":
        plane = read_symbols(reader, name)  # straight to an int32 array: no detour through bytes
    else:
        plane = read_part(reader, head, f"p{k}")
    if plane.shape != (count,):
        raise FormatError(f"{reader.name}: plane {name!r} has {plane.size} bytes, expected {count}")
    if plane.dtype == np.int32:  # symbols; one pass: a negative int32 is a large uint32
        outside = plane.size and int(plane.view(np.uint32).max()) > 255
    elif plane.dtype != np.uint8:
        outside = plane.size and (plane.min() < 0 or plane.max() > 255)
    else:
        outside = False
    if outside:
        raise FormatError(f"{reader.name}: plane {k} of {head.name!r} holds values outside 0..255")
    return plane


def check_lossless_head(head: SectionInfo, reader: Reader) -> None:
    """A ``TENSOR`` head is checked whole by the container; byte planes are for floats only."""
    if head.kind == Kind.BYTE_PLANES and head.params["dtype"] not in _ITEMSIZE:
        raise FormatError(f"{tensor_label(reader, head)}: byte-plane tensor has dtype {head.params['dtype']!r}; "
                          "planes are for floats")


def decode_byte_planes(head: SectionInfo, reader: Reader) -> torch.Tensor:
    check_lossless_head(head, reader)
    dtype_str = head.params["dtype"]
    size = _ITEMSIZE[dtype_str]
    shape = head.params["shape"]
    count = math.prod(shape)  # exact (the container capped the dense size)
    out = np.empty((count, size), dtype=np.uint8)  # the tensor's bytes; each plane fills one column
    for k in range(size):
        out[:, k] = _plane(reader, head, k, count)
    # little-endian bytes reinterpreted in place (numpy has no bfloat16, torch views any float)
    return torch.from_numpy(out.reshape(-1)).view(torch_dtype(dtype_str)).reshape(shape)


def decode_lossless(head: SectionInfo, reader: Reader) -> torch.Tensor:
    """Kind ``TENSOR`` or ``BYTE_PLANES``: the exact tensor."""
    return decode_tensor(head, reader) if head.kind == Kind.TENSOR else decode_byte_planes(head, reader)


LOSSLESS = Representation("lossless", (Kind.TENSOR, Kind.BYTE_PLANES), encode_lossless, decode_lossless,
                          check_lossless_head)
