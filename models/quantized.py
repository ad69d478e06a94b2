"""Uniform scalar quantization with entropy-coded indices (DeepCABAC's idea, order-0).

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

Index pairs: on large tensors (≥ 2²⁰ values) whose indices almost all lie in
``−K/2 … K/2−1`` for some K ≤ 64, adjacent indices are coded as one symbol
(K² ≤ 4096, one ANS table): the same bits (the joint order-0 entropy of
near-independent pairs is twice the single one) for half the symbols, which is
what bounds decoding speed (~1.4x faster on MiniLM's embedding table).

Kind ``QUANTIZED`` (FORMAT.md §5.4). Head params: ``dtype``, ``shape``,
``granularity`` (``tensor`` | ``channel`` | ``group`` | ``rowcol``),
``group_size`` (group only), ``step_base`` (float, the float32 multiplier; absent
in files whose ``#step`` is float32), ``pair`` (K ∈ {4, 8, 16, 32, 64}, only when
indices are paired). Parts:

- ``#q``: int32 (ANS): the indices in C order of the (rows, cols) view (rows =
  first dimension), shape ``[n]``; with ``pair`` = K, ``[ceil(n/2)]`` symbols
  ``(a + K/2)·K + (b + K/2)`` for the pair (a, b) when both lie in −K/2…K/2−1,
  else ``K² + (zigzag(a) << 15 | zigzag(b))`` (|a|, |b| < 2¹⁴); an odd n is padded
  with the index 0;
- ``#step``: int32 step codes (ANS), shape ``[1, 1]`` / ``[rows, 1]`` (channel,
  rowcol) / ``[rows, groups]``, each ``c = 32e + f`` with −60 ≤ e ≤ 60, step =
  float32(``step_base``) · ldexp(32 + f, e − 5) in float32; or (older files,
  no ``step_base``) float32 steps of that shape;
- ``#colscale`` (rowcol only): int32 codes ``[1, cols]``, scale = ldexp(32 + f, e − 5).

Decoding: Ŵ[i, j] = float32(q[i, j]) · step[i, j], with step[i, j] = step of row i
(× colscale[j] for rowcol, that product rounded to float32 first; the step of
the group of j for group), then cast to ``dtype`` and reshaped to ``shape``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ncz.format import Codec, InputError, Kind, Reader, SectionInfo, UsageError, encode_payload
from ncz.format.entropy import read_symbols

from .representation import (
    Encoded,
    PendingSection,
    dtype_name,
    part_name,
    read_part,
    register_decoder,
    symbol_payload,
    torch_dtype,
)

__all__ = ["quantize", "quantize_codes", "Quantized", "dequantize", "step_values", "encode_quantized", "GRANULARITIES"]

GRANULARITIES = ("tensor", "channel", "group", "rowcol")

Steps = np.ndarray | tuple[np.ndarray, np.ndarray]


def _rms_scale(rms: np.ndarray) -> np.ndarray:
    """``rms`` normalized to an overall RMS of 1 (zero entries → 1, they hold only zeros)."""
    overall = float(np.sqrt(np.mean(rms**2))) or 1.0
    return np.where(rms > 0, rms / overall, 1.0)


_MANTISSA = 32  # 5-bit mantissa of the step codes: neighbouring steps differ by ≤ 3.1 %
_EXPONENT_LIMIT = 60


def _step_codes(x: np.ndarray) -> np.ndarray:
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
    codes = _step_codes(unit)
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
    return _rms_scale(rms)


def _column_scales(w: np.ndarray, row_unit: np.ndarray) -> np.ndarray:
    """(1, cols): RMS of each column of ``w`` after dividing rows by their RMS (one Sinkhorn step)."""
    rms = np.sqrt(np.mean(np.square(w / row_unit, dtype=np.float64), axis=0, keepdims=True))
    return _rms_scale(rms)


def _expand(steps: Steps, shape: tuple[int, int], granularity: str, group_size: int) -> np.ndarray:
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
    return q.astype(np.float32) * _expand(steps, q.shape, granularity, group_size)


def _entropy_bits(q: np.ndarray) -> float:
    """Empirical entropy in bits per symbol (what the fitted ANS table achieves, ±table cost)."""
    lo, hi = int(q.min()), int(q.max())
    if hi - lo < 1 << 22:
        counts = np.bincount((q - lo).ravel())
    else:
        counts = np.unique(q, return_counts=True)[1]
    counts = counts[counts > 0].astype(np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


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
        elif _entropy_bits(q.astype(np.int64)) <= bits:  # feasible at coarse steps: the finest within the bits
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
        raise InputError("cannot quantize a tensor with NaN or inf; use the lossless representation")
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
        full = _expand(steps, w32.shape, granularity, group_size)
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
                  _expand(unit, w32.shape, granularity, group_size)).ravel()
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
            got = _entropy_bits(q)
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
            if (result[2] <= rel_error) if rel_error is not None else (_entropy_bits(result[0]) <= bits):
                best = (m, result)
                break
        if best is None:
            raise UsageError("no step meets the target within int32 indices")
    q, steps, err, base = best[1]
    return Quantized(q, steps, err, base, row_codes, col_codes)


def _decoder_steps(row_codes: np.ndarray, col_codes: np.ndarray | None, base: float) -> Steps:
    """The float32 steps the decoder computes from the codes and ``step_base``."""
    row_steps = step_values(row_codes) * np.float32(base)
    return (row_steps, step_values(col_codes)) if col_codes is not None else row_steps


def _secant_base(evaluate, target: float, base: float, rounds: int = 6):
    """(base, payload) for the coarsest base found with error ≤ target, where
    ``evaluate(base)`` returns (error, payload) and errors grow ~ base²: a few
    multiplicative corrections from ``base``, then a walk down if none was feasible."""
    best = None
    for _ in range(rounds):
        err, payload = evaluate(base)
        if err <= target:
            if best is None or base > best[0]:
                best = (base, payload)
            if err >= target * 0.97:  # within 1.5 % of the step: not worth another round
                break
        if err <= 0:
            base *= 2
            continue
        base *= math.sqrt(target / err) * (0.999 if err > target else 1.0)
    while best is None:
        base *= 0.97
        err, payload = evaluate(base)
        if err <= target:
            best = (base, payload)
    return best


def _weight_error(w32: np.ndarray, q: np.ndarray, steps: Steps, granularity: str, group_size: int,
                  norm: float) -> float:
    """‖W − Ŵ‖/‖W‖ with the decoder's float32 reconstruction."""
    diff = w32 - dequantize(q, steps, granularity, group_size)
    return math.sqrt(float(np.sum(np.square(diff, dtype=np.float64)))) / norm


