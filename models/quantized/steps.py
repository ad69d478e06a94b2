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

__all__ = ["GRANULARITIES", "Steps", "Quantized", "dequantize", "step_codes",
           "step_values", "snap", "decoder_steps", "expand_steps", "rms_scale", "weight_error", "STEP_CODE_RANGE"]

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


def snap(unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, float32 values) of relative steps rounded to the code grid."""
    codes = step_codes(unit)
    return codes, step_values(codes)


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


@dataclass(frozen=True)
class Quantized:
    """A quantized 2-D view: indices, float32 steps as the decoder computes them, and their codes."""

    q: np.ndarray  # int32, the view's shape
    steps: Steps  # float32: (1,1) / (rows,1) / (rows,groups), or (row steps, column scales) for rowcol
    rel_error: float
    base: float  # the float32 multiplier: row steps = base · step_values(row_codes)
    row_codes: np.ndarray  # int32 codes of the relative row / group / tensor steps
    col_codes: np.ndarray | None  # int32 codes of the column scales (rowcol)


def decoder_steps(row_codes: np.ndarray, col_codes: np.ndarray | None, base: float) -> Steps:
    """The float32 steps the decoder computes from the codes and ``step_base``."""
    row_steps = step_values(row_codes) * np.float32(base)
    return (row_steps, step_values(col_codes)) if col_codes is not None else row_steps


def weight_error(w32: np.ndarray, q: np.ndarray, steps: Steps, granularity: str, group_size: int,
                  norm: float) -> float:
    """‖W − Ŵ‖/‖W‖ with the decoder's float32 reconstruction."""
    diff = w32 - dequantize(q, steps, granularity, group_size)
    return math.sqrt(float(np.sum(np.square(diff, dtype=np.float64)))) / norm

