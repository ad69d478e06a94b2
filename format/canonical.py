"""Canonical msgpack: one byte string per value, so writers are deterministic.

Rules (FORMAT.md §3): maps have str keys sorted by their UTF-8 bytes; integers
take the shortest msgpack encoding; floats are always float64; str and bin are
distinct (``use_bin_type``); no extension types, no nil keys. A reader re-packs
what it parsed and rejects the input unless the bytes are identical, so there is
exactly one valid encoding of every header and table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from .errors import FormatError, LimitError

__all__ = ["pack", "unpack", "MAX_NESTING"]

MAX_NESTING = 16


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


def _check_floats(value: Any) -> None:
    if isinstance(value, float) and math.isnan(value):
        # NaN has many bit patterns; re-packing normalises it, so the equality
        # check below would pass for a non-canonical NaN. Forbid it outright.
        raise FormatError("NaN is not allowed in a header, table or params")
    if isinstance(value, dict):
        for item in value.values():
            _check_floats(item)
    elif isinstance(value, list):
        for item in value:
            _check_floats(item)


def unpack(data: bytes, *, what: str, max_bytes: int, max_items: int) -> Any:
    """Decode canonical msgpack ``data`` describing ``what``.

    Container lengths are capped before msgpack allocates them (``max_items``),
    and the input must be the canonical encoding of its value.
    """
    if len(data) > max_bytes:
        raise LimitError(f"{what}: {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=max_items,
            max_map_len=max_items,
            max_ext_len=0,
        )
    except ValueError as exc:  # ExtraData, FormatError, StackError, limits are ValueErrors
        raise FormatError(f"{what}: not valid msgpack ({exc})") from exc
    except Exception as exc:  # msgpack raises assorted errors on hostile input
        raise FormatError(f"{what}: not valid msgpack ({type(exc).__name__}: {exc})") from exc
    _check_floats(value)
    try:
        again = pack(value)
    except FormatError as exc:
        raise FormatError(f"{what}: {exc}") from exc
    except RecursionError as exc:
        raise FormatError(f"{what}: nested too deeply") from exc
    if again != data:
        raise FormatError(f"{what}: msgpack is not canonical (sorted keys, shortest ints, float64)")
    return value
