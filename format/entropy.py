"""Entropy coding of int32 symbols: range coding and ANS, with exact integer models.

Data flow (FORMAT.md §7)::

    symbols ─► model ─► per-symbol (integer offset, table) ─► grouped by table
           ─► table indices (+ escape chunks) ─► constriction RANGE or ANS ─► u32 words

Two kinds of model, both fully configured at construction:

- :class:`CategoricalModel`: one integer table for every symbol (a factorized
  prior, quantized weight indices). ``CategoricalModel.fit`` is the empirical
  mode: it fits a table to the data; the table is stored in the section params.
- :class:`ConditionalModel`: a table per symbol, chosen from a fixed parametric
  grid (Gaussian, Laplace, logistic) by quantized mean and scale — the image
  latents' mean-scale model. The means/scales come from elsewhere (the hyper
  decoder), so such streams are *conditional*: a reader needs them to decode.

Symbols outside a table's range are coded as the table's escape symbol followed
by three uniform 16-bit chunks holding the zigzag of the value (48 bits), inside
the same coder stream — no error, no clipping.

Symbols are grouped by table (a stable sort of the table ids), so one batch call
into constriction codes each group: no Python work per symbol. Decoders derive
the same grouping from the same model, and accept only canonical streams (exactly
the encoding of what they decode to): an ANS stack must end empty, which for ANS
is equivalent (see :func:`decode`); a range decoder must end exhausted *and*
re-encoding must give the same words. Bits-back coding uses :class:`BitsBackStack` (ANS only).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from . import constriction_adapter as adapter
from .constriction_adapter import Coder
from .entropy_tables import (
    GRID_V1,
    PRECISION,
    Family,
    FrequencyTable,
    ParametricGrid,
    fit_table,
)
from .enums import Codec
from .errors import DensityError, FormatError, StreamError, UsageError
from .section_codecs import SectionCodec, register_codec
from .writer import EncodedPayload

__all__ = [
    "Coder",
    "ModelId",
    "CategoricalModel",
    "ConditionalModel",
    "IndexedModel",
    "encode",
    "decode",
    "information",
    "BitsBackStack",
    "write_conditional",
    "read_conditional",
    "read_symbols",
    "ESCAPE_BITS",
    "MAX_SYMBOLS_PER_BYTE",
    "check_density",
    "symbols_payload",
]

ESCAPE_CHUNKS = 3
ESCAPE_BITS = 16 * ESCAPE_CHUNKS
_UNIFORM16 = FrequencyTable(0, np.full(1 << 16, 1 << (PRECISION - 16)), escape=False)
_MAX_ESCAPE = 1 << (ESCAPE_BITS - 1)  # |value| below this fits the zigzag chunks
# A stream can decode any number of symbols from a few bytes (an empty ANS coder
# pops index 0 forever), so a section's symbol count is bounded by its size:
# every symbol accounts for at least 1/128 bit of the stream (FORMAT.md §7.1).
MAX_SYMBOLS_PER_BYTE = 1024


class ModelId(enum.IntEnum):
    """``params.model`` of entropy-coded sections (FORMAT.md §7.2). Never reused."""

    CATEGORICAL = 1
    GAUSSIAN = 2
    LAPLACE = 3
    LOGISTIC = 4


_FAMILY_OF = {ModelId.GAUSSIAN: Family.GAUSSIAN, ModelId.LAPLACE: Family.LAPLACE, ModelId.LOGISTIC: Family.LOGISTIC}
_MODEL_OF = {family: model for model, family in _FAMILY_OF.items()}


# --- models ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """How a model lays out ``n`` symbols: coding order, offsets, table segments."""

    order: np.ndarray | None  # positions in coding order (None: identity)
    offsets: np.ndarray | int  # per coded position (or one for all)
    segments: list[tuple[int, int, FrequencyTable]]


@dataclass(frozen=True, eq=False)
class CategoricalModel:
    """One integer table shared by all symbols."""

    table: FrequencyTable

    @classmethod
    def fit(cls, symbols: np.ndarray, *, max_symbols: int = 4096) -> CategoricalModel:
        """The empirical mode: fit a table (with escape) to ``symbols``."""
        return cls(fit_table(np.asarray(symbols), max_symbols=max_symbols))

    def layout(self, count: int) -> _Layout:
        return _Layout(None, 0, [(0, count, self.table)])


class _PerSymbolTables:
    """Shared by models that pick a table per symbol: the size and the cached layout."""

    table_ids: np.ndarray

    @property
    def _layout(self) -> _Layout:  # each model caches its own
        raise NotImplementedError

    @property
    def size(self) -> int:
        return int(self.table_ids.size)

    def layout(self, count: int) -> _Layout:
        if count != self.table_ids.size:
            raise UsageError(f"model describes {self.table_ids.size} symbols, got {count}")
        return self._layout


@dataclass(frozen=True, eq=False)
class ConditionalModel(_PerSymbolTables):
    """Per-symbol tables from a parametric grid, chosen by quantized mean and scale.

    Build it with :meth:`from_mean_scale`; encoder and decoder must pass the same
    float means and scales (the image codec guarantees that, see docs/ARCHITECTURE.md).
    """

    grid: ParametricGrid
    offsets: np.ndarray = field(repr=False)
    table_ids: np.ndarray = field(repr=False)

    @classmethod
    def from_mean_scale(cls, family: Family | ModelId, mean: np.ndarray, scale: np.ndarray,
                        grid: ParametricGrid | None = None) -> ConditionalModel:
        family = _FAMILY_OF[family] if isinstance(family, ModelId) else Family(family)
        grid = grid or GRID_V1[family]
        if grid.family != family:
            raise UsageError(f"grid is for {grid.family.name}, not {family.name}")
        offsets, ids = grid.quantize(mean, scale)
        return cls(grid, offsets, ids)

    @functools.cached_property
    def _layout(self) -> _Layout:
        return _layout_by_table(self.table_ids, self.offsets, self.grid.num_tables, self.grid.table)


def _layout_by_table(table_ids: np.ndarray, offsets: np.ndarray, num_tables: int, table_of) -> _Layout:
    """Coding order = positions stably sorted by table id (FORMAT.md §7.1)."""
    count = table_ids.size
    # 16-bit keys take numpy's radix sort: O(n), about 10x faster than int32 here
    keys = table_ids.astype(np.int16) if num_tables <= 2**15 else table_ids
    order = np.argsort(keys, kind="stable")
    ids = table_ids[order]
    cuts = np.flatnonzero(np.diff(ids)) + 1
    starts = np.concatenate(([0], cuts)) if count else np.zeros(0, np.int64)
    stops = np.concatenate((cuts, [count])) if count else np.zeros(0, np.int64)
    segments = [(int(a), int(b), table_of(int(ids[a]))) for a, b in zip(starts, stops)]
    return _Layout(order, offsets[order], segments)


@dataclass(frozen=True, eq=False)
class IndexedModel(_PerSymbolTables):
    """Each symbol picks one of a fixed list of tables by index (e.g. the
    per-channel tables of a factorized prior); offsets default to 0."""

    tables: tuple[FrequencyTable, ...]
    table_ids: np.ndarray = field(repr=False)
    offsets: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        ids = np.ascontiguousarray(self.table_ids, dtype=np.int32).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.tables)):
            raise UsageError(f"table ids must lie in 0..{len(self.tables) - 1}")
        object.__setattr__(self, "tables", tuple(self.tables))
        object.__setattr__(self, "table_ids", ids)
        offsets = np.zeros(ids.size, np.int64) if self.offsets is None else np.asarray(self.offsets, np.int64).ravel()
        if offsets.shape != ids.shape:
            raise UsageError("offsets and table_ids differ in length")
        object.__setattr__(self, "offsets", offsets)

    @functools.cached_property
    def _layout(self) -> _Layout:
        offsets = cast(np.ndarray, self.offsets)  # never None after __post_init__
        return _layout_by_table(self.table_ids, offsets, len(self.tables), self.tables.__getitem__)


Model = CategoricalModel | ConditionalModel | IndexedModel


def _as_symbols(symbols: np.ndarray) -> np.ndarray:
    array = np.asarray(symbols)
    if array.dtype.kind not in "iu":
        raise UsageError(f"symbols must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64).ravel()
    if array.size and (array.min() < -(2**31) or array.max() >= 2**31):
        raise UsageError("symbols must fit in int32")
    return array


def _escape_chunks(values: np.ndarray) -> np.ndarray:
    if values.size and np.abs(values).max() >= _MAX_ESCAPE:
        raise UsageError(f"an escaped value exceeds ±2^{ESCAPE_BITS - 1}")
    zig = ((values << 1) ^ (values >> 63)).astype(np.uint64)
    chunks = np.stack([(zig >> np.uint64(16 * k)) & np.uint64(0xFFFF) for k in range(ESCAPE_CHUNKS)], axis=1)
    return chunks.astype(np.int32).ravel()


def _from_chunks(chunks: np.ndarray) -> np.ndarray:
    parts = chunks.astype(np.uint64).reshape(-1, ESCAPE_CHUNKS)
    zig = sum(parts[:, k] << np.uint64(16 * k) for k in range(ESCAPE_CHUNKS))
    zig = np.asarray(zig, dtype=np.uint64)
    return (zig >> np.uint64(1)).astype(np.int64) ^ -(zig & np.uint64(1)).astype(np.int64)


_GROUP_CHUNK = 1 << 20  # symbols converted to table indices at a time (bounded int64 temporaries)


def _chunk_indices(chunk: np.ndarray, table: FrequencyTable) -> tuple[np.ndarray, np.ndarray | None]:
    """(int32 table indices, int64 values of the escaped symbols or None) of a chunk of integer symbols."""
    if chunk.dtype.itemsize > 4 or chunk.dtype == np.uint32:
        if chunk.size and (chunk.min() < -(2**31) or chunk.max() >= 2**31):
            raise UsageError("symbols must fit in int32")
    rel = np.subtract(chunk, table.lo, dtype=np.int64)
    escaped = rel.view(np.uint64) >= np.uint64(table.num_regular)  # below lo wraps to a huge unsigned value
    values = None
    if escaped.any():
        if not table.escape:
            raise UsageError(f"symbols outside [{table.lo}, {table.hi}] and the table has no escape")
        values = chunk[escaped].astype(np.int64)
        rel[escaped] = table.num_regular
    return rel.astype(np.int32), values


def _flat_integers(symbols: np.ndarray) -> np.ndarray:
    array = np.asarray(symbols).reshape(-1)
    if array.dtype.kind not in "iu":
        raise UsageError(f"symbols must be integers, got dtype {array.dtype}")
    return array


def _categorical_groups(symbols: np.ndarray, table: FrequencyTable) -> list[tuple[np.ndarray, FrequencyTable]]:
    """:func:`_groups` of a one-table model, chunk by chunk: no int64 copy of the whole input."""
    array = _flat_integers(symbols)
    indices = np.empty(array.size, np.int32)
    escaped_values = []
    for start in range(0, array.size, _GROUP_CHUNK):
        indices[start:start + _GROUP_CHUNK], values = _chunk_indices(array[start:start + _GROUP_CHUNK], table)
        if values is not None:
            escaped_values.append(values)
    groups: list[tuple[np.ndarray, FrequencyTable]] = [(indices, table)]
    if escaped_values:
        groups.append((_escape_chunks(np.concatenate(escaped_values)), _UNIFORM16))
    return groups


def _encode_categorical(symbols: np.ndarray, table: FrequencyTable, coder: Coder) -> np.ndarray:
    """The stream of :func:`encode` for a one-table model, fed to the coder in chunks: besides the
    symbols and the stream, memory holds one chunk (a first pass finds the escapes, coded after
    all table indices: an ANS stack takes them first)."""
    array = _flat_integers(symbols)
    starts = range(0, array.size, _GROUP_CHUNK)
    escaped = [values for start in starts
               if (values := _chunk_indices(array[start:start + _GROUP_CHUNK], table)[1]) is not None]
    tail = [(_escape_chunks(np.concatenate(escaped)), _UNIFORM16)] if escaped else []
    return adapter.encode_chunks(coder, table, len(starts),
                                 lambda i: _chunk_indices(array[starts[i]:starts[i] + _GROUP_CHUNK], table)[0], tail)


def _groups(symbols: np.ndarray, model: Model) -> list[tuple[np.ndarray, FrequencyTable]]:
    if isinstance(model, CategoricalModel):
        return _categorical_groups(symbols, model.table)
    symbols = _as_symbols(symbols)
    lay = model.layout(symbols.size)
    coded = symbols if lay.order is None else symbols[lay.order]
    rel = coded - lay.offsets
    groups: list[tuple[np.ndarray, FrequencyTable]] = []
    for a, b, table in lay.segments:
        indices, escaped = table.to_indices(rel[a:b])
        groups.append((indices, table))
        if escaped.any():
            groups.append((_escape_chunks(rel[a:b][escaped]), _UNIFORM16))
    return groups


def encode(symbols: np.ndarray, model: Model, coder: Coder = Coder.ANS) -> bytes:
    """Entropy-code int32 ``symbols``; returns the stream (little-endian u32 words)."""
    if isinstance(model, CategoricalModel):
        return adapter.to_bytes(_encode_categorical(symbols, model.table, coder))
    return adapter.to_bytes(adapter.encode_groups(coder, _groups(symbols, model)))


def _pop_escapes(pop, indices: np.ndarray, table: FrequencyTable, where: str,
                 record: list[tuple[np.ndarray, FrequencyTable]] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(mask, int64 values) of a group's escaped symbols, their chunks popped; None when none."""
    escaped = indices == table.num_regular
    n_escaped = int(np.count_nonzero(escaped))
    if not n_escaped:
        return None
    chunks = pop(ESCAPE_CHUNKS * n_escaped, _UNIFORM16)
    if record is not None:
        record.append((chunks, _UNIFORM16))
    extra = _from_chunks(chunks)
    if ((extra >= table.lo) & (extra <= table.hi)).any():
        raise StreamError(f"{where}: an escaped value lies inside its table's range (not canonical)")
    return escaped, extra


