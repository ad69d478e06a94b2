"""Quantization with calibration statistics: GPTQ for linear weights, weighted rows for embeddings.

The statistics come from :func:`ncz.models.calibrate` (:mod:`ncz.models.calibration`
says what they measure and why); per tensor they arrive here as a
:class:`TensorCalibration`. :func:`quantize_calibrated` keeps the step grid and the
on-disk layout of data-free quantization (a calibrated archive decodes with the
same decoder) and spends the freedom on the rounding:

- linear weights are rounded column by column with the error of each column
  pushed onto the columns not yet rounded through H's inverse Cholesky factor
  (OBS / GPTQ: Frantar et al., "GPTQ", ICLR 2023; Hassibi & Stork 1993). The
  step is the coarsest whose output error tr(ΔW·H·ΔWᵀ) does not exceed that of
  plain rounding at the recipe's ``rel_error``: the recipe's allocation keeps its
  meaning (the same output distortion) and the bits go down;
- embedding rows get steps ∝ 1/√(fᵣ/f̄ + α) (α = 1: a row never seen keeps the
  precision of an average one at half the weight), again as coarse as the
  frequency-weighted error of plain rounding allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ncz.format import InputError, UsageError

from .rdoq import RDOQ_MAX_BITS, CodeLengths, rdoq_round
from .steps import (
    Quantized,
    Steps,
    decoder_steps,
    dequantize,
    expand_steps,
    rms_scale,
    step_codes,
    step_values,
    weight_error,
)

__all__ = ["TensorCalibration", "quantize_calibrated", "row_importance", "output_error", "act_order",
           "damped_inverse_factor", "gptq_round", "ROW_FLOOR", "DAMPING"]

ROW_FLOOR = 1.0  # α: the importance floor of a row, in units of the mean row frequency
# GPTQ damping: λ = 10 % of H's mean diagonal. On MiniLM calibrated with CLINC150 (preset small)
# 1 % gave 2.44 bits/weight at cosine 0.978 on CLINC150 and 0.950 on PTB sentences, 10 % gave
# 2.48 at 0.980 and 0.960: weight error hidden in directions the calibration data never excites
# comes back on other data, and damping limits how much is hidden there.
DAMPING = 0.1


@dataclass(frozen=True)
class TensorCalibration:
    """The importance of one tensor's errors: ``hessian`` (in × in) for a linear weight,
    ``row_counts`` (rows,) for an embedding table; exactly one is set."""

    hessian: np.ndarray | None = None
    row_counts: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.hessian is None) == (self.row_counts is None):
            raise UsageError("TensorCalibration takes exactly one of hessian and row_counts")



def row_importance(row_counts: np.ndarray) -> np.ndarray:
    """fᵣ/f̄ + α: the weight of row r's squared error (never 0, so every row stays bounded)."""
    mean = float(row_counts.mean()) if row_counts.size else 0.0
    rel = row_counts / mean if mean > 0 else np.zeros_like(row_counts)
    return rel + ROW_FLOOR


def output_error(delta: np.ndarray, hessian: np.ndarray | torch.Tensor) -> float:
    """tr(ΔW·H·ΔWᵀ): the expected squared output error of a linear layer (float32
    products, float64 sum: it only steers the encoder's search)."""
    d = torch.from_numpy(np.ascontiguousarray(delta, dtype=np.float32))
    h = hessian if isinstance(hessian, torch.Tensor) else torch.from_numpy(np.asarray(hessian, dtype=np.float32))
    return float(((d @ h.float()) * d).sum(dtype=torch.float64))


def act_order(hessian: np.ndarray) -> np.ndarray:
    """Columns by decreasing input energy (diag H), ties by index: GPTQ's act-order."""
    return np.lexsort((np.arange(hessian.shape[0]), -np.diagonal(hessian)))


