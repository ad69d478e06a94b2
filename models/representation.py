"""What every weight representation shares: the record that describes one, pending
sections and results, and the helpers their encoders and decoders use.

A representation turns one tensor into a *head* section (its kind names the
representation) plus ``PART`` sections named ``<head>#<part>`` (FORMAT.md §5.4),
and back. It is described by one :class:`Representation` record::

    encode(name, tensor, **options) -> Encoded(sections=[head, parts...], rel_error)
    check_head(head, reader)        -> None   (params and references, from the table alone)
    decode(head, reader)            -> torch.Tensor
    build_module(head, reader, original_module) -> compact module   (optional)

The records are listed once, in :mod:`ncz.models.registry`. Encoders pre-encode
payloads (``ncz.format.encode_payload``) so they can pick the smallest codec per
part before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ncz.format import (
    Codec,
    DensityError,
    EncodedPayload,
    FormatError,
    InputError,
    Kind,
    Reader,
    SectionInfo,
    UnsupportedError,
    UsageError,
    encode_payload,
    section_overhead,
)
from ncz.format.entropy import CategoricalModel, symbols_payload
from ncz.format.layout import REPRESENTATION_HEADS

__all__ = [
    "PendingSection",
    "Encoded",
    "Representation",
    "Encoder",
    "Progress",
    "Decoder",
    "HeadCheck",
    "ModuleBuilder",
    "DTYPE_NAMES",
    "dtype_name",
    "torch_dtype",
    "tensor_bytes",
    "part_name",
    "read_part",
    "smallest_payload",
    "symbol_payload",
    "dense_nbytes",
    "relative_error",
    "all_finite",
    "float32_to",
    "storage_view",
    "entropy_bits",
    "tensor_label",
]

DTYPE_NAMES = {
    torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64",
    torch.int8: "int8", torch.uint8: "uint8", torch.int16: "int16", torch.int32: "int32", torch.int64: "int64",
    torch.bool: "bool",
}
_TORCH_OF = {name: dtype for dtype, name in DTYPE_NAMES.items()}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1, "int16": 2, "int32": 4,
            "int64": 8, "bool": 1, "uint16": 2, "uint32": 4, "uint64": 8}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise InputError(f"tensor dtype {dtype} is not supported (supported: {sorted(_TORCH_OF)})") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a head's ``dtype``; FORMAT.md dtypes torch lacks (uint16 …) are a
    feature not built here."""
    try:
        return _TORCH_OF[name]
    except KeyError:
        raise UnsupportedError(f"dtype {name!r} cannot be restored as a torch tensor") from None


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, little-endian C order, without a copy when possible."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B") if flat.numel() else memoryview(b"")


def part_name(head: str, part: str) -> str:
    return f"{head}#{part}"


@dataclass(frozen=True)
class PendingSection:
    name: str
    payload: EncodedPayload
    kind: int
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Encoded:
    """One tensor in its representation, ready to be written."""

    name: str
    representation: str
    sections: list[PendingSection]
    numel: int
    rel_error: float  # ||W − Ŵ|| / ||W||; 0.0 when exact

    @property
    def stored_bytes(self) -> int:
        return sum(s.payload.stored_length for s in self.sections)

    @property
    def file_bytes(self) -> int:
        """Payload bytes plus what the sections cost in the file's table (and alignment):
        what choosing this encoding adds to the archive."""
        return self.stored_bytes + sum(section_overhead(s.name, s.kind, s.payload, s.params) for s in self.sections)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.stored_bytes / max(self.numel, 1)


Progress = Callable[[int, int, str], None]  # (done, total, what): how long work reports itself
Encoder = Callable[..., Encoded]  # (name, tensor, **options) -> Encoded
Decoder = Callable[[SectionInfo, Reader], torch.Tensor]
HeadCheck = Callable[[SectionInfo, Reader], None]
ModuleBuilder = Callable[[SectionInfo, Reader, torch.nn.Module], torch.nn.Module]


@dataclass(frozen=True)
class Representation:
    """Everything the archive needs to know about one weight representation.

    ``check_head(head, reader)`` validates the head's params (and references to
    other heads) from the section table alone, so an archive is checked before
    any part is read or anything allocated; ``decode`` may assume it passed.
    ``build_module(head, reader, original)`` gets the module that owns the
    weight (e.g. an ``nn.Linear``) and returns its compact replacement (e.g.
    ``LowRankLinear``) carrying over everything but the weight; None: dense only.
    ``uses_calibration``: ``encode`` takes ``calibration=`` (a
    :class:`ncz.models.quantized.TensorCalibration` or None) when the archive is
    packed with calibration statistics.
    """

    name: str  # what recipes call it
    kinds: tuple[Kind, ...]  # the head kinds it writes and decodes
    encode: Encoder
    decode: Decoder
    check_head: HeadCheck
    build_module: ModuleBuilder | None = None
    uses_calibration: bool = False

    def __post_init__(self) -> None:
        # the container checks a head's dtype/shape and caps its dense size when the table is
        # read (FORMAT.md §5.4); a head kind it does not know as one would skip that silently
        for kind in self.kinds:
            if kind != Kind.TENSOR and kind not in REPRESENTATION_HEADS:
                raise UsageError(f"representation {self.name!r}: kind {kind!r} is not a representation head "
                                 "the container validates (ncz.format.layout.REPRESENTATION_HEADS)")