def _decode_segments(pop, lay: _Layout, count: int, where: str,
                     record: list[tuple[np.ndarray, FrequencyTable]] | None = None) -> np.ndarray:
    """Pop every group of ``lay``; ``record`` collects (indices, table) as decoded,
    which is exactly what the encoder coded (used for the canonical check)."""
    rel = np.empty(count, dtype=np.int64)
    for a, b, table in lay.segments:
        indices = pop(b - a, table)
        if record is not None:
            record.append((indices, table))
        values = indices.astype(np.int64) + table.offset
        if table.escape:
            escapes = _pop_escapes(pop, indices, table, where, record)
            if escapes is not None:
                values[escapes[0]] = escapes[1]
        rel[a:b] = values
    coded = rel + lay.offsets
    if count and (coded.min() < -(2**31) or coded.max() >= 2**31):
        raise StreamError(f"{where}: a decoded symbol does not fit in int32")
    if lay.order is None:
        return coded.astype(np.int32)
    out = np.empty(count, dtype=np.int32)
    out[lay.order] = coded
    return out


def _decode_one_table(pop, table: FrequencyTable, count: int, where: str) -> np.ndarray:
    """A categorical model's symbols: one table, offset 0, coding order = position order.

    The fast path of :func:`_decode_segments`: int32 throughout (the table's range
    lies within int32, FORMAT.md §7.5), no copies when nothing is escaped."""
    indices = pop(count, table)  # a fresh int32 array, every index inside the table
    escapes = None
    if table.escape and count and int(indices.max()) == table.num_regular:  # the escape is the last index
        escapes = _pop_escapes(pop, indices, table, where)
    if escapes is not None:
        if escapes[1].min() < -(2**31) or escapes[1].max() >= 2**31:
            raise StreamError(f"{where}: a decoded symbol does not fit in int32")
        indices[escapes[0]] = 0
    if table.lo:
        np.add(indices, np.int32(table.lo), out=indices)  # lo + index <= hi < 2^31
    if escapes is not None:
        indices[escapes[0]] = escapes[1]
    return indices