def damped_inverse_factor(hessian: np.ndarray, order: np.ndarray | None = None) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ (float64) with rows/columns in ``order``;
    inputs the data never excited are made neutral."""
    if order is not None:
        hessian = hessian[np.ix_(order, order)]
    h = torch.from_numpy(np.array(hessian, dtype=np.float64, copy=True))
    dead = torch.diagonal(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    mean_diag = float(torch.diagonal(h).mean())
    h += DAMPING * (mean_diag if mean_diag > 0 else 1.0) * torch.eye(h.shape[0], dtype=torch.float64)
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(inverse, upper=True)
    except RuntimeError as exc:  # not positive definite even after damping: a corrupt calibration file
        raise InputError(f"calibration hessian is not positive semi-definite ({exc})") from exc


def gptq_round(w: np.ndarray, steps: np.ndarray, factor: torch.Tensor, order: np.ndarray | None = None,
               block: int = 128) -> np.ndarray:
    """int32 indices q with Ŵ = q·steps, rounding column by column and pushing each
    column's error onto the later columns through ``factor`` (GPTQ's lazy block updates).

    ``steps`` is the float32 step of every weight (the decoder's). ``order`` is the
    column order (GPTQ's "act-order": most excited inputs first, so their errors are
    spread over the most columns); ``factor`` must be that of H permuted the same way.
    Rows are independent, so any subset of rows gives the same result for those rows."""
    perm = np.arange(w.shape[1]) if order is None else order
    W = torch.from_numpy(np.ascontiguousarray(w[:, perm], dtype=np.float32))
    S = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(steps, w.shape)[:, perm], dtype=np.float32))
    U = factor.float()
    Q = torch.empty_like(W)
    n = W.shape[1]
    for start in range(0, n, block):
        end = min(start + block, n)
        W1 = W[:, start:end].clone()
        E1 = torch.empty_like(W1)
        S1 = S[:, start:end]
        U1 = U[start:end, start:end]
        for i in range(end - start):
            q = torch.round(W1[:, i] / S1[:, i])
            Q[:, start + i] = q
            err = (W1[:, i] - q * S1[:, i]) / U1[i, i]
            W1[:, i + 1:] -= torch.outer(err, U1[i, i + 1:])
            E1[:, i] = err
        if end < n:
            W[:, end:] -= E1 @ U[start:end, end:]
    if not torch.isfinite(Q).all() or float(Q.abs().max()) >= 2**30:
        raise UsageError("step too fine for int32 indices")
    out = np.empty(w.shape, np.int32)
    out[:, perm] = Q.numpy().astype(np.int32)
    return out


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



def _rate_optimized_rows(w32: np.ndarray, importance: np.ndarray, target: float, base: float, q: np.ndarray,
                         row_codes: np.ndarray, col_codes: np.ndarray | None, granularity: str,
                         group_size: int) -> tuple[float, np.ndarray, Steps]:
    """RDOQ indices of weighted rows at the same weighted error ``target``, with a finer ``base``,
    when their empirical entropy is below nearest rounding's ``q``'s (else the nearest result back)."""
    nearest_bits = _entropy(q)
    if nearest_bits >= RDOQ_MAX_BITS:
        return base, q, decoder_steps(row_codes, col_codes, base)
    best = (base, q, decoder_steps(row_codes, col_codes, base), nearest_bits)
    current = q
    for _ in range(2):  # table fitted to the last indices ↔ indices chosen under that table
        lengths = CodeLengths(*np.unique(current.astype(np.int64), return_counts=True))

        def evaluate(b: float, lengths: CodeLengths = lengths):
            steps = decoder_steps(row_codes, col_codes, b)
            full = expand_steps(steps, w32.shape, granularity, group_size)
            q_try = rdoq_round(w32 / full, lengths)
            return float(np.sum(importance * np.square(w32 - q_try * full, dtype=np.float64))), (q_try, steps)

        b, (current, steps) = _secant_base(evaluate, target, best[0])
        bits = _entropy(current)
        if bits < best[3]:
            best = (b, current, steps, bits)
    return best[0], best[1], best[2]


def _entropy(q: np.ndarray) -> float:
    counts = np.unique(q, return_counts=True)[1].astype(np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def quantize_calibrated(w: np.ndarray, reference: Quantized, calibration: TensorCalibration, granularity: str,
                        group_size: int = 64, rdoq: bool = False) -> tuple[Quantized, str]:
    """Requantize the 2-D view ``w`` with calibration statistics
    at the *output* error of ``reference`` (plain rounding at the recipe's target).

    A Hessian (linear weight) keeps the reference's step shape and rounds with GPTQ;
    row counts (embedding table) give per-row steps ∝ 1/√(row importance) (granularity
    ``channel``). Returns (result, granularity); the result's ``rel_error`` is the weight
    error, which is *larger* than the reference's: the output error is what is bounded.
    ``rdoq``: embedding rows are rounded for error + λ·bits (:mod:`.rdoq`) at the same weighted
    error when that lowers the rate (GPTQ keeps nearest rounding: its linear layers code at more
    than :data:`~.rdoq.RDOQ_MAX_BITS` bits per index, where RDOQ measured < 0.2 %).
    """
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
            steps = decoder_steps(reference.row_codes, reference.col_codes, base)
            return np.broadcast_to(expand_steps(steps, w32.shape, granularity, group_size), w32.shape)

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
        steps = decoder_steps(reference.row_codes, reference.col_codes, base)
        rel = weight_error(w32, q, steps, granularity, group_size, norm)
        return Quantized(q, steps, rel, float(np.float32(base)), reference.row_codes, reference.col_codes), granularity

    importance = row_importance(calibration.row_counts)[:, None]  # (rows, 1)
    target = float(np.sum(importance * np.square(ref_delta, dtype=np.float64)))
    rows_rel = np.broadcast_to(step_values(reference.row_codes), (w32.shape[0], 1)).astype(np.float64)
    row_codes = step_codes(rms_scale(rows_rel / np.sqrt(importance)))
    col_codes = reference.col_codes
    new_granularity = "rowcol" if granularity == "rowcol" else "channel"

    def evaluate(base: float):
        steps = decoder_steps(row_codes, col_codes, base)
        full = expand_steps(steps, w32.shape, new_granularity, group_size)
        q = np.rint(w32 / full)
        return float(np.sum(importance * np.square(w32 - q * full, dtype=np.float64))), (q, steps)

    base, (q, steps) = _secant_base(evaluate, target, reference.base * 2)
    if rdoq:
        base, q, steps = _rate_optimized_rows(w32, importance, target, base, q, row_codes, col_codes,
                                              new_granularity, group_size)
    if np.abs(q).max() >= 2**30:
        return reference, granularity
    rel = weight_error(w32, q, steps, new_granularity, group_size, norm)
    return Quantized(q.astype(np.int32), steps, rel, float(np.float32(base)), row_codes, col_codes), new_granularity
