"""Uniform scalar quantization: steps, step codes and the search for a target.

Ŵ = q · step, q = round(W / step) as int32, coded with ANS under a table fitted to
the tensor (so frequent small indices cost little and outliers stay exact up to
the step: no clipping). With entropy coding, one uniform step is what minimizes
MSE at a given rate in the high-rate regime (Gish & Pierce, "Asymptotically
efficient quantizing", IEEE Trans. IT 1968; Wiedemann et al., "DeepCABAC",
IEEE JSTSP 2020); per-channel or per-group steps (∝ the channel's / group's
RMS) equalize *relative* error where rows differ in scale, which matters for
activations downstream.

``rowcol`` steps are ∝ row RMS × column RMS (the columns measured after the
rows are normalized: one Sinkhorn step). It is the data-free counterpart of
activation-aware scaling (Lin et al., "AWQ", MLSys 2024; Xiao et al.,
"SmoothQuant", ICML 2023): transformer activations have a few outlier feature
dimensions (Dettmers et al., "LLM.int8()", NeurIPS 2022), and trained weights
reading them are small, so a column of small weights marks a sensitive input.
Giving such columns their own finer step cut the output-cosine drop of
MiniLM's attention-value projections 4x and of its FFN input projections 1.4x
at equal bits (bench/models.py), at no cost elsewhere.

The step comes from a target: ``rel_error`` (‖W − Ŵ‖/‖W‖) or ``bits`` (coded
bits per weight of the indices): bisection on a global multiplier over a seeded
sample, then a few corrections checked on the whole tensor with the decoder's
float32 arithmetic (the target is never exceeded).

Relative steps (per row, group, column) are rounded to a small float grid,
``(32 + f)·2^(e−5)`` (5-bit mantissa, code ``c = 32e + f``), and stored as
ANS-coded int32 codes with one float32 multiplier (``step_base``): ~5 bits per
row instead of 32 (0.05 bits/weight on MiniLM), and the decoder computes every
step exactly (``ldexp``, one float32 multiply) on any machine.

Calibrated quantization (same steps, other rounding) is in :mod:`.calibrated`,
pairs of indices in :mod:`.pairs`, the ``QUANTIZED`` sections in :mod:`.format`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ncz.format import UsageError

from ..representation import entropy_bits

__all__ = ["GRANULARITIES", "Steps", "Quantized", "quantize", "quantize_codes", "dequantize", "step_codes",
           "step_values", "decoder_steps", "expand_steps", "rms_scale", "weight_error", "STEP_CODE_RANGE"]

GRANULARITIES = ("tensor", "channel", "group", "rowcol")

Steps = np.ndarray | tuple[np.ndarray, np.ndarray]



def rms_scale(rms: np.ndarray) -> np.ndarray:
    """``rms`` normalized to an overall RMS of 1 (zero entries → 1, they hold only zeros)."""
    overall = float(np.sqrt(np.mean(rms**2))) or 1.0
    return np.where(rms > 0, rms / overall, 1.0)


_MANTISSA = 32  # 5-bit mantissa of the step codes: neighbouring steps differ by ≤ 3.1 %
_EXPONENT_LIMIT = 60
STEP_CODE_RANGE = (-_EXPONENT_LIMIT * _MANTISSA, _EXPONENT_LIMIT * _MANTISSA + _MANTISSA - 1)  # valid codes


def step_codes(x: np.ndarray) -> np.ndarray:
    """int32 codes ``c = 32·e + f`` (0 ≤ f < 32) of positive ``x`` ≈ ``(32 + f)·2^(e−5)``."""
    e = np.floor(np.log2(x))
    f = np.rint((x / np.exp2(e) - 1) * _MANTISSA)
    carry = f >= _MANTISSA
    e = np.clip(np.where(carry, e + 1, e), -_EXPONENT_LIMIT, _EXPONENT_LIMIT)
    f = np.where(carry, 0, f)
    return (e * _MANTISSA + f).astype(np.int32)


def step_values(codes: np.ndarray) -> np.ndarray:
    """float32 values of step codes, exactly (ldexp of a small integer): the same on every machine."""
    codes = codes.astype(np.int32)
    return np.ldexp((_MANTISSA + (codes & (_MANTISSA - 1))).astype(np.float32), (codes >> 5) - 5).astype(np.float32)


def _snap(unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, float32 values) of relative steps rounded to the code grid."""
    codes = step_codes(unit)
    return codes, step_values(codes)


