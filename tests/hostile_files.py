"""A generator of hostile files that carry *valid* checksums.

:func:`build` lays out arbitrary table entries exactly as FORMAT.md §4.4 places
them and checksums everything, so a file gets past every byte-level check and
reaches the semantic rule a test targets (sizes, types, densities). Each case of
:data:`CASES` is one such file with the error a reader must raise when it opens
and verifies it; :data:`HUGE_HEADS` gives every kind that describes a tensor a
head whose dense size would be terabytes. A new :class:`~ncz.format.Kind` must get
an entry in :data:`KIND_CASES` (a test fails until it does), so new section kinds
get the same treatment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zstandard

import ncz.format as nf
from ncz.format import Codec, Kind, SectionFlag, canonical
from ncz.format.checksum import xxh3_64
from ncz.format.entropy_tables import FrequencyTable
from tests.conftest import forge

ARCHIVE = {"format": "ncz-model-archive", "tensors": 1, "source": "hostile", "recipe": "none"}


@dataclass
class Section:
    name: str
    kind: int = Kind.BLOB
    codec: int = Codec.RAW
    stored: bytes = b""
    decoded_length: int | None = None  # default: len(stored)
    params: dict[str, Any] = field(default_factory=dict)
    flags: int = SectionFlag.CRITICAL


def build(sections: list[Section], header: dict | None = None) -> bytes:
    """A file holding ``sections`` as given (no rule but placement is enforced), checksums valid."""
    header = {} if header is None else header
    position = 24 + len(canonical.pack(header))
    payloads, table = bytearray(), []
    for s in sections:
        offset = position if not s.flags & SectionFlag.ALIGNED else -(-position // 64) * 64
        payloads += bytes(offset - position) + s.stored
        decoded = len(s.stored) if s.decoded_length is None else s.decoded_length
        table.append([s.name, int(s.kind), int(s.codec), int(s.flags), offset, len(s.stored), decoded,
                      xxh3_64(s.stored), s.params])
        position = offset + len(s.stored)
    return forge(header=header, table=table, payloads=bytes(payloads))


def deep_params(depth: int) -> bytes:
    """One section whose params hold {"x": [[[...0]]]} nested ``depth`` arrays deep (bytes made by
    hand: msgpack's own packer, like ours, refuses to build such a value)."""
    table = canonical.pack([["deep", int(Kind.BLOB), int(Codec.RAW), int(SectionFlag.CRITICAL), 25, 0, 0,
                             xxh3_64(b""), {"x": 0}]])
    assert table.endswith(b"\x81\xa1x\x00")
    return forge(header={}, table=table[:-1] + b"\x91" * depth + b"\x00", payloads=b"")


def skewed_table() -> bytes:
    """A stored table whose first symbol costs ~1e-7 bits: an empty ANS coder pops it forever."""
    return FrequencyTable(0, np.array([(1 << 24) - 1, 1])).to_bytes()


def image_params(w: int, h: int, **changes: Any) -> dict[str, Any]:
    """IMAGE params of the tiled layout (§5.3) with every type right; ``changes`` break one."""
    tiles = -(-w // 1024) * -(-h // 1024)
    params = {"width": w, "height": h, "channels": 3, "quality": 3.5, "model": "hostile",
              "weights": bytes(16), "tile": 1024, "streams": [0] * (2 * tiles)}
    params.update(changes)
    return params


def _ans_bomb(codec: int = Codec.ANS, stored: bytes = b"", symbols: int = 1 << 30, kind: int = Kind.BLOB,
              **params: Any) -> bytes:
    return build([Section("bomb", kind, codec, stored, 4 * symbols,
                          {"model": 1, "table": skewed_table(), **params})])


# name -> (file, error class, message pattern); each must fail at open() or verify()
CASES: dict[str, tuple[bytes, type, str]] = {
    "ans-empty-stream-2^32-bytes": (_ans_bomb(symbols=1 << 30), nf.FormatError, "1073741824 symbols in 0 bytes"),
    "ans-4-bytes-many-symbols": (_ans_bomb(stored=b"\x01\x00\x00\x00", symbols=1 << 20), nf.FormatError,
                                 "symbols in 4 bytes"),
    "range-empty-stream": (_ans_bomb(Codec.RANGE, symbols=1000), nf.FormatError, "symbols in 0 bytes"),
    "tensor-head-ans-[2^30]": (_ans_bomb(kind=Kind.TENSOR, dtype="int32", shape=[1 << 30]), nf.FormatError,
                               "symbols in 0 bytes"),
    "entropy-not-words": (build([Section("s", Kind.BLOB, Codec.ANS, b"\x01\x02\x03", 4,
                                         {"model": 1, "table": skewed_table()})]), nf.FormatError, "32-bit words"),
    "params-nested-1000": (deep_params(1000), nf.FormatError, "nested deeper"),
    "image-quality-str": (build([Section("img", Kind.IMAGE, params=image_params(96, 64, quality="3.5"))]),
                          nf.FormatError, "params.quality must be a finite float"),
    "image-width-float": (build([Section("img", Kind.IMAGE, params=image_params(96, 64, width=96.9))]),
                          nf.FormatError, "params.width must be an int"),
    "image-channels-bool": (build([Section("img", Kind.IMAGE, params=image_params(96, 64, channels=True))]),
                            nf.FormatError, "params.channels"),
    "image-streams-sum": (build([Section("img", Kind.IMAGE, params=image_params(96, 64, streams=[1, 2]))]),
                          nf.FormatError, "streams sum"),
}


# msgpack of a map nested 1000 levels, {"a": {"a": ...{}}}, by hand: pack() refuses to build it
CASES["header-nested-1000"] = (forge(header=b"\x81\xa1a" * 1000 + b"\x80", table=[], payloads=b""),
                               nf.FormatError, "nested deeper")

# Every kind: a section whose params describe a terabyte tensor (or the kind's own worst case).
_TB = [1 << 20, 1 << 20]
KIND_CASES: dict[Kind, dict[str, Any] | None] = {
    Kind.METADATA: None,  # no size params: its bytes are the stored bytes (zstd/entropy rules apply)
    Kind.BLOB: None,
    Kind.TENSOR: {"dtype": "float32", "shape": _TB},
    Kind.IMAGE: None,  # image size: CASES above and the per-file pixel cap (Limits.max_image_pixels)
    Kind.BYTE_PLANES: {"dtype": "float32", "shape": [1 << 40, 1 << 24]},  # int64 product wraps to 0
    Kind.QUANTIZED: {"dtype": "float32", "shape": [1 << 32, 1 << 32], "granularity": "tensor", "step_base": 1.0},
    Kind.LOW_RANK: {"dtype": "float32", "shape": [1 << 19, 1 << 19], "rank": 1, "view": [1 << 19, 1 << 19]},
    Kind.DICTIONARY: {"dtype": "float32", "shape": _TB, "dictionary": "w", "atoms": 1, "dim": 1,
                      "blocks": 1 << 20, "sparsity": 1},
    Kind.CODEBOOK: {"dtype": "float32", "shape": _TB, "M": 1, "K": 1, "stages": 1, "codebook": "float32"},
    Kind.PART: {"dtype": "int32", "shape": _TB},
}


def huge_head(kind: Kind) -> bytes:
    """A model archive whose one section of ``kind`` describes a terabyte-sized tensor: a head with an
    empty payload, or for kinds whose bytes are the tensor, a few zstd bytes declaring it all."""
    params = dict(KIND_CASES[kind])
    if kind in (Kind.TENSOR, Kind.PART):
        frame = zstandard.ZstdCompressor().compress(b"")
        return build([Section("w", kind, Codec.ZSTD, frame, 4 * (1 << 40), params)], ARCHIVE)
    return build([Section("w", kind, Codec.RAW, b"", 0, params)], ARCHIVE)


HUGE_HEADS = {kind: huge_head(kind) for kind, params in KIND_CASES.items() if params is not None}
