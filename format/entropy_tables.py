"""Integer probability tables and the fixed parametric grids (FORMAT.md §7).

Every probability that reaches the entropy coder is an integer frequency out of
``2**PRECISION``. Tables are built here, deterministically, and handed to the
coder as exact dyadic floats (``f / 2**24``), which constriction reproduces
exactly. So a decoder never depends on float math done at coding time, BLAS,
thread count or machine.

Parametric models (Gaussian, Laplace, logistic) are not evaluated per symbol.
A mean is quantized to ``1/MEAN_STEPS`` and split into an integer offset and a
fractional bin; a scale is snapped to one of ``NUM_SCALES`` log-spaced values by
comparisons against fixed boundaries (no log/exp at coding time). Each (fraction,
scale) pair owns one integer table, built once per process from ``math.erfc`` /
``math.exp`` in float64 and pinned by a hash in FORMAT.md and in the tests::

    mean ──► q = floor(mean·8 + ½) ──► offset = q >> 3, frac = q & 7
    scale ─► index = #{boundaries < scale} (clamped to 0..63)
    (frac, index) ──► table t = frac·64 + index ──► freqs over r ∈ [−T, T] + escape
    symbol x ──► r = x − offset ──► coded with table t (escape if |r| > T)
"""

from __future__ import annotations

import enum
import functools
import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from .errors import FormatError, LimitError, UsageError

__all__ = [
    "PRECISION",
    "FrequencyTable",
    "Family",
    "ParametricGrid",
    "GRID_V1",
    "fit_table",
    "fit_table_counts",
    "encode_varints",
    "decode_varints",
]

PRECISION = 24  # bits; constriction's native model precision for 32-bit words
TOTAL = 1 << PRECISION
MAX_TABLE_SYMBOLS = 1 << 16  # largest stored table this reader accepts


# --- varints (LEB128, zigzag for signed) -----------------------------------


def encode_varints(values: np.ndarray, *, signed: bool) -> bytes:
    """LEB128 of each value (zigzag-mapped first if ``signed``), vectorized."""
    v = np.asarray(values, dtype=np.int64)
    u = ((v << 1) ^ (v >> 63)).astype(np.uint64) if signed else v.astype(np.uint64)
    if v.size and not signed and (v < 0).any():
        raise UsageError("unsigned varints got a negative value")
    remaining = u.copy()
    # columns of 7-bit groups; at most 10 for 64-bit values
    groups = []
    while True:
        groups.append((remaining & 0x7F).astype(np.uint8))
        remaining = remaining >> np.uint64(7)
        if not remaining.any():
            break
    count = np.ones(u.shape, dtype=np.int64)
    rest = u >> np.uint64(7)
    while rest.any():
        count += rest > 0
        rest = rest >> np.uint64(7)
    matrix: np.ndarray = np.stack(groups, axis=1) if groups else np.zeros((u.size, 1), np.uint8)
    cont = np.arange(matrix.shape[1])[None, :] < (count[:, None] - 1)
    matrix = matrix | (cont.astype(np.uint8) << 7)
    keep = np.arange(matrix.shape[1])[None, :] < count[:, None]
    out = matrix[keep]
    return out.tobytes()


def decode_varints(data: bytes | memoryview, count: int, *, signed: bool, where: str) -> tuple[np.ndarray, int]:
    """Parse exactly ``count`` LEB128 values from the start of ``data``.

    Returns (values as int64, bytes consumed). Raises on truncation or a value
    wider than 64 bits (a hostile stream)."""
    if count == 0:
        return np.zeros(0, dtype=np.int64), 0
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buf < 0x80)
    if ends.size < count:
        raise FormatError(f"{where}: varint stream holds {ends.size} values, expected {count}")
    ends = ends[:count]
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 10:
        raise FormatError(f"{where}: varint longer than 10 bytes")
    values = np.zeros(count, dtype=np.uint64)
    for k in range(int(lengths.max())):
        has = lengths > k
        byte = buf[starts[has] + k].astype(np.uint64) & np.uint64(0x7F)
        values[has] |= byte << np.uint64(7 * k)
    consumed = int(ends[-1]) + 1
    if signed:
        result = (values >> np.uint64(1)).astype(np.int64) ^ -(values & np.uint64(1)).astype(np.int64)
    else:
        result = values.astype(np.int64)
    return result, consumed