def quantize_calibrated(w: np.ndarray, reference: Quantized, calibration, granularity: str,
                        group_size: int = 64) -> tuple[Quantized, str]:
    """Requantize the 2-D view ``w`` with calibration statistics (:mod:`ncz.models.calibration`)
    at the *output* error of ``reference`` (plain rounding at the recipe's target).

    A Hessian (linear weight) keeps the reference's step shape and rounds with GPTQ;
    row counts (embedding table) give per-row steps ∝ 1/√(row importance) (granularity
    ``channel``). Returns (result, granularity); the result's ``rel_error`` is the weight
    error, which is *larger* than the reference's: the output error is what is bounded.
    """
    from .calibration import act_order, damped_inverse_factor, gptq_round, output_error, row_importance

    w32 = np.ascontiguousarray(w, dtype=np.float32)
    norm = math.sqrt(float(np.sum(np.square(w32, dtype=np.float64))))
    if norm == 0 or granularity == "group":
        return reference, granularity
    ref_delta = w32 - dequantize(reference.q, reference.steps, granularity, group_size)
    if calibration.hessian is not None:
        hessian = torch.from_numpy(np.asarray(calibration.hessian, dtype=np.float32))
        order = act_order(calibration.hessian)
        factor = damped_inverse_factor(calibration.hessian, order)
        target = output_error(ref_delta, hessian)

        def full_steps(base: float) -> np.ndarray:
            steps = _decoder_steps(reference.row_codes, reference.col_codes, base)
            return np.broadcast_to(_expand(steps, w32.shape, granularity, group_size), w32.shape)

        # GPTQ's own loss estimate (OBS: rounding column j adds e²ⱼ / U²ⱼⱼ) with uniform rounding
        # noise s²/12 gives the first base; a few exact corrections (error ∝ base²) follow.
        inverse_u2 = np.empty(w32.shape[1])
        inverse_u2[order] = 1.0 / np.square(np.diagonal(factor.numpy()))
        predicted = float(np.sum(np.square(full_steps(1.0), dtype=np.float64) * inverse_u2[None, :])) / 12
        base = math.sqrt(target / predicted) if predicted > 0 and target > 0 else reference.base
        best = None
        for _ in range(6):
            st = full_steps(base)
            q_try = gptq_round(w32, st, factor, order)
            err = output_error(w32 - q_try.astype(np.float32) * st, hessian)
            if err <= target:
                if best is None or base > best[0]:
                    best = (base, q_try)
                if err >= 0.97 * target:  # within 1.5 % of the step: not worth another round
                    break
            base *= math.sqrt(0.985 * target / err) if err > 0 else 2.0  # aim inside [0.97, 1] × target
        if best is None:
            return reference, granularity
        base, q = best
        steps = _decoder_steps(reference.row_codes, reference.col_codes, base)
        rel = _weight_error(w32, q, steps, granularity, group_size, norm)
        return Quantized(q, steps, rel, float(np.float32(base)), reference.row_codes, reference.col_codes), granularity

    importance = row_importance(calibration.row_counts)[:, None]  # (rows, 1)
    target = float(np.sum(importance * np.square(ref_delta, dtype=np.float64)))
    rows_rel = np.broadcast_to(step_values(reference.row_codes), (w32.shape[0], 1)).astype(np.float64)
    row_codes = _step_codes(_rms_scale(rows_rel / np.sqrt(importance)))
    col_codes = reference.col_codes
    new_granularity = "rowcol" if granularity == "rowcol" else "channel"

    def evaluate(base: float):
        steps = _decoder_steps(row_codes, col_codes, base)
        full = _expand(steps, w32.shape, new_granularity, group_size)
        q = np.rint(w32 / full)
        return float(np.sum(importance * np.square(w32 - q * full, dtype=np.float64))), (q, steps)

    base, (q, steps) = _secant_base(evaluate, target, reference.base * 2)
    if np.abs(q).max() >= 2**30:
        return reference, granularity
    rel = _weight_error(w32, q, steps, new_granularity, group_size, norm)
    return Quantized(q.astype(np.int32), steps, rel, float(np.float32(base)), row_codes, col_codes), new_granularity


