"""The streaming, atomic, deterministic writer of .ncz files (docs/FORMAT.md §4).

A path target is written to a temp file beside it and renamed into place on
close, keeping the replaced file's mode (or the umask's default); temp files a
killed writer left behind are removed by the next write of the same path.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from . import canonical
from .checksum import xxh3_64
from .enums import Codec, Kind, SectionFlag
from .errors import UsageError
from .layout import (
    ALIGNMENT,
    FOOTER,
    FOOTER_MAGIC,
    MAGIC,
    MAX_NAME_BYTES,
    PRELUDE,
    PRELUDE_COVERED,
    VERSION,
    Limits,
    SectionInfo,
    align,
    check_params,
)
from .section_codecs import Buffer, get_codec, require_codec

__all__ = ["Writer", "EncodedPayload", "encode_payload", "section_overhead", "atomic_write"]


# A writer checks the format's rules, not a reader's caps (which a reader may raise).
_WRITER_CAPS = Limits(max_decoded_bytes=1 << 62, max_dimension=1 << 62)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours to signal
        return True
    return True


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files ``.<name>.<pid>.<random>.tmp`` that a killed writer of
    ``path`` left behind (the pid is gone); others' files are never touched."""
    prefix = f".{path.name}."
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
            continue
        found = re.fullmatch(r"(\d+)\.[a-z0-9_]{8}", entry.name[len(prefix):-4])
        if found is None or _alive(int(found.group(1))):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
        except OSError:
            pass  # another cleaner got there first, or not ours to remove


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new temp file next to ``path`` (same file system, so the rename is atomic)."""
    _remove_stale_temps(path)
    try:
        return tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # name the target, not the temp file the user never asked for
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from exc


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (restored at once)
    os.umask(mask)
    return mask


def _publish(tmp: str, path: Path) -> None:
    """Give ``tmp`` the mode ``path`` has (or the umask's default for a new file), then rename it over ``path``."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = 0o666 & ~_umask()
    try:
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from exc



@dataclass(frozen=True)
class EncodedPayload:
    """Stored bytes of a section before it is written: lets a caller compare
    codecs by size (e.g. zstd vs ANS per tensor) and write the smallest."""

    codec: int
    stored: Buffer
    decoded_length: int
    params: Mapping[str, Any]

    @property
    def stored_length(self) -> int:
        return len(self.stored)


def section_overhead(name: str, kind: int, payload: EncodedPayload, params: Mapping[str, Any] | None = None,
                     *, aligned: bool | None = None) -> int:
    """File bytes a section costs besides its payload, for writers choosing between layouts.

    Its table entry (§4.3), exact but for two fields a writer cannot know yet, counted at their
    usual width: the offset as 5 bytes (a file under 4 GiB) and the checksum as 9; plus, for an
    aligned payload, the 32 bytes of padding it costs on average (§4.4). A lossless tensor split
    into byte planes is five sections, so for a small tensor the table, not the payload, decides.
    """
    spec = get_codec(int(payload.codec))
    if aligned is None:
        aligned = spec is not None and spec.aligned
    merged = {**dict(params or {}), **dict(payload.params)}
    entry = [name, int(kind), int(payload.codec), 3, 1 << 31, payload.stored_length, payload.decoded_length,
             1 << 63, merged]
    return len(canonical.pack(entry)) + (ALIGNMENT // 2 if aligned else 0)


def encode_payload(data: bytes | bytearray | memoryview, codec: Codec,
                   options: Mapping[str, Any] | None = None) -> EncodedPayload:
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
            fd, self._tmp = _temp_beside(self._path)
            self._file: BinaryIO = os.fdopen(fd, "wb")
        else:
            self._file = target
        self._entries: list[SectionInfo] = []
        self._names: set[str] = set()
        self._closed = False
        covered = PRELUDE.pack(MAGIC, VERSION[0], VERSION[1], len(header), 0)[:PRELUDE_COVERED] + header
        prelude = PRELUDE.pack(MAGIC, VERSION[0], VERSION[1], len(header), xxh3_64(covered))
        self._write(prelude)
        self._write(header)
        self._position = len(prelude) + len(header)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._file.write(data)
        except OSError as exc:
            if self._path is None:
                raise
            raise OSError(exc.errno, exc.strerror, os.fspath(self._path)) from exc  # the target, not the temp

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

    def add_encoded(self, name: str, payload: EncodedPayload, *, kind: int,
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
        spec = require_codec(int(codec))
        params = dict(params or {})
        canonical.pack(params)  # fail now, not at close, on unstorable params
        check_params(int(kind), params, decoded_length, f"section {name!r}", _WRITER_CAPS)
        if aligned is None:
            aligned = spec.aligned
        flags = (int(SectionFlag.CRITICAL) if critical else 0) | (int(SectionFlag.ALIGNED) if aligned else 0)
        offset = align(self._position, flags)
        if offset > self._position:
            self._write(bytes(offset - self._position))
        self._write(stored)
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
        if self._tmp is None or self._path is None:
            self._finish()
            self._closed = True
            self._file.flush()
            return
        try:
            self._finish()
            self._file.flush()
            if self._durable:  # data on disk before the rename makes it visible
                os.fsync(self._file.fileno())
            self._file.close()
            _publish(self._tmp, self._path)
        except BaseException as exc:
            self.abort()
            if not isinstance(exc, OSError) or exc.filename == os.fspath(self._path):
                raise
            raise OSError(exc.errno, exc.strerror, os.fspath(self._path)) from exc
        self._closed = True
        self._tmp = None

    def _finish(self) -> None:
        table = canonical.pack([info.to_entry() for info in self._entries])
        self._write(table)
        self._write(FOOTER.pack(self._position, len(table), xxh3_64(table), FOOTER_MAGIC))

    def abort(self) -> None:
        """Discard everything; the final path is never created."""
        self._closed = True
        if self._tmp is not None:
            try:
                self._file.close()
            except OSError:
                pass  # e.g. the buffered tail cannot be flushed (disk full): the file goes anyway
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
            self._tmp = None

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:  # an unclosed writer must not leave its temp file
        if getattr(self, "_tmp", None) is not None:
            self.abort()


def atomic_write(path: str | os.PathLike[str], fill) -> None:
    """Write a file through ``fill(handle)`` into a temporary file next to ``path``, then
    rename it over ``path``: readers see the old file or the whole new one, and a failure
    (any exception, Ctrl-C) leaves no partial file behind. For outputs that are not
    containers (decoded images, unpacked checkpoints); :class:`Writer` does the same itself.
    """
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            try:
                fill(handle)
            except OSError as exc:
                if exc.filename is not None:
                    raise
                raise OSError(exc.errno, exc.strerror, os.fspath(path)) from exc  # the target, not the temp
        _publish(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
