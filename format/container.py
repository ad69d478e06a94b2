"""The .ncz container: streaming atomic writer and validating lazy reader.

Byte layout (normative text: docs/FORMAT.md)::

    offset 0   prelude   24 B  magic "\\x89NCZ\\r\\n\\x1a\\n", major u16, minor u16,
                               header_length u32, header_xxh3 u64   (little-endian)
    24         header    canonical msgpack map (file metadata)
    ...        payloads  one per section, in table order; raw payloads start at a
                         multiple of 64, the gap is zero bytes; others follow directly
    T          table     canonical msgpack array of section entries
    end - 32   footer    table_offset u64, table_length u64, table_xxh3 u64, "NCZTABLE"

The table sits at the end so a writer can stream sections of unknown count and
size; the footer lets a reader find it with one seek. A reader checks the whole
layout (every offset is *the* offset the rules imply) before it trusts any
length, and checks each payload's xxh3-64 before it hands bytes out.
"""

from __future__ import annotations

import io
import mmap
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from . import canonical
from .checksum import xxh3_64
from .enums import Codec, Kind, SectionFlag
from .errors import (
    ChecksumError,
    FormatError,
    LimitError,
    NczError,
    TruncatedError,
    UnsupportedError,
    UsageError,
    VersionError,
)
from .section_codecs import get_codec

__all__ = [
    "MAGIC",
    "FOOTER_MAGIC",
    "VERSION",
    "ALIGNMENT",
    "Limits",
    "SectionInfo",
    "Writer",
    "Reader",
    "EncodedPayload",
    "encode_payload",
    "open",
    "open_bytes",
]

MAGIC = b"\x89NCZ\r\n\x1a\n"
FOOTER_MAGIC = b"NCZTABLE"
VERSION = (1, 0)  # (major, minor) written by this library
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
}  # fmt: skip
MAX_TENSOR_RANK = 8


@dataclass(frozen=True)
class Limits:
    """Reader caps, each checked before the matching allocation (FORMAT.md §6)."""

    max_header_bytes: int = 16 << 20
    max_table_bytes: int = 256 << 20
    max_sections: int = 1 << 20
    max_params_items: int = 1 << 16  # longest array/map inside a header, table or params
    max_decoded_bytes: int = 1 << 40  # one section, decoded
    max_dimension: int = 1 << 40  # one tensor dimension

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value < 0:
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
        return _known_kind(self.kind) and get_codec(self.codec) is not None

    @property
    def kind_name(self) -> str:
        return Kind(self.kind).name.lower() if _known_kind(self.kind) else f"unknown({self.kind})"

    @property
    def codec_name(self) -> str:
        return Codec(self.codec).name.lower() if _known_codec(self.codec) else f"unknown({self.codec})"

    def to_entry(self) -> list[Any]:
        return [
            self.name, self.kind, self.codec, self.flags, self.offset,
            self.stored_length, self.decoded_length, self.checksum, dict(self.params),
        ]  # fmt: skip


def _known_kind(value: int) -> bool:
    return value in Kind._value2member_map_


def _known_codec(value: int) -> bool:
    return value in Codec._value2member_map_


