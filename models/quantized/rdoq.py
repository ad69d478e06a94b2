"""Rate-distortion-optimized quantization (RDOQ): each index chosen for D + λ·R, not for D alone.

Nearest rounding minimises the error at a given step; the entropy coder then pays
−log2 p(q) bits for each index. Choosing, for each weight, between the two indices
around w/step (floor and ceil) the one minimising

    (w/step − q)² + λ · L(q),   L(q) = −log2 p(q) under the tensor's fitted table,

moves weights near a decision threshold onto the cheaper (more probable, smaller)
index (Sullivan, "Efficient scalar quantization of exponential and Laplacian random
variables", IEEE Trans. IT 1996; Wiedemann et al., "DeepCABAC", IEEE JSTSP 2020).
The decoder is unchanged (Ŵ = q · step): only the encoder's choice differs, so the
layout on disk is the ordinary ``QUANTIZED`` one.

λ is tied to the step: D is measured in units of step², and λ = ln 2 / 6 is the slope
−dD/dR of uniform quantization itself (D = step²/12, one more bit halves the step:
dD/dR = −2 ln 2 · step²/12). A bit is worth what it buys when spent on a finer step,
so trading indices at that price and then refining the step until the recipe's error
is met again lowers the rate at equal error. Tables and indices are fitted to each
other a few rounds (the table of the last choice steers the next).

What it buys is measured, not assumed (bench/models.py, section ``rdoq``): at the
rates of the linear layers here (3.5–7 bits per index) less than 0.2 %, at 1.5–3 bits
(large-error embedding tables) 1–6 %. So the encoder tries it only when nearest
rounding's indices carry less than :data:`RDOQ_MAX_BITS`, and keeps it only when the
indices' empirical entropy goes down (:func:`rdoq_search`).

Everything is elementwise float64 numpy on float32 inputs, chunk by chunk like
:func:`.search.rounded`: deterministic and bounded in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ncz.format.entropy_tables import fit_table_counts

from .passes import BlockedSum, Histogram
from .search import Choice, Prepared, block_steps

__all__ = ["RDOQ_LAMBDA", "RDOQ_MAX_BITS", "CodeLengths", "rdoq_round", "rdoq_rounded", "rdoq_search",
           "RdoqChoice"]

RDOQ_LAMBDA = math.log(2) / 6  # −dD/dR of uniform quantization, in units of step² per bit
RDOQ_MAX_BITS = 3.0  # nearest rounding's bits per index below which RDOQ is tried (above: next to nothing)
_ESCAPE_BITS = 48  # an escaped index also costs its three 16-bit chunks (FORMAT.md §7.4)


class CodeLengths:
    """Bits of each index value under the table the encoder fits to a histogram (FORMAT.md §7.5):
    −log2(f / 2²⁴) inside the table's window, the escape symbol's bits + 48 outside it."""

    def __init__(self, values: np.ndarray, counts: np.ndarray) -> None:
        table = fit_table_counts(values, counts)
        bits = table.bits
        self.lo = table.lo
        self.escape = float(bits[-1]) + _ESCAPE_BITS
        self.bits = np.append(bits[:-1], self.escape)  # the last slot: anything outside [lo, hi]

    def of(self, q: np.ndarray) -> np.ndarray:
        """float64 bits of each (float) index of ``q``."""
        index = q - self.lo
        np.clip(index, 0, self.bits.size - 1, out=index)
        lengths = self.bits[index.astype(np.int64)]
        outside = (q < self.lo) | (q >= self.lo + self.bits.size - 1)
        lengths[outside] = self.escape
        return lengths


def rdoq_round(x: np.ndarray, lengths: CodeLengths, lam: float = RDOQ_LAMBDA) -> np.ndarray:
    """Indices (float, as ``np.rint`` gives) of the ratios ``x`` = w / step: for each, the nearest
    index unless the other neighbour (floor or ceil) has a strictly lower (x − q)² + λ·L(q)."""
    x64 = x.astype(np.float64)
    nearest = np.rint(x64)
    other = np.where(nearest > x64, nearest - 1, nearest + 1)  # the other of floor / ceil
    cost_nearest = np.square(x64 - nearest) + lam * lengths.of(nearest)
    cost_other = np.square(x64 - other) + lam * lengths.of(other)
    return np.where(cost_other < cost_nearest, other, nearest).astype(x.dtype)


def rdoq_rounded(prep: Prepared, steps, lengths: CodeLengths,
                 even: bool = False) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """:func:`.search.rounded` with RDOQ indices: (start, stop, float32 indices, float32 steps) per chunk."""
    src = prep.source
    for start, stop in src.spans(even=even):
        full = block_steps(steps, start, stop, src.cols, prep.granularity, prep.group_size)
        yield start, stop, rdoq_round(src.block(start, stop) / full, lengths), full


def _pass(prep: Prepared, steps, lengths: CodeLengths) -> tuple[float, Histogram]:
    """Relative error (the decoder's float32 arithmetic, numpy's summation order) and histogram of
    the RDOQ indices of ``steps``."""
    squares, counts = BlockedSum(), Histogram()
    for start, stop, q, full in rdoq_rounded(prep, steps, lengths):
        counts.add(q.astype(np.int32))
        diff = np.subtract(prep.source.block(start, stop), q * full)
        squares.add(np.square(diff, out=diff))
    return math.sqrt(squares.result()) / prep.norm, counts


@dataclass(frozen=True)
class RdoqChoice:
    choice: Choice  # steps, error (as ``error_of`` measures it), step_base
    lengths: CodeLengths  # the table the indices were chosen under: rdoq_rounded(prep, steps, lengths) remakes them
    histogram: Histogram  # of those indices


def rdoq_search(prep: Prepared, nearest: Choice, nearest_counts: Histogram, rel_error: float,
                error_of: Callable[[object, CodeLengths], float] | None = None,
                rounds: int = 6) -> RdoqChoice | None:
    """The coarsest step multiplier whose RDOQ indices stay within ``rel_error``, starting from
    nearest rounding's choice; None when it does not lower the indices' empirical entropy.

    Each round chooses indices under the table fitted to the previous round's indices (the
    table ↔ index iteration) and corrects the multiplier (the error is ∝ the step at a fixed λ
    in step units). ``error_of(steps, lengths)`` measures the error the caller bounds (e.g.
    after a cast back to bf16); by default the float32 error of the pass itself."""
    lengths = CodeLengths(*nearest_counts.items())
    log_m = math.log(nearest.base)
    best: RdoqChoice | None = None
    for _ in range(rounds):
        base = np.float32(math.exp(log_m))
        steps = prep.steps(base)
        err, counts = _pass(prep, steps, lengths)
        if error_of is not None:
            err = error_of(steps, lengths)
        if err <= rel_error and (best is None or float(base) > best.choice.base):
            best = RdoqChoice(Choice(steps, err, float(base)), lengths, counts)
        if rel_error * (1 - 2e-3) <= err <= rel_error or err == 0:
            break
        lengths = CodeLengths(*counts.items())  # the next round's indices see this round's table
        log_m += math.log(rel_error / err) - (1e-4 if err > rel_error else 0.0)
    if best is None or best.histogram.entropy() >= nearest_counts.entropy():
        return None
    return best