def tensor_label(reader: Reader, head: SectionInfo) -> str:
    """How decoder messages name a tensor: the file and the head."""
    return f"{reader.name}: {head.name!r}"


def read_part(reader: Reader, head: SectionInfo, part: str, *, dtype: str | None = None) -> np.ndarray:
    """A part's decoded content as a numpy array of its declared dtype and shape."""
    name = part_name(head.name, part)
    if name not in reader:
        raise FormatError(f"{reader.name}: tensor {head.name!r} lacks its part {name!r}")
    info = reader.info(name)
    if info.kind != Kind.PART:
        raise FormatError(f"{reader.name}: section {name!r} should be a part (kind {int(Kind.PART)})")
    declared = info.params.get("dtype")
    if dtype is not None and declared != dtype:
        raise FormatError(f"{reader.name}: part {name!r} has dtype {declared!r}, expected {dtype!r}")
    data = reader.view(name) if info.codec == Codec.RAW else reader.read(name)
    np_dtype = np.dtype(declared).newbyteorder("<") if declared != "bfloat16" else np.dtype("<u2")
    return np.frombuffer(data, dtype=np_dtype).reshape(info.params["shape"])


def symbol_payload(symbols: np.ndarray, zstd_level: int = 19, model: CategoricalModel | None = None) -> EncodedPayload:
    """Integer symbols (int32 on disk, any integer dtype here) as an ANS payload, or ZSTD when they
    are too predictable for an entropy-coded section (FORMAT.md §7.1: at most 1024 symbols per byte).
    ``model``: the table already fitted to ``symbols`` (what the codec would fit), to save a pass."""
    try:
        return symbols_payload(symbols, model)
    except DensityError:
        data = np.ascontiguousarray(symbols, dtype="<i4").tobytes()
        return encode_payload(data, Codec.ZSTD, {"level": zstd_level})


def dense_nbytes(params: dict) -> int:
    """Bytes of the dense tensor a head describes (Python ints: no wrap-around)."""
    count = 1
    for dim in params["shape"]:
        count *= int(dim)
    return count * ITEMSIZE[params["dtype"]]


def smallest_payload(data: bytes | memoryview, candidates: list[tuple[Codec, dict | None]]) -> EncodedPayload:
    """Encode with each (codec, options) and keep the smallest (first wins ties)."""
    best: EncodedPayload | None = None
    for codec, options in candidates:
        payload = encode_payload(data, codec, options)
        if best is None or payload.stored_length < best.stored_length:
            best = payload
    assert best is not None
    return best


_EXPONENT_BITS = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
                  torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000)}


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """No NaN or ±inf in a float tensor: an all-ones exponent field, tested on the bits
    in chunks (a few times faster than ``torch.isfinite`` on bf16, and no tensor-size mask)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.dtype not in _EXPONENT_BITS:
        return bool(torch.isfinite(flat).all())
    int_dtype, mask = _EXPONENT_BITS[flat.dtype]
    bits = flat.view(int_dtype).numpy()
    mask = np.array(mask, dtype=bits.dtype) if mask < 2 ** (8 * bits.itemsize - 1) else \
        np.array(mask - 2 ** (8 * bits.itemsize), dtype=bits.dtype)
    return all(not np.any((bits[i:i + chunk] & mask) == mask) for i in range(0, bits.size, chunk))


def float32_to(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float32 ``values`` cast to ``dtype`` as torch casts (floats: nearest, ties to even), returned as
    that dtype's storage (bf16: its uint16 bits); numpy arithmetic, no torch kernel (no thread pool)."""
    if dtype == torch.float32:
        return values
    if dtype == torch.bfloat16:
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        bits = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        return (bits >> np.uint32(16)).astype(np.uint16)  # finite inputs: no NaN to keep
    if dtype in (torch.float16, torch.float64):
        with np.errstate(over="ignore"):  # beyond float16's range is ±inf, as torch gives (and says nothing)
            return values.astype(np.float16 if dtype == torch.float16 else np.float64)
    return torch.from_numpy(np.ascontiguousarray(values)).to(dtype).numpy()


def storage_view(tensor: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous tensor's storage (bf16 as uint16)."""
    flat = tensor.reshape(-1)
    return flat.view(torch.int16).numpy().view(np.uint16) if flat.dtype == torch.bfloat16 else flat.numpy()


def relative_error(original: torch.Tensor, restored: torch.Tensor) -> float:
    a = original.detach().double().reshape(-1)
    b = restored.detach().double().reshape(-1)
    norm = float(a.norm())
    diff = float((a - b).norm())
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


def entropy_bits(q: np.ndarray) -> float:
    """Empirical entropy in bits per symbol (what a fitted ANS table achieves, ±table cost)."""
    lo, hi = int(q.min()), int(q.max())
    if hi - lo < 1 << 22:
        counts = np.bincount((q - lo).ravel())
    else:
        counts = np.unique(q, return_counts=True)[1]
    counts = counts[counts > 0].astype(np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())