def decode(data: bytes | memoryview, model: Model, count: int | None = None, coder: Coder = Coder.ANS,
           *, where: str = "stream") -> np.ndarray:
    """Mirror of :func:`encode`: ``count`` int32 symbols (implied by a conditional model).

    Only canonical streams decode: a stream must be exactly the encoding of the
    symbols it decodes to (so truncated or padded streams are rejected even where
    the coder would decode zeros past the end)."""
    if count is None:
        if isinstance(model, CategoricalModel):
            raise UsageError("count is required with a categorical model")
        count = model.size
    if count < 0:
        raise UsageError("count must be >= 0")
    decoder = adapter.GroupDecoder(coder, adapter.from_bytes(data, where), where)
    if coder is Coder.ANS:
        # ANS: ending empty is the canonical check. Each decode step is the exact
        # inverse of an encode step, refills included (the decoder pulls a word
        # exactly when its state drops below 2^32, which is exactly when the
        # encoder, going back, pushes it), and an empty coder (state 0) is where
        # encoding starts; so a stream that decodes to s and leaves the coder
        # empty is the encoding of s, word for word (tests check this against
        # re-encoding on truncated, padded and corrupted streams).
        if isinstance(model, CategoricalModel):
            out = _decode_one_table(decoder.decode, model.table, count, where)
        else:
            out = _decode_segments(decoder.decode, model.layout(count), count, where)
        decoder.finish()
        return out
    coded: list[tuple[np.ndarray, FrequencyTable]] = []
    out = _decode_segments(decoder.decode, model.layout(count), count, where, coded)
    decoder.finish()
    # A range decoder reads past the end of its data as zeros, and exhaustion
    # does not tell every truncated or padded stream from a whole one.
    # Re-encoding does: a stream is valid only if it is exactly the encoding of
    # what it decodes to (encoding is several times faster than decoding).
    again = adapter.to_bytes(adapter.encode_groups(coder, coded))
    if again != bytes(data):
        raise StreamError(f"{where}: {coder.value} stream is not the encoding of its symbols "
                          "(truncated, padded or corrupt)")
    return out


