"""On-disk identifiers. docs/FORMAT.md lists the same numbers (checked by a test).

Ids are never reused: a retired id stays reserved forever.
"""

from __future__ import annotations

import enum

__all__ = ["Kind", "Codec", "SectionFlag"]


class Kind(enum.IntEnum):
    """What a section's decoded bytes mean (FORMAT.md §5.1)."""

    METADATA = 1  # canonical msgpack map of user metadata
    BLOB = 2  # opaque bytes
    TENSOR = 3  # dense little-endian tensor; params: dtype, shape
    IMAGE = 4  # one image coded by the learned codec (FORMAT.md §5.3)
    BYTE_PLANES = 5  # lossless float tensor split into byte planes (§5.4)
    QUANTIZED = 6  # uniformly quantized tensor: indices + steps (§5.4)
    LOW_RANK = 7  # W ≈ U·V with quantized factors (§5.4)
    DICTIONARY = 8  # shared dictionary + sparse codes (§5.4)
    CODEBOOK = 9  # product-quantized embedding table: codebooks + codes (§5.4)
    PART = 10  # a part of a multi-section representation, named "<head>#<part>" (§5.4)


class Codec(enum.IntEnum):
    """How a section's stored bytes turn into its decoded bytes (FORMAT.md §5.2)."""

    RAW = 0  # stored == decoded; payload 64-byte aligned, mmap-able
    ZSTD = 1  # one zstd frame with its content size declared
    RANGE = 2  # int32 symbols, range coded (constriction queue), FORMAT.md §7
    ANS = 3  # int32 symbols, ANS coded (constriction stack), FORMAT.md §7


class SectionFlag(enum.IntFlag):
    """Bit flags of a section entry (FORMAT.md §4.3)."""

    CRITICAL = 1  # a reader that does not understand the section MUST refuse the file
    ALIGNED = 2  # the payload starts at a multiple of 64 bytes (RAW sections always)
