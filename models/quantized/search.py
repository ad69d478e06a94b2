"""The search for a step multiplier that meets a relative-error or bits target.

A tensor is prepared once (:func:`prepare`: norm, relative row / group / column
steps and their codes, a seeded sample), then the multiplier is bisected on the
sample and corrected on the whole tensor (:func:`search`); the indices are made
last, chunk by chunk (:func:`rounded`). Every whole-tensor pass reads the tensor
in chunks of rows (:mod:`.passes`), with the decoder's float32 arithmetic and
numpy's own summation order: memory stays bounded and the result is the same as
on the whole array.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ncz.format import UsageError

from ..representation import entropy_bits
from .passes import CHUNK_ELEMENTS, BlockedSum, ColumnSum, Histogram, RowSource, pairwise_sum
from .steps import GRANULARITIES, Quantized, Steps, rms_scale, snap, step_values

__all__ = ["Prepared", "Choice", "prepare", "search", "rounded", "block_steps", "zero_choice", "quantize",
           "quantize_codes", "SEARCH_SAMPLE"]

SEARCH_SAMPLE = 1 << 16  # weights the bisection looks at; the final steps are checked on all of them


@dataclass(frozen=True)
class Prepared:
    """What the search needs of one tensor, computed once (a cast-induced retry reuses it)."""

    source: RowSource
    granularity: str
    group_size: int
    norm: float
    row_codes: np.ndarray  # int32 codes of the relative row / group / tensor steps
    unit: np.ndarray  # their float32 values
    col_codes: np.ndarray | None  # rowcol: int32 codes of the column scales
    cols_scale: np.ndarray | None  # their float32 values
    sample: np.ndarray  # float64 weights the bisection sees
    sample_unit: np.ndarray  # their relative steps
    sample_norm: float
    peak: float  # the largest |weight|

    def steps(self, base: np.float32) -> Steps:
        row_steps = self.unit * base  # float32 × float32, as the decoder
        return (row_steps, self.cols_scale) if self.cols_scale is not None else row_steps

    def indices_fit(self, base: np.float32) -> bool:
        """True when every index of this multiplier is surely below 2²⁹ in magnitude (no need to look):
        the largest |weight| over the smallest step, with a margin for float32 rounding."""
        smallest = float(self.unit.min()) * float(base) * (float(self.cols_scale.min()) if self.cols_scale
                                                          is not None else 1.0)
        return smallest > 0 and self.peak / (smallest * (1 - 1e-6)) < 2**29


@dataclass(frozen=True)
class Choice:
    steps: Steps  # float32, as the decoder computes them
    rel_error: float
    base: float  # the float32 multiplier (step_base)


def block_steps(steps: Steps, start: int, stop: int, cols: int, granularity: str, group_size: int) -> np.ndarray:
    """The float32 step of every weight of rows ``start:stop`` (broadcastable to the block)."""
    if granularity == "rowcol":
        row_steps, col_scales = steps
        return np.multiply(row_steps[start:stop], col_scales, dtype=np.float32)
    if granularity == "group":
        return np.repeat(steps[start:stop], group_size, axis=1)
    if granularity == "tensor":
        return steps
    return steps[start:stop]


def _unit_steps(source: RowSource, granularity: str, group_size: int) -> np.ndarray:
    """Relative step per row / group (∝ RMS): (rows, 1), (rows, groups) or (1, 1)."""
    if granularity == "tensor":
        return np.ones((1, 1))
    cols = source.cols
    if granularity == "group" and cols % group_size:
        raise UsageError(f"group_size {group_size} does not divide the row length {cols}")
    parts = []
    for start, stop in source.spans():
        w = source.block(start, stop)
        if granularity == "group":
            g = w.reshape(stop - start, cols // group_size, group_size).astype(np.float64)
            parts.append(np.sqrt(np.mean(g**2, axis=2)))
        else:
            parts.append(np.sqrt(np.mean(np.square(w, dtype=np.float64), axis=1, keepdims=True)))
    return rms_scale(np.concatenate(parts))


def _column_scales(source: RowSource, row_unit: np.ndarray) -> np.ndarray:
    """(1, cols): RMS of each column after dividing rows by their relative step (one Sinkhorn step)."""
    if source.cols == 1:  # one contiguous column: numpy sums it pairwise, not row after row
        def leaf(start: int, stop: int) -> float:
            return float(np.sum(np.square(source.block(start, stop) / row_unit[start:stop], dtype=np.float64)))

        return rms_scale(np.sqrt(np.array([[pairwise_sum(leaf, source.rows)]]) / source.rows))
    total = ColumnSum(source.cols, max(1, CHUNK_ELEMENTS // max(source.cols, 1)))
    for start, stop in source.spans():
        np.square(source.block(start, stop) / row_unit[start:stop], out=total.rows(stop - start), dtype=np.float64)
        total.add(stop - start)
    return rms_scale(np.sqrt(total.total / source.rows))


def _norm_and_peak(source: RowSource) -> tuple[float, float]:
    """‖W‖ (numpy's pairwise sum of the float64 squares) and max |w|."""
    peak = [0.0]

    def leaf(start: int, stop: int) -> float:
        squares = np.square(source.flat(start, stop), dtype=np.float64)
        peak[0] = max(peak[0], float(squares.max()))
        return float(np.sum(squares))

    norm = math.sqrt(pairwise_sum(leaf, source.size))
    return norm, math.sqrt(peak[0])


def prepare(source: RowSource, granularity: str, group_size: int) -> Prepared:
    """Norm, relative steps and the search sample of ``source`` (raises on NaN/inf)."""
    norm, peak = _norm_and_peak(source)
    if not np.isfinite(norm):
        raise UsageError("cannot quantize a tensor with NaN or inf; use the lossless representation")
    row_codes, unit = snap(_unit_steps(source, granularity, group_size))
    col_codes, cols_scale = snap(_column_scales(source, unit)) if granularity == "rowcol" else (None, None)
    rows, cols = source.rows, source.cols
    if source.size > 2 * SEARCH_SAMPLE:
        flat = np.random.default_rng(0).integers(0, source.size, size=SEARCH_SAMPLE)
        r, c = flat // cols, flat % cols
        values = source.gather(flat).astype(np.float64)
        if granularity == "tensor":
            unit_s = np.full(values.shape, float(unit[0, 0]))
        elif granularity == "channel":
            unit_s = unit[r, 0]
        elif granularity == "rowcol":
            unit_s = unit[r, 0] * cols_scale[0, c]
        else:
            unit_s = unit[r, c // group_size]
        sample_norm = math.sqrt(float(np.sum(np.square(values))))
    else:
        values = source.block(0, rows).astype(np.float64).ravel()
        full = unit * cols_scale if cols_scale is not None else block_steps(unit, 0, rows, cols, granularity,
                                                                            group_size)
        unit_s = np.broadcast_to(full, (rows, cols)).ravel()
        sample_norm = norm
    return Prepared(source, granularity, group_size, norm, row_codes, unit, col_codes, cols_scale, values, unit_s,
                    sample_norm, peak)


def rounded(prep: Prepared, steps: Steps, even: bool = False) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """(start, stop, float32 indices, float32 steps) of each chunk of rows rounded with ``steps``
    (``even``: chunks of an even number of values but the last, see :meth:`RowSource.spans`)."""
    src = prep.source
    for start, stop in src.spans(even=even):
        full = block_steps(steps, start, stop, src.cols, prep.granularity, prep.group_size)
        yield start, stop, np.rint(src.block(start, stop) / full), full


def _attempt(prep: Prepared, log_multiplier: float, histogram: bool) -> tuple[Choice, Histogram | None] | None:
    """The steps of one multiplier and their error on the whole tensor (None: indices would not fit int32).

    One pass, in place in two chunk-sized buffers: q = rint(w / step), the range check, then
    (w − q·step)² summed as numpy sums a float32 array (:class:`BlockedSum`)."""
    base = np.float32(math.exp(log_multiplier))
    steps = prep.steps(base)
    src = prep.source
    squares = BlockedSum()
    counts = Histogram() if histogram else None
    scratch = np.empty(2 * min(src.size, max(CHUNK_ELEMENTS, src.cols)), np.float32)
    look = not prep.indices_fit(base)
    for start, stop in src.spans():
        full = block_steps(steps, start, stop, src.cols, prep.granularity, prep.group_size)
        w = src.block(start, stop)
        q = np.divide(w, full, out=scratch[:w.size].reshape(w.shape))
        np.rint(q, out=q)
        if look and not (-(2**30) < q.min() and q.max() < 2**30):  # also false for NaN
            return None
        if counts is not None:
            counts.add(q.astype(np.int32))
        diff = np.multiply(q, full, out=scratch[w.size:2 * w.size].reshape(w.shape))
        np.subtract(w, diff, out=diff)  # exactly the decoder's float32 arithmetic
        squares.add(np.square(diff, out=diff))
    err = math.sqrt(squares.result()) / prep.norm
    return Choice(steps, err, float(base)), counts


def _bisect(prep: Prepared, rel_error: float | None, bits: float | None, lo: float, hi: float) -> float:
    """Bisection on log(multiplier) over the sample (float64)."""
    values, unit, norm = prep.sample, prep.sample_unit, prep.sample_norm
    best = None
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        step = unit * math.exp(mid)
        q = np.rint(values / step)
        if q.size and np.abs(q).max() >= 2**30:  # step too small for int32 indices
            lo = mid
            continue
        if rel_error is not None:  # feasible at fine steps: the coarsest that meets the error
            if math.sqrt(float(np.sum(np.square(values - q * step)))) / norm <= rel_error:
                best, lo = mid, mid
            else:
                hi = mid
        elif entropy_bits(q.astype(np.int64)) <= bits:  # feasible at coarse steps: the finest within the bits
            best, hi = mid, mid
        else:
            lo = mid
    if best is not None:
        return best
    return lo if rel_error is not None else hi


def search(prep: Prepared, *, rel_error: float | None = None, bits: float | None = None) -> Choice:
    """The coarsest steps within ``rel_error``, or the finest within ``bits`` (index entropy), checked
    on the whole tensor: bisection on the sample, then corrections (error ∝ step and bits ≈ h − log2
    step near the target, so a few suffice), then a walk when those found nothing feasible."""
    rms = prep.norm / math.sqrt(prep.source.size)
    lowest, highest = math.log(rms * 1e-7), math.log(rms * 64)
    guess = _bisect(prep, rel_error, bits, lowest, highest)
    need_counts = bits is not None
    best = None  # (log multiplier, choice)
    lo, hi = lowest, highest  # feasible side / infeasible side for rel_error (reversed roles for bits)
    m = guess
    for _ in range(12):
        result = _attempt(prep, m, need_counts)
        if result is None:  # too fine for int32: coarser
            lo = max(lo, m) if rel_error is None else lo
            m = min(m + math.log(2), highest)
            continue
        choice, counts = result
        err = choice.rel_error
        if rel_error is not None:
            if err <= rel_error:
                if best is None or m > best[0]:
                    best = (m, choice)
                lo = max(lo, m)
                if err >= rel_error * (1 - 2e-3) or m >= highest:
                    break
                m_next = m + (math.log(rel_error / err) if err > 0 else math.log(2))
            else:
                hi = min(hi, m)
                m_next = m + math.log(rel_error / err) - 1e-4
        else:
            got = counts.entropy()
            if got <= bits:
                if best is None or m < best[0]:
                    best = (m, choice)
                hi = min(hi, m)
                if got >= bits - 5e-3 or m <= lowest:
                    break
                m_next = m - (bits - got) * math.log(2)
            else:
                lo = max(lo, m)
                m_next = m + (got - bits) * math.log(2) + 1e-4
        m = m_next if lo < m_next < hi else (lo + hi) / 2
        m = min(max(m, lowest), highest)
    if best is None:  # the model was off (tiny or odd tensors): walk until feasible
        m = guess
        for _ in range(400):
            m = m - 0.05 if rel_error is not None else m + 0.05
            result = _attempt(prep, m, need_counts)
            if result is None:
                continue
            if (result[0].rel_error <= rel_error) if rel_error is not None else (result[1].entropy() <= bits):
                best = (m, result[0])
                break
        if best is None:
            raise UsageError("no step meets the target within int32 indices")
    return best[1]


def zero_choice(prep: Prepared) -> Choice:
    """A tensor of zeros: unit steps, error 0."""
    return Choice(prep.steps(np.float32(1.0)), 0.0, 1.0)


def quantize(w: np.ndarray, *, rel_error: float | None = None, bits: float | None = None,
             granularity: str = "channel", group_size: int = 64) -> tuple[np.ndarray, Steps, float]:
    """(int32 indices, float32 steps, achieved relative error) for the 2-D view ``w``; see :func:`quantize_codes`."""
    result = quantize_codes(w, rel_error=rel_error, bits=bits, granularity=granularity, group_size=group_size)
    return result.q, result.steps, result.rel_error


def quantize_codes(w: np.ndarray, *, rel_error: float | None = None, bits: float | None = None,
                   granularity: str = "channel", group_size: int = 64) -> Quantized:
    """Quantize the 2-D view ``w`` to a relative-error or bits target.

    Steps are ∝ the RMS of the tensor (``tensor``), of each row (``channel``), of
    each run of ``group_size`` values in a row (``group``), or of each row times
    each column (``rowcol``: steps are then the pair (row steps, column scales),
    see :func:`dequantize`).

    The step multiplier is searched by bisection on a seeded sample of
    ``SEARCH_SAMPLE`` weights (the whole tensor when it is small), then refined
    on the whole tensor (error ∝ step and bits ≈ h − log2 step near the target,
    so a few corrections suffice). The target is always checked on the whole
    tensor with the decoder's float32 arithmetic: ``rel_error`` is never exceeded
    and ``bits`` (empirical entropy of the indices) never exceeded.
    """
    if (rel_error is None) == (bits is None):
        raise UsageError("give exactly one of rel_error or bits")
    if granularity not in GRANULARITIES:
        raise UsageError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if w.ndim != 2:
        raise UsageError(f"quantize() takes a 2-D view, got shape {list(w.shape)}")
    rows, cols = w.shape
    if w.size == 0:  # nothing to quantize: unit steps of the right shapes
        shape = {"tensor": (1, 1), "channel": (rows, 1), "rowcol": (rows, 1),
                 "group": (rows, cols // group_size if group_size > 0 else 0)}[granularity]
        codes = np.zeros(shape, np.int32)
        col_codes = np.zeros((1, cols), np.int32) if granularity == "rowcol" else None
        steps = (step_values(codes), step_values(col_codes)) if col_codes is not None else step_values(codes)
        return Quantized(np.zeros(w.shape, np.int32), steps, 0.0, 1.0, codes, col_codes)
    prep = prepare(RowSource(w, rows, cols), granularity, group_size)
    choice = zero_choice(prep) if prep.norm == 0 else search(prep, rel_error=rel_error, bits=bits)
    q = np.empty((rows, cols), np.int32)
    for start, stop, block, _ in rounded(prep, choice.steps):
        q[start:stop] = block
    return Quantized(q, choice.steps, choice.rel_error, choice.base, prep.row_codes, prep.col_codes)