# --- frequency tables --------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FrequencyTable:
    """Integer frequencies over ``offset .. offset+len-1`` (+ one escape symbol).

    ``freqs`` sums to ``2**PRECISION`` and every entry is >= 1, so every symbol in
    the alphabet is codable and constriction reproduces the table exactly. With
    ``escape``, the last entry is the escape symbol: a value outside the range is
    coded as escape and its value goes to the section's escape stream.
    """

    offset: int
    freqs: np.ndarray = field(repr=False)
    escape: bool = True

    def __post_init__(self) -> None:
        freqs = np.ascontiguousarray(self.freqs, dtype=np.int64)
        if freqs.ndim != 1 or freqs.size < 1 + int(self.escape):
            raise UsageError("a frequency table needs at least one regular symbol")
        if freqs.size > MAX_TABLE_SYMBOLS + 1:
            raise LimitError(f"table has {freqs.size} entries; the limit is {MAX_TABLE_SYMBOLS + 1}")
        if int(freqs.min()) < 1 or int(freqs.sum()) != TOTAL:
            raise FormatError(f"table frequencies must be >= 1 and sum to 2^{PRECISION}")
        if not (-(2**31) <= self.offset and self.offset + self.num_regular - 1 < 2**31):
            raise FormatError("table range must lie within int32")
        freqs.setflags(write=False)
        object.__setattr__(self, "freqs", freqs)

    @property
    def num_regular(self) -> int:
        return self.freqs.size - int(self.escape)

    @property
    def lo(self) -> int:
        return self.offset

    @property
    def hi(self) -> int:
        return self.offset + self.num_regular - 1

    @functools.cached_property
    def probabilities(self) -> np.ndarray:
        """Exact dyadic floats ``f / 2**24`` for the coder."""
        return self.freqs / float(TOTAL)

    @functools.cached_property
    def bits(self) -> np.ndarray:
        """Information content in bits of each table index."""
        return PRECISION - np.log2(self.freqs.astype(np.float64))

    def to_indices(self, symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(table indices, mask of escaped symbols)."""
        rel = symbols.astype(np.int64) - self.offset
        outside = (rel < 0) | (rel >= self.num_regular)
        if outside.any():
            if not self.escape:
                raise UsageError(f"symbols outside [{self.lo}, {self.hi}] and the table has no escape")
            rel = np.where(outside, self.num_regular, rel)
        return rel.astype(np.int32), outside

    def information(self, symbols: np.ndarray) -> float:
        """Bits of ``symbols`` under this table (escapes: the escape symbol only)."""
        indices, _ = self.to_indices(np.asarray(symbols))
        return float(self.bits[indices].sum())

    def to_bytes(self) -> bytes:
        """Compact storage: varint(count), zigzag varint(offset), escape byte, varint(freq−1)…"""
        head = encode_varints(np.array([self.freqs.size]), signed=False)
        head += encode_varints(np.array([self.offset]), signed=True) + bytes([int(self.escape)])
        return head + encode_varints(self.freqs - 1, signed=False)

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> FrequencyTable:
        (size,), used = decode_varints(data, 1, signed=False, where=f"{where}: table size")
        if not 1 <= size <= MAX_TABLE_SYMBOLS + 1:
            raise LimitError(f"{where}: table declares {size} entries; allowed 1..{MAX_TABLE_SYMBOLS + 1}")
        (offset,), n = decode_varints(data[used:], 1, signed=True, where=f"{where}: table offset")
        used += n
        if used >= len(data) or data[used] not in (0, 1):
            raise FormatError(f"{where}: table escape flag must be 0 or 1")
        escape = bool(data[used])
        used += 1
        freqs, n = decode_varints(data[used:], int(size), signed=False, where=f"{where}: table frequencies")
        if used + n != len(data):
            raise FormatError(f"{where}: {len(data) - used - n} stray bytes after the table")
        if (freqs >= TOTAL).any():
            raise FormatError(f"{where}: table frequency exceeds 2^{PRECISION}")
        try:
            return cls(int(offset), freqs + 1, escape)
        except (FormatError, UsageError) as exc:
            raise FormatError(f"{where}: {exc}") from exc


def quantize_masses(masses: np.ndarray) -> np.ndarray:
    """Float masses (summing to ~1) -> int frequencies >= 1 summing to 2**24.

    Deterministic: floor of the scaled mass, then the remainder to the largest
    entry (lowest index on ties). Every entry keeps at least 1.
    """
    masses = np.asarray(masses, dtype=np.float64)
    masses = np.where(np.isfinite(masses) & (masses > 0), masses, 0.0)
    total = masses.sum()
    budget = TOTAL - masses.size
    if budget < 0:
        raise LimitError(f"{masses.size} symbols cannot each get a frequency at precision {PRECISION}")
    freqs = 1 + (np.floor(masses / total * budget).astype(np.int64) if total > 0 else np.zeros(masses.size, np.int64))
    freqs[int(np.argmax(freqs))] += TOTAL - int(freqs.sum())
    return freqs


def fit_table(symbols: np.ndarray, *, max_symbols: int = 4096) -> FrequencyTable:
    """Fit a table with escape to ``symbols`` (the empirical/adaptive mode).

    The range is the contiguous window of at most ``max_symbols`` values that
    covers the most samples (centred on the data's bulk); values outside it are
    escaped. Counts become frequencies by :func:`quantize_masses`.
    """
    symbols = np.asarray(symbols).ravel()
    if symbols.size == 0:
        return FrequencyTable(0, np.array([TOTAL - 1, 1]), escape=True)
    lo, hi = int(symbols.min()), int(symbols.max())
    if hi - lo < 1 << 22:
        counts = np.bincount((symbols.astype(np.int64) - lo), minlength=hi - lo + 1)
        values = np.flatnonzero(counts)
        return fit_table_counts(values + lo, counts[values], max_symbols=max_symbols)
    values, counts = np.unique(symbols.astype(np.int64), return_counts=True)
    return fit_table_counts(values, counts, max_symbols=max_symbols)


def fit_table_counts(values: np.ndarray, counts: np.ndarray, *, max_symbols: int = 4096) -> FrequencyTable:
    """:func:`fit_table` from a histogram: the distinct ``values`` (ascending) and their ``counts``
    (> 0), e.g. gathered chunk by chunk from more symbols than fit in memory twice."""
    values = np.asarray(values, np.int64)
    counts = np.asarray(counts, np.int64)
    if values.size == 0:
        return FrequencyTable(0, np.array([TOTAL - 1, 1]), escape=True)
    lo, hi = int(values[0]), int(values[-1])
    if hi - lo + 1 > max_symbols:
        # best window [values[i], values[i] + max_symbols) by covered count
        cum = np.concatenate(([0], np.cumsum(counts)))
        right = np.searchsorted(values, values + max_symbols, side="left")
        covered = cum[right] - cum[np.arange(values.size)]
        best = int(np.argmax(covered))
        lo = int(values[best])
        hi = int(values[right[best] - 1])
    inside = (values >= lo) & (values <= hi)
    table = np.zeros(hi - lo + 2, np.float64)  # the last bin: escapes, out-of-window on either side
    table[values[inside] - lo] = counts[inside]
    table[-1] = int(counts[~inside].sum())
    return FrequencyTable(lo, quantize_masses(table), escape=True)


# --- parametric grids ----------------------------------------------------------


class Family(enum.IntEnum):
    """Parametric model families (FORMAT.md §7.3). Ids are never reused."""

    GAUSSIAN = 1
    LAPLACE = 2
    LOGISTIC = 3


def _cdf(family: Family, x: float) -> float:
    """CDF of the unit-scale, zero-mean distribution, accurate in both tails."""
    if family is Family.GAUSSIAN:
        return 0.5 * math.erfc(-x / math.sqrt(2.0))
    if family is Family.LAPLACE:
        return 0.5 * math.exp(x) if x < 0 else 1.0 - 0.5 * math.exp(-x)
    # logistic
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


# support half-width in units of scale: beyond it the tail mass is < 2^-24
_TAIL_Z = {Family.GAUSSIAN: 6.0, Family.LAPLACE: 17.0, Family.LOGISTIC: 17.0}


@dataclass(frozen=True)
class ParametricGrid:
    """A fixed grid of integer tables for one parametric family.

    The grid (scales, mean step, support) is part of the format: grid id 1 is
    defined in FORMAT.md §7.3. Tables are built lazily and cached per process.
    """

    family: Family
    grid_id: int = 1
    num_scales: int = 64
    scale_min: float = 0.11
    scale_max: float = 256.0
    mean_steps: int = 8

    def __post_init__(self) -> None:
        if not (2 <= self.num_scales <= 256 and 0 < self.scale_min < self.scale_max and 1 <= self.mean_steps <= 64):
            raise UsageError(f"invalid grid {self}")
        if self.mean_steps & (self.mean_steps - 1):
            raise UsageError("mean_steps must be a power of two (exact shifts)")

    @functools.cached_property
    def scales(self) -> np.ndarray:
        ratio = math.log(self.scale_max / self.scale_min) / (self.num_scales - 1)
        return np.array([self.scale_min * math.exp(i * ratio) for i in range(self.num_scales)])

    @functools.cached_property
    def boundaries(self) -> np.ndarray:
        """Geometric midpoints between adjacent scales; index = #boundaries < scale."""
        s = self.scales
        return np.sqrt(s[:-1] * s[1:])

    @property
    def num_tables(self) -> int:
        return self.num_scales * self.mean_steps

    def half_width(self, scale_index: int) -> int:
        return int(math.ceil(_TAIL_Z[self.family] * float(self.scales[scale_index]))) + 1

    def quantize(self, mean: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(integer offsets int64, table indices int32) for float means and scales.

        Only a multiply by a power of two, a floor and comparisons: the same
        float inputs give the same indices on every machine.
        """
        mean = np.asarray(mean, dtype=np.float64).ravel()
        scale = np.asarray(scale, dtype=np.float64).ravel()
        if mean.shape != scale.shape:
            raise UsageError(f"mean and scale differ in shape: {mean.shape} vs {scale.shape}")
        if not (np.isfinite(mean).all() and np.isfinite(scale).all()):
            raise UsageError("means and scales must be finite")
        if np.abs(mean).max(initial=0.0) > 2**30:
            raise UsageError("|mean| must be below 2^30")
        q = np.floor(mean * self.mean_steps + 0.5).astype(np.int64)
        shift = self.mean_steps.bit_length() - 1
        offsets = q >> shift
        frac = q & (self.mean_steps - 1)
        return offsets, (frac * self.num_scales + self.scale_index(scale)).astype(np.int32)

    def scale_index(self, scale: np.ndarray) -> np.ndarray:
        """#{boundaries < scale}: exact, by comparisons.

        A log gives a guess within one step (10x faster than a binary search);
        one comparison on each side against the boundary table makes it exact,
        so the result never depends on the machine's log.
        """
        bounds = self.boundaries
        last = self.num_scales - 1
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            per_log = (self.num_scales - 1) / math.log(self.scale_max / self.scale_min)
            guess = np.log(np.maximum(scale, 1e-300) / self.scale_min) * per_log
        k = np.clip(np.floor(guess + 0.5), 0, last).astype(np.int64)
        k += (k < last) & (scale > bounds[np.minimum(k, last - 1)])
        k -= (k > 0) & (scale <= bounds[np.maximum(k - 1, 0)])
        return k

    @functools.cache  # noqa: B019 - grids are module-level constants
    def table(self, index: int) -> FrequencyTable:
        """The integer table ``index`` = frac·num_scales + scale_index."""
        if not 0 <= index < self.num_tables:
            raise UsageError(f"table index {index} outside 0..{self.num_tables - 1}")
        frac, scale_index = divmod(index, self.num_scales)
        centre = frac / self.mean_steps
        scale = float(self.scales[scale_index])
        width = self.half_width(scale_index)
        edges = [(r - centre) / scale for r in range(-width, width + 2)]
        # upper/lower half of a bin from the nearer tail keeps precision far out
        cdf = np.array([_cdf(self.family, e - 0.5 / scale) for e in edges])
        masses = np.diff(cdf)
        escape_mass = max(0.0, 1.0 - float(masses.sum()))
        return FrequencyTable(-width, quantize_masses(np.append(masses, escape_mass)), escape=True)

    def digest(self) -> str:
        """sha256 over every table (offset, frequencies): pins the grid across machines."""
        h = hashlib.sha256()
        for t in range(self.num_tables):
            table = self.table(t)
            h.update(np.int64(table.offset).tobytes())
            h.update(table.freqs.astype("<u4").tobytes())
        return h.hexdigest()


GRID_V1 = {family: ParametricGrid(family) for family in Family}