def _unit_steps(w: np.ndarray, granularity: str, group_size: int) -> np.ndarray:
    """Relative step per row/group (∝ RMS), broadcastable to w's (rows, cols) view.

    For ``rowcol`` this is the row part; :func:`_column_scales` gives the column part.
    """
    rows = w.shape[0]
    if granularity == "tensor":
        return np.ones((1, 1))
    if granularity in ("channel", "rowcol"):
        rms = np.sqrt(np.mean(np.square(w, dtype=np.float64), axis=1, keepdims=True))
    else:
        cols = w.shape[1]
        if cols % group_size:
            raise UsageError(f"group_size {group_size} does not divide the row length {cols}")
        g = w.reshape(rows, cols // group_size, group_size).astype(np.float64)
        rms = np.sqrt(np.mean(g**2, axis=2))  # rows × groups
    return rms_scale(rms)


def _column_scales(w: np.ndarray, row_unit: np.ndarray) -> np.ndarray:
    """(1, cols): RMS of each column of ``w`` after dividing rows by their RMS (one Sinkhorn step)."""
    rms = np.sqrt(np.mean(np.square(w / row_unit, dtype=np.float64), axis=0, keepdims=True))
    return rms_scale(rms)


def expand_steps(steps: Steps, shape: tuple[int, int], granularity: str, group_size: int) -> np.ndarray:
    """The float32 step of every weight (broadcast where possible)."""
    if granularity == "rowcol":
        row_steps, col_scales = steps
        return np.multiply(row_steps, col_scales, dtype=np.float32)
    if granularity == "group":
        return np.repeat(steps, group_size, axis=1)
    return np.broadcast_to(steps, shape)


def dequantize(q: np.ndarray, steps: Steps, granularity: str, group_size: int = 64) -> np.ndarray:
    """float32 weights of the 2-D index view ``q``: exactly the decoder's arithmetic.

    ``q · step`` in float32, where step is per tensor / row / (row, group); for
    ``rowcol`` ``steps`` is the pair (row steps ``(rows, 1)``, column scales
    ``(1, cols)``) and the step of (i, j) is ``row_step[i] · col_scale[j]``
    rounded to float32 first.
    """
    return q.astype(np.float32) * expand_steps(steps, q.shape, granularity, group_size)


_SEARCH_SAMPLE = 1 << 16  # weights the step search looks at; the final steps are checked on all of them


def _search(values: np.ndarray, unit: np.ndarray, norm: float, rel_error: float | None, bits: float | None,
            lo: float, hi: float) -> float:
    """Bisection on log(multiplier) over ``values`` (unit steps matched element-wise, float64)."""
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


@dataclass(frozen=True)
class Quantized:
    """A quantized 2-D view: indices, float32 steps as the decoder computes them, and their codes."""

    q: np.ndarray  # int32, the view's shape
    steps: Steps  # float32: (1,1) / (rows,1) / (rows,groups), or (row steps, column scales) for rowcol
    rel_error: float
    base: float  # the float32 multiplier: row steps = base · step_values(row_codes)
    row_codes: np.ndarray  # int32 codes of the relative row / group / tensor steps
    col_codes: np.ndarray | None  # int32 codes of the column scales (rowcol)


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
    ``_SEARCH_SAMPLE`` weights (the whole tensor when it is small), then refined
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
    w32 = np.ascontiguousarray(w, dtype=np.float32)
    if w32.size == 0:  # nothing to quantize: unit steps of the right shapes
        rows, cols = w32.shape
        shape = {"tensor": (1, 1), "channel": (rows, 1), "rowcol": (rows, 1),
                 "group": (rows, cols // group_size if group_size > 0 else 0)}[granularity]
        codes = np.zeros(shape, np.int32)
        col_codes = np.zeros((1, cols), np.int32) if granularity == "rowcol" else None
        steps = (step_values(codes), step_values(col_codes)) if col_codes is not None else step_values(codes)
        return Quantized(np.zeros(w32.shape, np.int32), steps, 0.0, 1.0, codes, col_codes)
    norm = math.sqrt(float(np.sum(np.square(w32, dtype=np.float64)))) if w32.size else 0.0
    if not np.isfinite(norm):
        raise UsageError("cannot quantize a tensor with NaN or inf; use the lossless representation")
    row_codes, unit = _snap(_unit_steps(w32, granularity, group_size))
    col_codes, cols_scale = _snap(_column_scales(w32, unit)) if granularity == "rowcol" else (None, None)

    def package(row_steps: np.ndarray) -> Steps:
        return (row_steps, cols_scale) if cols_scale is not None else row_steps

    if norm == 0:
        return Quantized(np.zeros(w32.shape, np.int32), package(unit), 0.0, 1.0, row_codes, col_codes)
    rms = norm / math.sqrt(w32.size)
    lowest, highest = math.log(rms * 1e-7), math.log(rms * 64)

    def attempt(log_multiplier: float):
        base = np.float32(math.exp(log_multiplier))
        steps = package(unit * base)  # float32 × float32, as the decoder
        full = expand_steps(steps, w32.shape, granularity, group_size)
        q = np.rint(w32 / full)
        if not np.isfinite(q).all() or np.abs(q).max() >= 2**30:
            return None
        diff = w32 - q * full  # exactly the decoder's float32 arithmetic
        err = math.sqrt(float(np.sum(np.square(diff), dtype=np.float64))) / norm
        return q.astype(np.int32), steps, err, float(base)

    # 1. bisection on a sample
    cols = w32.shape[1]
    if w32.size > 2 * _SEARCH_SAMPLE:
        flat = np.random.default_rng(0).integers(0, w32.size, size=_SEARCH_SAMPLE)
        r, c = flat // cols, flat % cols
        values = w32[r, c].astype(np.float64)
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
        values = w32.astype(np.float64).ravel()
        unit_s = (unit * cols_scale if cols_scale is not None else
                  expand_steps(unit, w32.shape, granularity, group_size)).ravel()
        sample_norm = norm
    guess = _search(values, unit_s, sample_norm, rel_error, bits, lowest, highest)

    # 2. corrections on the whole tensor: keep the best feasible, bracket the rest
    best = None  # (log multiplier, result)
    lo, hi = lowest, highest  # feasible side / infeasible side for rel_error (reversed roles for bits)
    m = guess
    for _ in range(12):
        result = attempt(m)
        if result is None:  # too fine for int32: coarser
            lo = max(lo, m) if rel_error is None else lo
            m = min(m + math.log(2), highest)
            continue
        q, steps, err, _ = result
        if rel_error is not None:
            if err <= rel_error:
                if best is None or m > best[0]:
                    best = (m, result)
                lo = max(lo, m)
                if err >= rel_error * (1 - 2e-3) or m >= highest:
                    break
                m_next = m + (math.log(rel_error / err) if err > 0 else math.log(2))
            else:
                hi = min(hi, m)
                m_next = m + math.log(rel_error / err) - 1e-4
        else:
            got = entropy_bits(q)
            if got <= bits:
                if best is None or m < best[0]:
                    best = (m, result)
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
            result = attempt(m)
            if result is None:
                continue
            if (result[2] <= rel_error) if rel_error is not None else (entropy_bits(result[0]) <= bits):
                best = (m, result)
                break
        if best is None:
            raise UsageError("no step meets the target within int32 indices")
    q, steps, err, base = best[1]
    return Quantized(q, steps, err, base, row_codes, col_codes)


def decoder_steps(row_codes: np.ndarray, col_codes: np.ndarray | None, base: float) -> Steps:
    """The float32 steps the decoder computes from the codes and ``step_base``."""
    row_steps = step_values(row_codes) * np.float32(base)
    return (row_steps, step_values(col_codes)) if col_codes is not None else row_steps


def weight_error(w32: np.ndarray, q: np.ndarray, steps: Steps, granularity: str, group_size: int,
                  norm: float) -> float:
    """‖W − Ŵ‖/‖W‖ with the decoder's float32 reconstruction."""
    diff = w32 - dequantize(q, steps, granularity, group_size)
    return math.sqrt(float(np.sum(np.square(diff, dtype=np.float64)))) / norm