def information(symbols: np.ndarray, model: Model) -> float:
    """Exact information content in bits of ``symbols`` under ``model``'s integer
    tables (48 extra bits per escape): the size an ideal coder would reach."""
    bits = 0.0
    for indices, table in _groups(symbols, model):
        bits += float(table.bits[indices].sum())
    return bits


# --- bits-back -------------------------------------------------------------------


class BitsBackStack:
    """An ANS stack on which symbols can be pushed (encoded) and popped (decoded).

    Bits-back coding (Townsend et al. 2019; Yang, Bamler & Mandt 2020 for the
    hyperprior) *pops* a latent sample from a posterior using bits already on the
    stack, then pushes data conditioned on it; the decoder, going backwards, pushes
    the sample again with the same posterior and so restores the borrowed bits.

    Initial bits: popping needs bits on the stack. They are either the compressed
    bits of earlier content on the same stack (then they cost nothing extra) or
    :meth:`seeded` pseudo-random words. Either way they are part of the final
    stream and so counted in the file size; the decoder gets them back at the end
    and :meth:`check_restored` confirms they are exactly the seed.
    ``pop`` raises :class:`StreamError` when the stack holds fewer bits than the
    popped symbols' information content (constriction would silently decode from
    zeros); the caller then starts again with more initial bits.
    """

    def __init__(self, words: np.ndarray | None = None):
        self._stack = adapter.AnsStack(words)

    @staticmethod
    def seed_words(count: int, seed: int = 0) -> np.ndarray:
        """Deterministic pseudo-random initial words (never zero, so they are a valid stack)."""
        return np.random.Generator(np.random.PCG64(seed)).integers(1, 2**32, size=count, dtype=np.uint32)

    @classmethod
    def seeded(cls, count: int, seed: int = 0) -> BitsBackStack:
        return cls(cls.seed_words(count, seed))

    @classmethod
    def from_bytes(cls, data: bytes | memoryview, where: str = "bits-back stream") -> BitsBackStack:
        return cls(adapter.from_bytes(data, where))

    def to_bytes(self) -> bytes:
        return adapter.to_bytes(self._stack.words())

    @property
    def num_bits(self) -> int:
        return self._stack.num_valid_bits

    def words(self) -> np.ndarray:
        return self._stack.words()

    def push(self, symbols: np.ndarray, model: Model) -> None:
        """Encode ``symbols``; a later :meth:`pop` with the same model returns them."""
        for indices, table in reversed(_groups(symbols, model)):
            self._stack.push(indices, table)

    def pop(self, model: Model, count: int | None = None) -> np.ndarray:
        """Decode symbols from the top of the stack (borrowing bits if they were not pushed)."""
        if count is None:
            if isinstance(model, CategoricalModel):
                raise UsageError("count is required with a categorical model")
            count = model.size
        available = self.num_bits
        out = _decode_segments(self._stack.pop, model.layout(count), count, "bits-back stack")
        needed = information(out, model)
        if needed > available:
            raise StreamError(f"bits-back: popped {needed:.0f} bits from a stack holding {available}; "
                              "provide more initial bits")
        return out

    def check_restored(self, seed_words: np.ndarray) -> None:
        """Raise unless the stack holds exactly ``seed_words`` (the decoder's last step)."""
        words = self.words()
        if words.shape != seed_words.shape or not np.array_equal(words, seed_words):
            raise StreamError("bits-back: the initial bits were not restored (corrupt stream or wrong model)")


