"""Canonical msgpack: one byte string per value, so writers are deterministic.

Rules (FORMAT.md §3): maps have str keys sorted by their UTF-8 bytes; integers
take the shortest msgpack encoding; floats are always float64; str and bin are
distinct (``use_bin_type``); no extension types, no nil keys. A reader re-packs
what it parsed and rejects the input unless the bytes are identical, so there is
exactly one valid encoding of every header and table.

Untrusted input is parsed under three caps checked as it is read, before the
value is built: items per array/map, items in the whole value, nesting depth.
Depth is checked without recursion (Python's own limit would turn a deeply
nested value into a RecursionError).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from .errors import FormatError, LimitError

__all__ = ["pack", "unpack", "MAX_NESTING"]

MAX_NESTING = 16
# Below this size msgpack's C parser builds the value at once: at most this many
# items, so the caps can be checked afterwards at no risk. Above it, the value is
# built container by container so the caps stop a hostile one early.
_BULK_BYTES = 1 << 20
_ARRAY_HEADERS = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}
_MAP_HEADERS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}


def _canonical(value: Any, depth: int = 0) -> Any:
    if depth > MAX_NESTING:
        raise FormatError(f"msgpack value nested deeper than {MAX_NESTING} levels")
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise FormatError(f"integer {value} does not fit msgpack's 64 bits")
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, Mapping):
        items = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise FormatError(f"map key {key!r} is not a str")
            items.append((key.encode("utf-8"), key, _canonical(item, depth + 1)))
        items.sort(key=lambda kv: kv[0])
        return {key: item for _, key, item in items}
    if isinstance(value, Sequence):
        return [_canonical(item, depth + 1) for item in value]
    # numpy scalars and similar: accept exact ints/floats only
    if hasattr(value, "item"):
        return _canonical(value.item(), depth)
    raise FormatError(f"value of type {type(value).__name__} cannot be stored in msgpack")


def pack(value: Any) -> bytes:
    """Encode ``value`` canonically."""
    return msgpack.packb(_canonical(value), use_bin_type=True, use_single_float=False)


class _Caps:
    """Counts items as a value is read and enforces the caps (FORMAT.md §3, §6)."""

    def __init__(self, what: str, max_items: int, max_total: int, max_top: int):
        self.what, self.max_items, self.max_total, self.max_top = what, max_items, max_total, max_top
        self.total = 0

    def container(self, length: int, depth: int) -> None:
        cap = self.max_top if depth == 0 else self.max_items
        if length > cap:
            raise LimitError(f"{self.what}: a msgpack array or map of {length} items exceeds the limit of {cap}")
        self.total += length
        if self.total > self.max_total:
            raise LimitError(f"{self.what}: more than {self.max_total} msgpack items in all (the limit)")
        if length and depth + 1 > MAX_NESTING:
            raise FormatError(f"{self.what}: msgpack value nested deeper than {MAX_NESTING} levels")

    @staticmethod
    def scalar(value: Any, what: str) -> None:
        if isinstance(value, float) and math.isnan(value):
            # NaN has many bit patterns; re-packing normalises it, so the equality
            # check would pass for a non-canonical NaN. Forbid it outright.
            raise FormatError(f"{what}: NaN is not allowed in a header, table or params")

    def walk(self, value: Any) -> None:
        """Check a value msgpack has built: caps, depth and NaN, with an explicit stack."""
        stack = [(value, 0)]
        while stack:
            item, depth = stack.pop()
            if isinstance(item, (list, dict)):
                self.container(len(item), depth)
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
            else:
                self.scalar(item, self.what)


def _build(data: bytes, caps: _Caps, unpacker: msgpack.Unpacker) -> Any:
    """Read one value container by container; scalars come from msgpack's C parser."""
    root: list[Any] = []
    # frames: [container, items left, is_map, pending key]
    stack: list[list[Any]] = [[root, 1, False, None]]
    while stack:
        frame = stack[-1]
        if frame[1] == 0:
            stack.pop()
            continue
        position = unpacker.tell()
        if position >= len(data):
            raise FormatError(f"{caps.what}: msgpack ends inside a value")
        first = data[position]
        depth = len(stack) - 1
        if first in _ARRAY_HEADERS or first in _MAP_HEADERS:
            is_map = first in _MAP_HEADERS
            length = unpacker.read_map_header() if is_map else unpacker.read_array_header()
            caps.container(length, depth)
            value: Any = {} if is_map else []
        else:
            value = unpacker.unpack()
            caps.scalar(value, caps.what)
            length = 0
        container, _, parent_is_map, key = frame
        if parent_is_map and key is None:
            if not isinstance(value, str):
                raise FormatError(f"{caps.what}: map key {value!r} is not a str")
            frame[3] = value
            continue
        if parent_is_map:
            container[key] = value
            frame[3] = None
        else:
            container.append(value)
        frame[1] -= 1
        if length:
            stack.append([value, length, isinstance(value, dict), None])
    return root[0]


def unpack(data: bytes, *, what: str, max_bytes: int, max_items: int, max_total_items: int | None = None,
           max_top_items: int | None = None) -> Any:
    """Decode canonical msgpack ``data`` describing ``what``.

    ``max_items`` caps each array/map (``max_top_items`` the outermost one, default
    the same), ``max_total_items`` all of them together (default ``len(data)``).
    Caps and depth are checked before msgpack allocates the containers, and the
    input must be the canonical encoding of its value.
    """
    if len(data) > max_bytes:
        raise LimitError(f"{what}: {len(data)} bytes exceeds the limit of {max_bytes}")
    caps = _Caps(what, max_items, len(data) if max_total_items is None else max_total_items,
                 max_items if max_top_items is None else max_top_items)
    options = dict(raw=False, use_list=True, strict_map_key=True, max_str_len=max_bytes, max_bin_len=max_bytes,
                   max_array_len=max(max_items, caps.max_top), max_map_len=max(max_items, caps.max_top),
                   max_ext_len=0)
    try:
        if len(data) <= _BULK_BYTES:
            value = msgpack.unpackb(data, **options)
            caps.walk(value)
        else:
            unpacker = msgpack.Unpacker(max_buffer_size=len(data), **options)
            unpacker.feed(data)
            value = _build(data, caps, unpacker)
            if unpacker.tell() != len(data):
                raise FormatError(f"{what}: {len(data) - unpacker.tell()} bytes after the msgpack value")
    except (FormatError, LimitError):
        raise
    except ValueError as exc:  # ExtraData, FormatError, StackError, limits are ValueErrors
        if "exceeds max_" in str(exc):  # msgpack's own check of a declared length against our caps
            raise LimitError(f"{what}: {exc}") from exc
        raise FormatError(f"{what}: not valid msgpack ({exc})") from exc
    except Exception as exc:  # msgpack raises assorted errors on hostile input
        raise FormatError(f"{what}: not valid msgpack ({type(exc).__name__}: {exc})") from exc
    try:
        again = pack(value)
    except FormatError as exc:
        raise FormatError(f"{what}: {exc}") from exc
    if again != data:
        raise FormatError(f"{what}: msgpack is not canonical (sorted keys, shortest ints, float64)")
    return value
