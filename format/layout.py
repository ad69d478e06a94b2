"""Layout constants, reader caps and the per-kind params rules of docs/FORMAT.md §4–§6.

Shared by the writer (which checks the format's MUSTs) and the reader (which
also applies :class:`Limits`, the caps it checks before allocating).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from .enums import Codec, Kind, SectionFlag
from .errors import FormatError, LimitError, UsageError
from .section_codecs import get_codec

__all__ = ["MAGIC", "FOOTER_MAGIC", "VERSION", "ALIGNMENT", "PRELUDE", "PRELUDE_COVERED", "FOOTER", "ENTRY_FIELDS",
           "MAX_NAME_BYTES", "KNOWN_FLAGS", "TENSOR_DTYPES", "REPRESENTATION_HEADS", "MAX_TENSOR_RANK",
           "MAX_IMAGE_SIDE", "MAX_IMAGE_PIXELS",
           "Limits", "SectionInfo", "check_params", "align", "known_kind"]

MAGIC = b"\x89NCZ\r\n\x1a\n"
FOOTER_MAGIC = b"NCZTABLE"
VERSION = (1, 2)  # (major, minor) written by this library
ALIGNMENT = 64
PRELUDE = struct.Struct("<8sHHIQ")  # magic, major, minor, header_length, header_xxh3
PRELUDE_COVERED = 16  # header_xxh3 covers prelude bytes [0, 16) and the header
FOOTER = struct.Struct("<QQQ8s")  # table_offset, table_length, table_xxh3, magic
ENTRY_FIELDS = ("name", "kind", "codec", "flags", "offset", "stored_length", "decoded_length", "checksum", "params")
MAX_NAME_BYTES = 255
KNOWN_FLAGS = int(SectionFlag.CRITICAL | SectionFlag.ALIGNED)

# dtype name -> item size, for TENSOR sections (FORMAT.md §5.1)
TENSOR_DTYPES = {
    "bool": 1, "uint8": 1, "int8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
    "int64": 8, "uint64": 8, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
}
MAX_TENSOR_RANK = 8


@dataclass(frozen=True)
class Limits:
    """Reader caps, each checked before the matching allocation (FORMAT.md §6).

    Pass a raised copy (``Limits(max_file_decoded_bytes=1 << 40)``) to read a file
    that legitimately needs more; lower ones for untrusted input on a small machine.
    """

    max_header_bytes: int = 16 << 20
    max_table_bytes: int = 256 << 20
    max_sections: int = 1 << 20
    max_params_items: int = 1 << 16  # longest array/map inside a header, table or params
    max_total_items: int = 1 << 24  # all arrays/maps of one header or table together
    max_decoded_bytes: int = 1 << 32  # one section (codec other than RAW) or one tensor, decoded
    max_file_decoded_bytes: int = 1 << 36  # everything decoded from one open file, in total
    max_image_pixels: int = 1 << 26  # pixels decoded from one open file, all images together
    max_dimension: int = 1 << 40  # one tensor dimension

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UsageError(f"Limits.{name} must be a non-negative int, got {value!r}")


@dataclass(frozen=True)
class SectionInfo:
    """One entry of the section table, validated (FORMAT.md §4.3)."""

    name: str
    kind: int  # a Kind value, or an unknown id of an ancillary section
    codec: int  # a Codec value, or an unknown id of an ancillary section
    flags: int
    offset: int
    stored_length: int
    decoded_length: int
    checksum: int
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def critical(self) -> bool:
        return bool(self.flags & SectionFlag.CRITICAL)

    @property
    def aligned(self) -> bool:
        return bool(self.flags & SectionFlag.ALIGNED)

    @property
    def known(self) -> bool:
        """True when this reader understands both the kind and the codec."""
        return known_kind(self.kind) and get_codec(self.codec) is not None

    @property
    def kind_name(self) -> str:
        return Kind(self.kind).name.lower() if known_kind(self.kind) else f"unknown({self.kind})"

    @property
    def codec_name(self) -> str:
        return Codec(self.codec).name.lower() if _known_codec(self.codec) else f"unknown({self.codec})"

    def to_entry(self) -> list[Any]:
        return [
            self.name, self.kind, self.codec, self.flags, self.offset,
            self.stored_length, self.decoded_length, self.checksum, dict(self.params),
        ]


def known_kind(value: int) -> bool:
    return value in Kind._value2member_map_


def _known_codec(value: int) -> bool:
    return value in Codec._value2member_map_


def align(offset: int, flags: int) -> int:
    # Placement depends on the flags only, so a reader can check the layout of
    # sections whose codec it does not know.
    if not flags & SectionFlag.ALIGNED:
        return offset
    return -(-offset // ALIGNMENT) * ALIGNMENT


def _uint(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_nbytes(params: Mapping[str, Any], where: str, limits: Limits) -> int:
    """Validate TENSOR params and return the byte size they imply (a Python int: no overflow)."""
    dtype, shape = params.get("dtype"), params.get("shape")
    if dtype not in TENSOR_DTYPES:
        raise FormatError(f"{where}: params.dtype must be one of {sorted(TENSOR_DTYPES)}, got {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_TENSOR_RANK:
        raise FormatError(f"{where}: params.shape must be a list of at most {MAX_TENSOR_RANK} ints")
    count = 1
    for dim in shape:
        if not _uint(dim) or dim > limits.max_dimension:
            raise LimitError(f"{where}: params.shape has dimension {dim!r}, allowed 0..{limits.max_dimension}")
        count *= dim
    return count * TENSOR_DTYPES[dtype]


# heads of model-weight representations other than TENSOR (FORMAT.md §5.4): their dtype/shape
# describe the original tensor; ncz.models refuses to register a representation whose head kind
# is missing here, so none is left unchecked
REPRESENTATION_HEADS = frozenset({Kind.BYTE_PLANES, Kind.QUANTIZED, Kind.LOW_RANK, Kind.DICTIONARY, Kind.CODEBOOK})
MAX_IMAGE_SIDE = 1 << 15
MAX_IMAGE_PIXELS = 1 << 28  # one image (FORMAT.md §5.3)


def _image_side(params: Mapping[str, Any], key: str, where: str) -> int:
    value = params.get(key)
    if not _uint(value) or not 1 <= value <= MAX_IMAGE_SIDE:
        raise FormatError(f"{where}: params.{key} must be an int in 1..{MAX_IMAGE_SIDE}, got {value!r}")
    return value


def _check_image(params: Mapping[str, Any], decoded_length: int, where: str) -> None:
    """Types and ranges of IMAGE params (FORMAT.md §5.3); the codec checks the model's own ranges."""
    width, height = _image_side(params, "width", where), _image_side(params, "height", where)
    tile = params.get("tile")
    if width * height > MAX_IMAGE_PIXELS:
        raise LimitError(f"{where}: params width×height {width}×{height} exceeds {MAX_IMAGE_PIXELS} pixels")
    if params.get("channels") not in (1, 3) or isinstance(params.get("channels"), bool):
        raise FormatError(f"{where}: params.channels must be 1 or 3, got {params.get('channels')!r}")
    quality = params.get("quality")
    if not isinstance(quality, float) or not 0.0 <= quality < float("inf"):
        raise FormatError(f"{where}: params.quality must be a finite float >= 0, got {quality!r}")
    if "model" in params and not isinstance(params["model"], str):  # layout 1 only
        raise FormatError(f"{where}: params.model must be a str, got {params['model']!r}")
    if not isinstance(params.get("weights"), bytes) or len(params["weights"]) != 16:
        raise FormatError(f"{where}: params.weights must be 16 bytes (bin)")
    streams = params.get("streams")
    if "layout" in params:  # layout 2: one latent grid; the stream count is the architecture's (codec checks it)
        if params["layout"] != 2 or isinstance(params["layout"], bool):
            raise FormatError(f"{where}: params.layout must be 2, got {params['layout']!r}")
        if not isinstance(streams, list) or not 1 <= len(streams) <= 16 or not all(_uint(n) for n in streams):
            raise FormatError(f"{where}: params.streams must list 1..16 byte lengths")
    else:  # layout 1 (ncz 0.1): independent tiles, two streams each; readers refuse to decode it
        if not _uint(tile) or not 1 <= tile <= MAX_IMAGE_SIDE:
            raise FormatError(f"{where}: params.tile must be an int in 1..{MAX_IMAGE_SIDE}, got {tile!r}")
        count = 2 * (-(-width // tile)) * (-(-height // tile))
        if not isinstance(streams, list) or len(streams) != count or not all(_uint(n) for n in streams):
            raise FormatError(f"{where}: params.streams must list {count} byte lengths (two per tile)")
    if sum(streams) != decoded_length:
        raise FormatError(f"{where}: params.streams sum to {sum(streams)}, decoded_length is {decoded_length}")


def check_params(kind: int, params: Mapping[str, Any], decoded_length: int, where: str, limits: Limits) -> None:
    if kind in (Kind.TENSOR, Kind.PART):
        nbytes = _tensor_nbytes(params, where, limits)
        if nbytes != decoded_length:
            raise FormatError(f"{where}: dtype/shape imply {nbytes} bytes but decoded_length={decoded_length}")
    elif kind in REPRESENTATION_HEADS:
        # the original tensor's dtype/shape: valid, and its dense size within the cap
        nbytes = _tensor_nbytes(params, where, limits)
        if nbytes > limits.max_decoded_bytes:
            raise LimitError(f"{where}: dtype/shape describe a {nbytes}-byte tensor; the limit is "
                             f"{limits.max_decoded_bytes} (Limits.max_decoded_bytes)")
    elif kind == Kind.IMAGE:
        _check_image(params, decoded_length, where)