# --- section codecs RANGE (2) and ANS (3) ------------------------------------------


def check_density(count: int, stored_length: int, where: str, error: type = FormatError) -> None:
    """Raise ``error`` unless ``count`` symbols may be stored in ``stored_length`` bytes (FORMAT.md §7.1)."""
    if count > MAX_SYMBOLS_PER_BYTE * stored_length:
        raise error(f"{where}: {count} symbols in {stored_length} bytes; an entropy-coded section holds at "
                    f"most {MAX_SYMBOLS_PER_BYTE} symbols per byte")


def _stream_lengths(stored_length: int, decoded_length: int, where: str) -> None:
    if stored_length % 4:
        raise FormatError(f"{where}: stored_length {stored_length} is not whole 32-bit words")
    if decoded_length % 4:
        raise FormatError(f"{where}: decoded_length {decoded_length} is not a multiple of 4 (int32 symbols)")
    check_density(decoded_length // 4, stored_length, where)


def _coder_of(codec: Codec) -> Coder:
    return Coder.RANGE if codec == Codec.RANGE else Coder.ANS


def _categorical_stream(symbols: np.ndarray, model: CategoricalModel | None, codec: Codec,
                        max_symbols: int = 4096) -> tuple[bytes, dict[str, Any]]:
    """(stored bytes, params) of a self-contained RANGE/ANS section holding ``symbols``."""
    if model is None:
        model = CategoricalModel.fit(symbols, max_symbols=max_symbols)
    if not isinstance(model, CategoricalModel):
        raise UsageError("a conditional model needs write_conditional(), not Writer.add()")
    stored = encode(symbols, model, _coder_of(codec))
    check_density(symbols.size, len(stored), f"{codec.name} section", DensityError)
    return stored, {"model": int(ModelId.CATEGORICAL), "table": model.table.to_bytes()}


def symbols_payload(symbols: np.ndarray, model: CategoricalModel | None = None,
                    codec: Codec = Codec.ANS) -> EncodedPayload:
    """What ``encode_payload(int32 bytes of symbols, codec, {"model": model})`` gives, from integer
    symbols of any dtype (e.g. int16 quantization indices) without making their int32 bytes."""
    array = _flat_integers(symbols)
    stored, params = _categorical_stream(array, model, codec)
    return EncodedPayload(int(codec), stored, 4 * array.size, params)


def _section_encode(codec: Codec):
    def encode_section(data: Any, options: Mapping[str, Any]) -> tuple[bytes, dict[str, Any]]:
        unknown = set(options) - {"model", "max_symbols"}
        if unknown:
            raise UsageError(f"entropy codec: unknown options {sorted(unknown)}")
        view = memoryview(data).cast("B")
        if len(view) % 4:
            raise UsageError("entropy-coded sections hold int32 symbols: length must be a multiple of 4")
        return _categorical_stream(np.frombuffer(view, dtype="<i4"), options.get("model"), codec,
                                   int(options.get("max_symbols", 4096)))

    return encode_section


def _section_model(params: Mapping[str, Any], where: str) -> ModelId:
    model = params.get("model")
    if not isinstance(model, int) or model not in ModelId._value2member_map_:
        raise FormatError(f"{where}: params.model must be one of {[int(m) for m in ModelId]}, got {model!r}")
    return ModelId(model)


def _decode_categorical_section(stored: Any, params: Mapping[str, Any], decoded_length: int, codec: Codec,
                                where: str) -> np.ndarray:
    model_id = _section_model(params, where)
    if model_id != ModelId.CATEGORICAL:
        raise UsageError(f"{where}: a conditional ({model_id.name.lower()}) stream; decode it with "
                         "ncz.format.entropy.read_conditional() and its means and scales")
    _stream_lengths(len(stored), decoded_length, where)
    table = params.get("table")
    if not isinstance(table, bytes):
        raise FormatError(f"{where}: params.table must be bin")
    model = CategoricalModel(FrequencyTable.from_bytes(table, f"{where}: params.table"))
    return decode(stored, model, decoded_length // 4, _coder_of(codec), where=where)


def _section_decode(codec: Codec):
    def decode_section(stored: Any, params: Mapping[str, Any], decoded_length: int, where: str) -> bytes:
        symbols = _decode_categorical_section(stored, params, decoded_length, codec, where)
        return symbols.astype("<i4", copy=False).tobytes()

    return decode_section


def read_symbols(reader, name: str) -> np.ndarray:
    """The int32 symbols of a self-contained (categorical) RANGE/ANS section, as an array.

    What ``np.frombuffer(reader.read(name), "<i4")`` gives, without the detour
    through bytes (the same checks; the array is the caller's, writable)."""
    info = reader.info(name)
    where = f"{reader.name}: section {name!r}"
    if info.codec not in (Codec.RANGE, Codec.ANS):
        raise FormatError(f"{where}: codec {info.codec_name} is not an entropy codec")
    stored = reader.stored(name)
    reader.charge(info.decoded_length, f"section {name!r}")
    symbols = _decode_categorical_section(stored, info.params, info.decoded_length, Codec(info.codec), where)
    return symbols.astype("<i4", copy=False)


def _needs_context(params: Mapping[str, Any]) -> bool:
    return params.get("model") in (ModelId.GAUSSIAN, ModelId.LAPLACE, ModelId.LOGISTIC)


for _codec in (Codec.RANGE, Codec.ANS):
    register_codec(SectionCodec(_codec, _section_encode(_codec), _section_decode(_codec), aligned=False,
                                needs_context=_needs_context, check_lengths=_stream_lengths))


def write_conditional(writer, name: str, symbols: np.ndarray, model: ConditionalModel, *,
                      codec: Codec = Codec.ANS, kind: int, params: Mapping[str, Any] | None = None,
                      critical: bool = True):
    """Append a conditional stream as a section (its means/scales travel elsewhere)."""
    symbols = _as_symbols(symbols)
    stored = encode(symbols, model, _coder_of(codec))
    check_density(symbols.size, len(stored), f"section {name!r}", DensityError)
    merged = dict(params or {})
    merged.update({"model": int(_MODEL_OF[model.grid.family]), "grid": model.grid.grid_id})
    return writer.add_stored(name, stored, decoded_length=4 * symbols.size, kind=kind, codec=codec,
                             params=merged, critical=critical)


def read_conditional(reader, name: str, model: ConditionalModel) -> np.ndarray:
    """Decode a section written by :func:`write_conditional` given the same model."""
    info = reader.info(name)
    where = f"{reader.name}: section {name!r}"
    if info.codec not in (Codec.RANGE, Codec.ANS):
        raise FormatError(f"{where}: codec {info.codec_name} is not an entropy codec")
    model_id = _section_model(info.params, where)
    if model_id not in _FAMILY_OF or _FAMILY_OF[model_id] != model.grid.family:
        raise UsageError(f"{where}: stream uses model {model_id.name}, caller gave {model.grid.family.name}")
    if info.params.get("grid") != model.grid.grid_id:
        raise FormatError(f"{where}: params.grid is {info.params.get('grid')!r}, expected {model.grid.grid_id}")
    if info.decoded_length != 4 * model.size:
        raise FormatError(f"{where}: decoded_length {info.decoded_length} != 4 × {model.size} symbols")
    stored = reader.stored(name)
    reader.charge(info.decoded_length, f"section {name!r}")
    return decode(stored, model, model.size, _coder_of(Codec(info.codec)), where=where)