def _align(offset: int, flags: int) -> int:
    # Placement depends on the flags only, so a reader can check the layout of
    # sections whose codec it does not know.
    if not flags & SectionFlag.ALIGNED:
        return offset
    return -(-offset // ALIGNMENT) * ALIGNMENT


def _tensor_nbytes(params: Mapping[str, Any], where: str, limits: Limits) -> int:
    """Validate TENSOR params and return the byte size they imply."""
    dtype, shape = params.get("dtype"), params.get("shape")
    if dtype not in TENSOR_DTYPES:
        raise FormatError(f"{where}: params.dtype must be one of {sorted(TENSOR_DTYPES)}, got {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_TENSOR_RANK:
        raise FormatError(f"{where}: params.shape must be a list of at most {MAX_TENSOR_RANK} ints")
    count = 1
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or not 0 <= dim <= limits.max_dimension:
            raise LimitError(f"{where}: params.shape has dimension {dim!r}, allowed 0..{limits.max_dimension}")
        count *= dim
    return count * TENSOR_DTYPES[dtype]


_REPRESENTATION_HEADS = {Kind.BYTE_PLANES, Kind.QUANTIZED, Kind.LOW_RANK, Kind.DICTIONARY, Kind.CODEBOOK}


def _check_params(kind: int, params: Mapping[str, Any], decoded_length: int, where: str, limits: Limits) -> None:
    if kind in (Kind.TENSOR, Kind.PART):
        nbytes = _tensor_nbytes(params, where, limits)
        if nbytes != decoded_length:
            raise FormatError(f"{where}: dtype/shape imply {nbytes} bytes but decoded_length={decoded_length}")
    elif kind in _REPRESENTATION_HEADS:
        _tensor_nbytes(params, where, limits)  # the original tensor's dtype/shape: valid and within caps


# ---------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedPayload:
    """Stored bytes of a section before it is written: lets a caller compare
    codecs by size (e.g. zstd vs ANS per tensor) and write the smallest."""

    codec: int
    stored: bytes | memoryview
    decoded_length: int
    params: Mapping[str, Any]

    @property
    def stored_length(self) -> int:
        return len(self.stored)


def encode_payload(data: bytes | bytearray | memoryview, codec: Codec, options: Mapping[str, Any] | None = None) -> EncodedPayload:
    """Encode ``data`` with ``codec`` without writing it anywhere."""
    spec = get_codec(int(codec))
    if spec is None:
        raise UsageError(f"codec {codec!r} is not available")
    view = data if isinstance(data, bytes) else memoryview(data).cast("B")
    stored, params = spec.encode(view, dict(options or {}))
    return EncodedPayload(int(codec), stored, len(view), params)


class Writer:
    """Streams sections into a new .ncz file; atomic and deterministic.

    ``target`` is a path (written to a temporary file in the same folder and
    renamed on :meth:`close`, so a crash never leaves a half file under the
    final name; ``durable`` also fsyncs before the rename, so after a power loss
    the final name holds either the old file or the whole new one) or a writable
    binary stream (written in place). Same sections in
    the same order give the same bytes::

        with Writer("out.ncz", metadata={"source": "demo"}) as w:
            w.add("weights", data, kind=Kind.TENSOR, params={"dtype": "float32", "shape": [4]})
    """

    def __init__(
        self,
        target: str | os.PathLike[str] | BinaryIO,
        *,
        metadata: Mapping[str, Any] | None = None,
        durable: bool = True,
    ):
        header = canonical.pack(dict(metadata or {}))
        if len(header) > Limits().max_header_bytes:
            raise UsageError(f"header metadata is {len(header)} bytes; the limit is {Limits().max_header_bytes}")
        self._path: Path | None = None
        self._tmp: str | None = None
        self._durable = durable
        if isinstance(target, (str, os.PathLike)):
            self._path = Path(target)
            fd, self._tmp = tempfile.mkstemp(prefix=f".{self._path.name}.", suffix=".tmp", dir=self._path.parent or ".")
            self._file: BinaryIO = os.fdopen(fd, "wb")
        else:
            self._file = target
        self._entries: list[SectionInfo] = []
        self._names: set[str] = set()
        self._closed = False
        covered = PRELUDE.pack(MAGIC, VERSION[0], VERSION[1], len(header), 0)[:PRELUDE_COVERED] + header
        prelude = PRELUDE.pack(MAGIC, VERSION[0], VERSION[1], len(header), xxh3_64(covered))
        self._file.write(prelude)
        self._file.write(header)
        self._position = len(prelude) + len(header)

    @property
    def sections(self) -> list[SectionInfo]:
        """Entries written so far."""
        return list(self._entries)

    def add(
        self,
        name: str,
        data: bytes | bytearray | memoryview,
        *,
        kind: Kind = Kind.BLOB,
        codec: Codec = Codec.RAW,
        params: Mapping[str, Any] | None = None,
        critical: bool = True,
        options: Mapping[str, Any] | None = None,
        aligned: bool | None = None,
    ) -> SectionInfo:
        """Encode ``data`` with ``codec`` and append it as section ``name``.

        ``params`` describe the decoded bytes (e.g. dtype and shape of a tensor);
        ``options`` steer the encoder (e.g. ``{"level": 19}`` for zstd) and are
        not stored.
        """
        spec = get_codec(int(codec))
        if spec is None:
            raise UsageError(f"codec {codec!r} is not available")
        data = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        stored, codec_params = spec.encode(data, dict(options or {}))
        merged = dict(params or {})
        clash = set(merged) & set(codec_params)
        if clash:
            raise UsageError(f"section {name!r}: params {sorted(clash)} are reserved by codec {Codec(codec).name}")
        merged.update(codec_params)
        return self.add_stored(
            name, stored, decoded_length=len(data), kind=kind, codec=codec, params=merged, critical=critical,
            aligned=aligned,
        )

    def add_encoded(self, name: str, payload: "EncodedPayload", *, kind: int,
                    params: Mapping[str, Any] | None = None, critical: bool = True,
                    aligned: bool | None = None) -> SectionInfo:
        """Append a payload already encoded by :func:`encode_payload`."""
        merged = dict(params or {})
        clash = set(merged) & set(payload.params)
        if clash:
            raise UsageError(f"section {name!r}: params {sorted(clash)} are reserved by its codec")
        merged.update(payload.params)
        return self.add_stored(name, payload.stored, decoded_length=payload.decoded_length, kind=kind,
                               codec=payload.codec, params=merged, critical=critical, aligned=aligned)

    def add_stored(
        self,
        name: str,
        stored: bytes | bytearray | memoryview,
        *,
        decoded_length: int,
        kind: int,
        codec: int,
        params: Mapping[str, Any] | None = None,
        critical: bool = True,
        aligned: bool | None = None,
    ) -> SectionInfo:
        """Append already-encoded bytes (used by the entropy coders).

        ``aligned`` (default: the codec's default, True for raw) places the
        payload at a multiple of 64 so it can be used in place from a mapping."""
        if self._closed:
            raise UsageError("writer is closed")
        if not isinstance(name, str) or not name or len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise UsageError(f"section name must be 1..{MAX_NAME_BYTES} UTF-8 bytes, got {name!r}")
        if name in self._names:
            raise UsageError(f"section name {name!r} is used twice")
        if get_codec(int(codec)) is None:
            raise UsageError(f"codec {codec!r} is not available")
        params = dict(params or {})
        canonical.pack(params)  # fail now, not at close, on unstorable params
        _check_params(int(kind), params, decoded_length, f"section {name!r}", Limits())
        if aligned is None:
            aligned = get_codec(int(codec)).aligned
        flags = (int(SectionFlag.CRITICAL) if critical else 0) | (int(SectionFlag.ALIGNED) if aligned else 0)
        offset = _align(self._position, flags)
        if offset > self._position:
            self._file.write(bytes(offset - self._position))
        self._file.write(stored)
        self._position = offset + len(stored)
        info = SectionInfo(
            name, int(kind), int(codec), flags, offset, len(stored), int(decoded_length), xxh3_64(stored), params
        )
        self._entries.append(info)
        self._names.add(name)
        return info

    def close(self) -> None:
        """Write the table and footer, then atomically publish the file."""
        if self._closed:
            return
        table = canonical.pack([info.to_entry() for info in self._entries])
        self._file.write(table)
        self._file.write(FOOTER.pack(self._position, len(table), xxh3_64(table), FOOTER_MAGIC))
        self._closed = True
        if self._tmp is not None and self._path is not None:
            self._file.flush()
            if self._durable:  # data on disk before the rename makes it visible
                os.fsync(self._file.fileno())
            self._file.close()
            os.chmod(self._tmp, 0o644)
            os.replace(self._tmp, self._path)
            self._tmp = None
        else:
            self._file.flush()

    def abort(self) -> None:
        """Discard everything; the final path is never created."""
        self._closed = True
        if self._tmp is not None:
            self._file.close()
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
            self._tmp = None

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:  # an unclosed writer must not leave its temp file
        if getattr(self, "_tmp", None) is not None:
            self.abort()


# ---------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------


class Reader:
    """A validated, lazily read .ncz file.

    Construction checks prelude, header, footer and the whole table (layout,
    names, kinds, codecs, caps) but reads no payload. Payloads are checked
    against their xxh3-64 when first accessed (:meth:`read`, :meth:`view`) or
    all at once by :meth:`verify`.
    """

    def __init__(self, buffer: bytes | mmap.mmap, *, name: str, limits: Limits | None = None, owner: Any = None):
        self.name = name
        self.limits = limits or Limits()
        self._buffer = buffer
        self._view = memoryview(buffer)
        self._owner = owner
        self._verified: set[str] = set()
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # -- parsing ------------------------------------------------------------

    def _err(self, message: str) -> str:
        return f"{self.name}: {message}"

    def _parse(self) -> None:
        size = len(self._view)
        if size < PRELUDE.size:
            raise TruncatedError(self._err(f"file is {size} bytes; an .ncz file has at least {PRELUDE.size + FOOTER.size}"))
        magic, major, minor, header_length, header_sum = PRELUDE.unpack_from(self._view, 0)
        if magic != MAGIC:
            raise FormatError(self._err(f"prelude.magic is {magic!r}, expected {MAGIC!r} (not an .ncz file)"))
        if major != VERSION[0]:
            raise VersionError(self._err(f"prelude.major is {major}; this reader implements major {VERSION[0]}"))
        self.version = (major, minor)
        if header_length > self.limits.max_header_bytes:
            raise LimitError(self._err(f"prelude.header_length {header_length} exceeds the limit {self.limits.max_header_bytes}"))
        header_end = PRELUDE.size + header_length
        if header_end + FOOTER.size > size:
            raise TruncatedError(self._err(f"prelude.header_length {header_length} runs past the end of the {size}-byte file"))
        self._header_end = header_end
        header = self._view[PRELUDE.size:header_end]
        if xxh3_64(bytes(self._view[:PRELUDE_COVERED]) + bytes(header)) != header_sum:
            raise ChecksumError(self._err("prelude/header checksum mismatch (prelude.header_xxh3)"))
        meta = canonical.unpack(bytes(header), what=self._err("header"), max_bytes=self.limits.max_header_bytes, max_items=self.limits.max_params_items)
        if not isinstance(meta, dict):
            raise FormatError(self._err("header must be a msgpack map"))
        self.metadata: dict[str, Any] = meta

        table_offset, table_length, table_sum, footer_magic = FOOTER.unpack_from(self._view, size - FOOTER.size)
        if footer_magic != FOOTER_MAGIC:
            raise TruncatedError(self._err(f"footer.magic is {footer_magic!r}, expected {FOOTER_MAGIC!r} (truncated or not closed)"))
        if table_length > self.limits.max_table_bytes:
            raise LimitError(self._err(f"footer.table_length {table_length} exceeds the limit {self.limits.max_table_bytes}"))
        if table_offset + table_length != size - FOOTER.size or table_offset < header_end:
            raise FormatError(self._err(
                f"footer.table_offset {table_offset} + table_length {table_length} must end at {size - FOOTER.size}"
                f" and start at or after {header_end}"))
        table_bytes = self._view[table_offset:table_offset + table_length]
        if xxh3_64(table_bytes) != table_sum:
            raise ChecksumError(self._err("section table checksum mismatch (footer.table_xxh3)"))
        table = canonical.unpack(bytes(table_bytes), what=self._err("section table"), max_bytes=self.limits.max_table_bytes, max_items=max(self.limits.max_sections, self.limits.max_params_items))
        if not isinstance(table, list):
            raise FormatError(self._err("section table must be a msgpack array"))
        if len(table) > self.limits.max_sections:
            raise LimitError(self._err(f"section table has {len(table)} entries; the limit is {self.limits.max_sections}"))

        sections: dict[str, SectionInfo] = {}
        position = header_end
        for index, entry in enumerate(table):
            info = self._parse_entry(index, entry)
            where = self._err(f"section {info.name!r}")
            if info.name in sections:
                raise FormatError(self._err(f"section[{index}].name {info.name!r} is not unique"))
            expected = _align(position, info.flags)
            if info.offset != expected:
                raise FormatError(f"{where}: offset is {info.offset}, expected {expected} (sections are packed in table order)")
            end = info.offset + info.stored_length
            if end > table_offset:
                raise FormatError(f"{where}: stored_length {info.stored_length} runs into the section table")
            if info.decoded_length > self.limits.max_decoded_bytes:
                raise LimitError(f"{where}: decoded_length {info.decoded_length} exceeds the limit {self.limits.max_decoded_bytes}")
            if not info.known:
                if info.critical:
                    what = f"kind {info.kind}" if not _known_kind(info.kind) else f"codec {info.codec}"
                    raise UnsupportedError(f"{where}: critical section uses unknown {what}; upgrade ncz to read this file")
            else:
                if info.codec == Codec.RAW and info.decoded_length != info.stored_length:
                    raise FormatError(f"{where}: raw section has stored_length {info.stored_length} != decoded_length {info.decoded_length}")
                _check_params(info.kind, info.params, info.decoded_length, where, self.limits)
            sections[info.name] = info
            position = end
        if position != table_offset:
            raise FormatError(self._err(f"{table_offset - position} unaccounted bytes before the section table (expected it at {position})"))
        self._sections = sections

    def _parse_entry(self, index: int, entry: Any) -> SectionInfo:
        where = self._err(f"section[{index}]")
        if not isinstance(entry, list) or len(entry) != len(ENTRY_FIELDS):
            raise FormatError(f"{where}: entry must be an array of {len(ENTRY_FIELDS)} fields {ENTRY_FIELDS}")
        name, kind, codec, flags, offset, stored_length, decoded_length, checksum, params = entry
        if not isinstance(name, str) or not name or len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise FormatError(f"{where}.name must be a str of 1..{MAX_NAME_BYTES} UTF-8 bytes")
        for field_name, value in zip(ENTRY_FIELDS[1:8], entry[1:8]):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise FormatError(f"{where}.{field_name} must be a non-negative int, got {value!r}")
        if kind > 0xFFFF or codec > 0xFFFF:
            raise FormatError(f"{where}: kind and codec must fit in 16 bits")
        if flags & ~KNOWN_FLAGS:
            raise FormatError(f"{where}.flags has unknown bits {flags & ~KNOWN_FLAGS:#x} (reserved, must be 0)")
        if checksum >= 2**64:
            raise FormatError(f"{where}.checksum must fit in 64 bits")
        if not isinstance(params, dict):
            raise FormatError(f"{where}.params must be a msgpack map")
        return SectionInfo(name, kind, codec, flags, offset, stored_length, decoded_length, checksum, params)

    # -- access -------------------------------------------------------------

    @property
    def sections(self) -> list[SectionInfo]:
        """All entries in table (= file) order, unknown ancillary ones included."""
        return list(self._sections.values())

    def __contains__(self, name: str) -> bool:
        return name in self._sections

    def __iter__(self) -> Iterator[SectionInfo]:
        return iter(self.sections)

    def __len__(self) -> int:
        return len(self._sections)

    def info(self, name: str) -> SectionInfo:
        try:
            return self._sections[name]
        except KeyError:
            raise UsageError(self._err(f"no section named {name!r}")) from None

    def stored(self, name: str, *, verify: bool = True) -> memoryview:
        """The stored (encoded) bytes of a section, checksum-verified; zero-copy."""
        info = self.info(name)
        data = self._view[info.offset:info.offset + info.stored_length]
        if verify and name not in self._verified:
            if xxh3_64(data) != info.checksum:
                raise ChecksumError(self._err(f"section {name!r}: payload checksum mismatch"))
            self._verified.add(name)
        return data

    def view(self, name: str, *, verify: bool = True) -> memoryview:
        """Decoded bytes of a raw section without copying (memory-mapped for files)."""
        info = self.info(name)
        if info.codec != Codec.RAW:
            raise UsageError(self._err(f"section {name!r} is {info.codec_name}-coded; use read()"))
        return self.stored(name, verify=verify)

    def read(self, name: str, *, verify: bool = True) -> bytes:
        """Decoded bytes of a section (raw sections are copied; see :meth:`view`)."""
        info = self.info(name)
        spec = get_codec(info.codec)
        if spec is None:
            raise UnsupportedError(self._err(f"section {name!r}: codec {info.codec} is unknown to this reader"))
        stored = self.stored(name, verify=verify)
        return spec.decode(stored, info.params, info.decoded_length, self._err(f"section {name!r}"))

    def verify(self, *, decode: bool = True) -> None:
        """Check every checksum and the zero padding; with ``decode``, decode every
        known self-contained section too. Raises the first problem found."""
        position = self._header_end
        for info in self._sections.values():
            gap = self._view[position:info.offset]
            if any(gap):
                raise FormatError(self._err(f"section {info.name!r}: alignment padding before offset {info.offset} is not zero"))
            self.stored(info.name)
            if decode and info.known:
                spec = get_codec(info.codec)
                if spec is not None and not spec.needs_context(info.params):
                    self.read(info.name)
            position = info.offset + info.stored_length

    def close(self) -> None:
        self._view.release() if hasattr(self, "_view") else None
        if isinstance(self._buffer, mmap.mmap):
            try:
                self._buffer.close()
            except BufferError:
                pass  # views handed out keep the mapping alive until they are dropped
        if self._owner is not None:
            self._owner.close()
            self._owner = None

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open(path: str | os.PathLike[str], *, limits: Limits | None = None) -> Reader:  # noqa: A001
    """Open and validate an .ncz file (memory-mapped; payloads read on demand)."""
    display = os.fspath(path)
    try:
        handle = io.open(display, "rb")
    except OSError as exc:
        raise NczError(f"{display}: cannot open ({exc.strerror or exc})") from exc
    try:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise TruncatedError(f"{display}: file is empty")
        buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except BaseException:
        handle.close()
        raise
    return Reader(buffer, name=display, limits=limits, owner=handle)


def open_bytes(data: bytes, *, name: str = "<bytes>", limits: Limits | None = None) -> Reader:
    """Validate an .ncz image held in memory (stdin, network, fuzzing)."""
    return Reader(bytes(data), name=name, limits=limits)


def atomic_write(path: str | os.PathLike[str], fill) -> None:
    """Write a file through ``fill(handle)`` into a temporary file next to ``path``, then
    rename it over ``path``: readers see the old file or the whole new one, and a failure
    (any exception, Ctrl-C) leaves no partial file behind. For outputs that are not
    containers (decoded images, unpacked checkpoints); :class:`Writer` does the same itself.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as handle:
            fill(handle)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
