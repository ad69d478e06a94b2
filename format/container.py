"""The .ncz container: the validating lazy reader (the writer is :mod:`.writer`, the layout rules :mod:`.layout`).

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

import builtins
import mmap
import os
from collections.abc import Iterator
from typing import Any

from . import canonical
from .checksum import xxh3_64
from .enums import Codec
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
from .layout import (  # noqa: F401 - re-exported: the container's names live here for callers
    ALIGNMENT,
    ENTRY_FIELDS,
    FOOTER,
    FOOTER_MAGIC,
    KNOWN_FLAGS,
    MAGIC,
    MAX_NAME_BYTES,
    PRELUDE,
    PRELUDE_COVERED,
    TENSOR_DTYPES,
    VERSION,
    Limits,
    SectionInfo,
    align,
    check_params,
    known_kind,
)
from .section_codecs import get_codec, require_codec
from .writer import EncodedPayload, Writer, atomic_write, encode_payload, section_overhead  # re-exported (__all__)

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
    "section_overhead",
    "atomic_write",
    "open",
    "open_bytes",
]


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
        self.decoded_bytes = 0  # decoded so far, against Limits.max_file_decoded_bytes
        self.decoded_pixels = 0  # decoded so far, against Limits.max_image_pixels
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
            raise TruncatedError(self._err(f"file is {size} bytes; an .ncz file has at least "
                                           f"{PRELUDE.size + FOOTER.size}"))
        magic, major, minor, header_length, header_sum = PRELUDE.unpack_from(self._view, 0)
        if magic != MAGIC:
            raise FormatError(self._err(f"prelude.magic is {magic!r}, expected {MAGIC!r} (not an .ncz file)"))
        if major != VERSION[0]:
            raise VersionError(self._err(f"prelude.major is {major}; this reader implements major {VERSION[0]}"))
        self.version = (major, minor)
        if header_length > self.limits.max_header_bytes:
            raise LimitError(self._err(f"prelude.header_length {header_length} exceeds the limit "
                                       f"{self.limits.max_header_bytes}"))
        header_end = PRELUDE.size + header_length
        if header_end + FOOTER.size > size:
            raise TruncatedError(self._err(f"prelude.header_length {header_length} runs past the end of the "
                                           f"{size}-byte file"))
        self._header_end = header_end
        header = self._view[PRELUDE.size:header_end]
        if xxh3_64(bytes(self._view[:PRELUDE_COVERED]) + bytes(header)) != header_sum:
            raise ChecksumError(self._err("prelude/header checksum mismatch (prelude.header_xxh3)"))
        meta = canonical.unpack(bytes(header), what=self._err("header"), max_bytes=self.limits.max_header_bytes,
                                max_items=self.limits.max_params_items, max_total_items=self.limits.max_total_items)
        if not isinstance(meta, dict):
            raise FormatError(self._err("header must be a msgpack map"))
        self.metadata: dict[str, Any] = meta

        table_offset, table_length, table_sum, footer_magic = FOOTER.unpack_from(self._view, size - FOOTER.size)
        if footer_magic != FOOTER_MAGIC:
            raise TruncatedError(self._err(f"footer.magic is {footer_magic!r}, expected {FOOTER_MAGIC!r} "
                                           "(truncated or not closed)"))
        if table_length > self.limits.max_table_bytes:
            raise LimitError(self._err(f"footer.table_length {table_length} exceeds the limit "
                                       f"{self.limits.max_table_bytes}"))
        if table_offset + table_length != size - FOOTER.size or table_offset < header_end:
            raise FormatError(self._err(
                f"footer.table_offset {table_offset} + table_length {table_length} must end at {size - FOOTER.size}"
                f" and start at or after {header_end}"))
        table_bytes = self._view[table_offset:table_offset + table_length]
        if xxh3_64(table_bytes) != table_sum:
            raise ChecksumError(self._err("section table checksum mismatch (footer.table_xxh3)"))
        table = canonical.unpack(bytes(table_bytes), what=self._err("section table"),
                                 max_bytes=self.limits.max_table_bytes, max_items=self.limits.max_params_items,
                                 max_total_items=self.limits.max_total_items, max_top_items=self.limits.max_sections)
        if not isinstance(table, list):
            raise FormatError(self._err("section table must be a msgpack array"))
        if len(table) > self.limits.max_sections:
            raise LimitError(self._err(f"section table has {len(table)} entries; the limit is "
                                       f"{self.limits.max_sections}"))

        sections: dict[str, SectionInfo] = {}
        position = header_end
        for index, entry in enumerate(table):
            info = self._parse_entry(index, entry)
            where = self._err(f"section {info.name!r}")
            if info.name in sections:
                raise FormatError(self._err(f"section[{index}].name {info.name!r} is not unique"))
            expected = align(position, info.flags)
            if info.offset != expected:
                raise FormatError(f"{where}: offset is {info.offset}, expected {expected} "
                                  "(sections are packed in table order)")
            end = info.offset + info.stored_length
            if end > table_offset:
                raise FormatError(f"{where}: stored_length {info.stored_length} runs into the section table")
            # raw bytes are in the file already; every other codec expands, so it is capped
            if info.codec != Codec.RAW and info.decoded_length > self.limits.max_decoded_bytes:
                raise LimitError(f"{where}: decoded_length {info.decoded_length} exceeds the limit "
                                 f"{self.limits.max_decoded_bytes} (Limits.max_decoded_bytes)")
            if not info.known:
                if info.critical:
                    what = f"kind {info.kind}" if not known_kind(info.kind) else f"codec {info.codec}"
                    raise UnsupportedError(f"{where}: critical section uses unknown {what}; "
                                           "upgrade ncz to read this file")
            else:
                require_codec(info.codec).check_lengths(info.stored_length, info.decoded_length, where)
                check_params(info.kind, info.params, info.decoded_length, where, self.limits)
            sections[info.name] = info
            position = end
        if position != table_offset:
            raise FormatError(self._err(f"{table_offset - position} unaccounted bytes before the section table "
                                        f"(expected it at {position})"))
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

    def charge(self, nbytes: int, what: str) -> None:
        """Count ``nbytes`` about to be decoded from this file against
        ``Limits.max_file_decoded_bytes``; raise :class:`LimitError` (before the
        work) when the total would pass it. :meth:`read` charges by itself; a
        component that decodes outside it (e.g. an image's pixels) charges too."""
        limit = self.limits.max_file_decoded_bytes
        if self.decoded_bytes + nbytes > limit:
            raise LimitError(self._err(f"{what}: decoding {nbytes} more bytes would pass {limit} decoded bytes "
                                       "for this file (Limits.max_file_decoded_bytes)"))
        self.decoded_bytes += nbytes

    def charge_pixels(self, pixels: int, what: str) -> None:
        """Count ``pixels`` about to be decoded against ``Limits.max_image_pixels`` (all images of the file)."""
        limit = self.limits.max_image_pixels
        if self.decoded_pixels + pixels > limit:
            raise LimitError(self._err(f"{what}: decoding {pixels} more pixels would pass {limit} pixels "
                                       "for this file (Limits.max_image_pixels)"))
        self.decoded_pixels += pixels

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
        if info.codec != Codec.RAW:  # raw bytes are in the file: nothing expands
            self.charge(info.decoded_length, f"section {name!r}")
        return spec.decode(stored, info.params, info.decoded_length, self._err(f"section {name!r}"))

    def verify(self, *, decode: bool = True) -> None:
        """Check every checksum and the zero padding; with ``decode``, decode every
        known self-contained section too. Raises the first problem found."""
        position = self._header_end
        for info in self._sections.values():
            gap = self._view[position:info.offset]
            if any(gap):
                raise FormatError(self._err(f"section {info.name!r}: alignment padding before offset {info.offset} "
                                            "is not zero"))
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

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open(path: str | os.PathLike[str], *, limits: Limits | None = None) -> Reader:  # nf.open: shadows the builtin
    """Open and validate an .ncz file (memory-mapped; payloads read on demand)."""
    display = os.fspath(path)
    try:
        handle = builtins.open(display, "rb")
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