_PAIR_MIN = 1 << 20  # weights: smaller tensors keep one symbol per index (the K² table would cost too much)
_PAIR_WIDTHS = (4, 8, 16, 32, 64)  # K: K² ≤ 4096 regular pair symbols, the most one ANS table holds
_PAIR_ESCAPES = 1e-4  # the largest share of escaped pairs accepted (an escape costs ~7 bytes)
_PAIR_LIMIT = 1 << 14  # |index| bound for an escaped pair to fit an int32 symbol


def _pair_width(q: np.ndarray) -> int | None:
    """The smallest K for which adjacent index pairs almost always fit a K × K alphabet, or None."""
    if q.size < _PAIR_MIN:
        return None
    lo, hi = int(q.min()), int(q.max())
    if max(-lo, hi) >= _PAIR_LIMIT:
        return None
    counts = np.bincount((q.ravel() - lo).astype(np.int64))
    cumulative = np.concatenate(([0], np.cumsum(counts)))
    for k in _PAIR_WIDTHS:
        first, last = max(-k // 2 - lo, 0), min(k - k // 2 - lo, counts.size)  # indices -K/2 .. K/2-1
        outside = 1 - (cumulative[max(last, first)] - cumulative[first]) / q.size
        if 2 * outside <= _PAIR_ESCAPES:
            return k
    return None


def _zigzag(x: np.ndarray) -> np.ndarray:
    return (x << 1) ^ (x >> 63)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    return (z >> 1) ^ -(z & 1)


def pair_symbols(q: np.ndarray, k: int) -> np.ndarray:
    """int32 symbols of adjacent index pairs (a, b): ``(a + K/2)·K + (b + K/2)`` when both lie in
    ``−K/2 … K/2−1``, else the escape ``K² + (zigzag(a) << 15 | zigzag(b))``; an odd count is padded with 0."""
    flat = q.ravel().astype(np.int64)
    if flat.size % 2:
        flat = np.concatenate((flat, [0]))
    a, b, h = flat[0::2], flat[1::2], k // 2
    regular = (a >= -h) & (a < k - h) & (b >= -h) & (b < k - h)
    symbols = (a + h) * k + (b + h)
    symbols[~regular] = k * k + ((_zigzag(a[~regular]) << 15) | _zigzag(b[~regular]))
    return symbols.astype(np.int32)


def unpair_symbols(symbols: np.ndarray, k: int, count: int, where: str) -> np.ndarray:
    """Mirror of :func:`pair_symbols` (``InputError`` naming ``where`` on symbols it cannot have written)."""
    if symbols.size != (count + 1) // 2:
        raise InputError(f"{where}: {symbols.size} pair symbols for {count} indices")
    s = symbols.astype(np.int32, copy=False)
    if s.size and int(s.min()) < 0:
        raise InputError(f"{where}: negative pair symbol")
    h = k // 2
    # one gather from the K² × 2 table of (a, b); escaped symbols (clipped here) are set below
    pairs = np.stack(np.divmod(np.arange(k * k, dtype=np.int32), np.int32(k)), axis=1) - np.int32(h)
    out = np.take(pairs, s, axis=0, mode="clip").reshape(-1)
    escaped = np.flatnonzero(s >= k * k)
    if escaped.size:
        v = s[escaped].astype(np.int64) - k * k
        a, b = _unzigzag(v >> 15), _unzigzag(v & ((1 << 15) - 1))
        if ((a >= -h) & (a < k - h) & (b >= -h) & (b < k - h)).any():
            raise InputError(f"{where}: an escaped pair had a regular symbol (not canonical)")
        out[2 * escaped], out[2 * escaped + 1] = a, b
    if count % 2 and out[-1] != 0:
        raise InputError(f"{where}: the padding index of an odd count must be 0")
    return out[:count]


def _restored_error(tensor: torch.Tensor, q: np.ndarray, steps: Steps, granularity: str, group_size: int) -> float:
    """Relative error after the decoder's cast back to the tensor's dtype."""
    restored = torch.from_numpy(dequantize(q, steps, granularity, group_size)).to(tensor.dtype).double().reshape(-1)
    original = tensor.detach().double().reshape(-1)
    return float((original - restored).norm() / original.norm()) if float(original.norm()) > 0 else 0.0


def encode_quantized(name: str, tensor: torch.Tensor, *, rel_error: float | None = None, bits: float | None = None,
                     granularity: str = "channel", group_size: int = 64, calibration=None,
                     calibrated_rel_error: float | None = None) -> Encoded:
    """Quantize ``tensor`` (see the module docstring); with ``calibration`` (a
    :class:`ncz.models.calibration.TensorCalibration`) and a ``rel_error`` target, the
    output error of plain rounding at ``rel_error`` — or at ``calibrated_rel_error``
    when given, the recipe's allocation for calibrated packing — is met with fewer
    bits (:func:`quantize_calibrated`)."""
    for key, value in (("rel_error", rel_error), ("bits", bits), ("calibrated_rel_error", calibrated_rel_error)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < math.inf):
            raise UsageError(f"{name}: {key} must be a number > 0, got {value!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise UsageError(f"{name}: group_size must be an integer >= 1, got {group_size!r}")
    if calibration is not None and calibrated_rel_error is not None and rel_error is not None:
        rel_error = calibrated_rel_error
    if not tensor.is_floating_point():
        raise UsageError(f"{name}: only floating-point tensors can be quantized")
    if granularity not in GRANULARITIES:
        raise UsageError(f"{name}: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    shape = list(tensor.shape)
    w = tensor.detach().float().cpu().numpy()
    rows = shape[0] if len(shape) >= 2 else 1
    w2 = w.reshape(rows, w.size // rows if rows else 0)
    if granularity == "group" and w2.shape[1] % group_size:
        granularity = "channel"  # the row length does not split into groups
    if granularity == "rowcol" and (len(shape) < 2 or w2.shape[1] < 2):
        granularity = "channel"  # a vector has no columns to scale
    target = rel_error
    for _ in range(8):
        result = quantize_codes(w2, rel_error=target, bits=bits, granularity=granularity, group_size=group_size)
        q, steps, err = result.q, result.steps, result.rel_error
        if tensor.dtype == torch.float32:
            break
        # the decoder casts back to the original dtype: report (and bound) that error
        err = _restored_error(tensor, q, steps, granularity, group_size)
        if rel_error is None or err <= rel_error or target < rel_error / 2:
            break
        target *= 0.97  # the cast's rounding pushed it over: aim a little lower
    if calibration is not None and rel_error is not None:
        result, granularity = quantize_calibrated(w2, result, calibration, granularity, group_size)
        q, steps = result.q, result.steps
        err = _restored_error(tensor, q, steps, granularity, group_size) if tensor.dtype != torch.float32 \
            else result.rel_error
    params = {"dtype": dtype_name(tensor.dtype), "shape": shape, "granularity": granularity,
              "step_base": result.base}
    if granularity == "group":
        params["group_size"] = group_size

    def codes_part(part: str, codes: np.ndarray) -> PendingSection:
        return PendingSection(part_name(name, part), symbol_payload(codes), Kind.PART,
                              {"dtype": "int32", "shape": list(codes.shape)})

    width = _pair_width(q)
    symbols = q.ravel() if width is None else pair_symbols(q, width)
    if width is not None:
        params["pair"] = width
    head = PendingSection(name, encode_payload(b"", Codec.RAW), Kind.QUANTIZED, params)
    sections = [
        head,
        PendingSection(part_name(name, "q"), symbol_payload(symbols), Kind.PART,
                       {"dtype": "int32", "shape": [symbols.size]}),
        codes_part("step", result.row_codes),
    ]
    if result.col_codes is not None:
        sections.append(codes_part("colscale", result.col_codes))
    return Encoded(name, f"quantized/{granularity}", sections, tensor.numel(), err)


def _read_codes(reader: Reader, head: SectionInfo, part: str) -> np.ndarray:
    codes = read_part(reader, head, part, dtype="int32")
    lo, hi = -_EXPONENT_LIMIT * _MANTISSA, _EXPONENT_LIMIT * _MANTISSA + _MANTISSA - 1
    if codes.size and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise InputError(f"{reader.name}: {head.name!r}: step codes of {part_name(head.name, part)!r} "
                         f"must lie in {lo}..{hi}")
    return step_values(codes)


def decode_quantized(head: SectionInfo, reader: Reader) -> torch.Tensor:
    shape = head.params["shape"]
    granularity = head.params.get("granularity")
    if granularity not in GRANULARITIES:
        raise InputError(f"{reader.name}: {head.name!r}: params.granularity must be one of {GRANULARITIES}")
    count = math.prod(shape)  # exact (the container capped the dense size)
    rows = shape[0] if len(shape) >= 2 else 1
    cols = count // rows if rows else 0
    q_info = reader.info(part_name(head.name, "q")) if part_name(head.name, "q") in reader else None
    if q_info is not None and q_info.kind == Kind.PART and q_info.params.get("dtype") == "int32" \
            and q_info.codec in (Codec.ANS, Codec.RANGE):
        q = read_symbols(reader, q_info.name)  # straight from the coder, no copy through bytes
    else:
        q = read_part(reader, head, "q", dtype="int32")
    step_info = reader.info(part_name(head.name, "step")) if part_name(head.name, "step") in reader else None
    if step_info is not None and step_info.params.get("dtype") == "float32":  # steps stored as floats
        steps = read_part(reader, head, "step", dtype="float32").astype(np.float32)
        if steps.size and not (np.isfinite(steps).all() and (steps > 0).all()):
            raise InputError(f"{reader.name}: {head.name!r}: quantization steps must be finite and > 0")
    else:  # step codes × step_base
        base = head.params.get("step_base")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not math.isfinite(base) or base <= 0:
            raise InputError(f"{reader.name}: {head.name!r}: params.step_base must be a positive finite number")
        steps = _read_codes(reader, head, "step") * np.float32(base)
    width = head.params.get("pair")
    if width is not None:
        if isinstance(width, bool) or not isinstance(width, int) or width not in _PAIR_WIDTHS:
            raise InputError(f"{reader.name}: {head.name!r}: params.pair must be one of {list(_PAIR_WIDTHS)}")
        q = unpair_symbols(q, width, count, f"{reader.name}: {head.name!r}")
    if q.size != count:
        raise InputError(f"{reader.name}: {head.name!r} has {q.size} indices for {count} weights")
    group_size = head.params.get("group_size", 1) if granularity == "group" else 1
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise InputError(f"{reader.name}: {head.name!r}: params.group_size must be an int, got {group_size!r}")
    if granularity == "group" and (group_size <= 0 or cols % group_size):
        raise InputError(f"{reader.name}: {head.name!r}: group_size {group_size} does not divide {cols}")
    expected = {"tensor": (1, 1), "channel": (rows, 1), "rowcol": (rows, 1),
                "group": (rows, cols // group_size if group_size else 0)}[granularity]
    if tuple(steps.shape) != expected:
        raise InputError(f"{reader.name}: {head.name!r}: steps have shape {list(steps.shape)}, expected {list(expected)}")
    if granularity == "rowcol":
        col_scales = _read_codes(reader, head, "colscale")
        if tuple(col_scales.shape) != (1, cols):
            raise InputError(f"{reader.name}: {head.name!r}: column scales have shape {list(col_scales.shape)}, "
                             f"expected {[1, cols]}")
        steps = (steps, col_scales)
    w = dequantize(q.reshape(rows, cols), steps, granularity, group_size).reshape(shape)
    return torch.from_numpy(np.ascontiguousarray(w)).reshape(shape).to(torch_dtype(head.params["dtype"]))


register_decoder(Kind.QUANTIZED, decode_quantized)
