"""Whole-tensor passes in chunks of rows: bounded memory, numpy's own rounding.

The step search looks at a tensor several times (its norm, row and column RMS, the
error of each candidate step). On the whole array at once each look makes full-size
float32 and float64 temporaries: several times the tensor, too much for an LLM's
embedding. Here a tensor is read in chunks of rows (converted to float32 chunk by
chunk, so a bf16 checkpoint is never held in float32 whole), and every float64 sum is
accumulated in exactly the order numpy uses on the whole array, so the results, and
the archives built from them, are bit-identical to the whole-array arithmetic:

- ``np.sum(x, dtype=np.float64)`` of a float32 array: pairwise sums of consecutive
  blocks of 8192 values (numpy's buffer), the blocks added in order (:class:`BlockedSum`);
- ``np.sum`` of a float64 array: numpy's pairwise tree over the whole length
  (:func:`pairwise_sum`), whose leaves are summed chunk by chunk;
- a sum over axis 0: rows added in order (:class:`ColumnSum`).

``tests/test_scale.py`` checks each against numpy, and the archives against ones the whole-array code wrote.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

__all__ = ["RowSource", "BlockedSum", "ColumnSum", "Histogram", "pairwise_sum", "CHUNK_ELEMENTS"]

CHUNK_ELEMENTS = 1 << 18  # values per chunk: 1 MiB of float32, small enough to stay in cache
_NUMPY_BUFFER = 8192  # numpy's reduction buffer (NPY_BUFSIZE): the blocks of a casting sum
_PAIRWISE_LEAF = 1 << 17  # chunk length at which the pairwise tree hands over to np.sum


class RowSource:
    """A float tensor (torch or numpy, any float dtype) seen as its 2-D (rows, cols) view,
    handed out as float32 chunks of rows; nothing of tensor size is allocated.

    Conversions are numpy's (torch's own bf16 → float32 kernel took 20 ns a value here):
    bf16 is the upper half of a float32, so widening it is a shift."""

    def __init__(self, tensor: torch.Tensor | np.ndarray, rows: int, cols: int):
        if isinstance(tensor, np.ndarray):
            tensor = torch.from_numpy(np.ascontiguousarray(tensor))
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        self.dtype = flat.dtype
        self._values = flat.view(torch.int16).numpy().view(np.uint16) if flat.dtype == torch.bfloat16 \
            else flat.numpy()
        self.rows, self.cols = rows, cols
        self.size = rows * cols
        self.exact_float32 = flat.dtype in (torch.float32, torch.float16, torch.bfloat16)  # widened exactly

    def _float32(self, values: np.ndarray) -> np.ndarray:
        if self.dtype == torch.bfloat16:
            return (values.astype(np.uint32) << np.uint32(16)).view(np.float32)
        return values if values.dtype == np.float32 else values.astype(np.float32)

    def block(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as float32 (a view when the tensor is float32)."""
        return self._float32(self._values[start * self.cols:stop * self.cols]).reshape(stop - start, self.cols)

    def flat(self, start: int, stop: int) -> np.ndarray:
        return self._float32(self._values[start:stop])

    def gather(self, index: np.ndarray) -> np.ndarray:
        """float32 values at flat positions ``index``."""
        return self._float32(self._values[index])

    def original(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``, flat, exactly, as float64."""
        values = self._values[start * self.cols:stop * self.cols]
        return (self._float32(values) if self.dtype == torch.bfloat16 else values).astype(np.float64)

    def cast_back(self, values: np.ndarray) -> np.ndarray:
        """float32 ``values`` (overwritten) rounded to the tensor's dtype as torch casts (nearest, ties to
        even): float32 results for float16 / bf16, float64 for float64."""
        if self.dtype == torch.bfloat16:
            bits = values.view(np.uint32)
            odd = np.right_shift(bits, np.uint32(16))
            np.bitwise_and(odd, np.uint32(1), out=odd)
            np.add(bits, odd, out=bits)
            np.add(bits, np.uint32(0x7FFF), out=bits)
            np.bitwise_and(bits, np.uint32(0xFFFF0000), out=bits)
            return values
        if self.dtype == torch.float16:
            with np.errstate(over="ignore"):  # rounding past 65504 is inf, as torch casts
                return values.astype(np.float16).astype(np.float32)
        return values.astype(np.float64)

    def spans(self, elements: int | None = None, even: bool = False) -> Iterator[tuple[int, int]]:
        """(start, stop) row ranges of at most about ``elements`` values; when the shape allows, each
        but the last holds a multiple of 8192 values (whole numpy sum buffers: nothing carried over).
        With ``even`` each but the last holds an even number of values (index pairs never straddle two chunks)."""
        elements = elements or CHUNK_ELEMENTS
        cols = max(self.cols, 1)
        aligned = _NUMPY_BUFFER // math.gcd(cols, _NUMPY_BUFFER)  # rows per whole number of buffers
        step = max(1, elements // cols)
        if aligned <= step:
            step -= step % aligned
        if even and cols % 2 and step % 2:
            step += 1
        for start in range(0, self.rows, step):
            yield start, min(start + step, self.rows)

class BlockedSum:
    """``np.sum(x, dtype=np.float64)`` of a float32 array ``x`` fed in pieces of any length:
    pairwise sums of 8192-value blocks, added in order, as numpy does on the whole array."""

    def __init__(self) -> None:
        self.total = 0.0
        self._carry = np.zeros(0, np.float32)

    def add(self, values: np.ndarray) -> None:
        values = values.reshape(-1)
        if self._carry.size:
            values = np.concatenate((self._carry, values))
        whole = values.size - values.size % _NUMPY_BUFFER
        if whole:  # one buffer per row: the same pairwise sums as the whole array's reduction
            blocks = np.sum(values[:whole].reshape(-1, _NUMPY_BUFFER), axis=1, dtype=np.float64)
            self.total = float(np.cumsum(np.concatenate(([self.total], blocks)))[-1])  # in order
        self._carry = values[whole:].copy()

    def result(self) -> float:
        if self._carry.size:
            return self.total + float(np.sum(self._carry.astype(np.float64)))
        return self.total


class ColumnSum:
    """``np.sum(x, axis=0, keepdims=True)`` of a float64 array of two or more columns fed in chunks of
    rows (rows in order): each chunk is written by the caller below the running total (:meth:`rows`),
    then reduced with it. (One column is a contiguous sum, which numpy does pairwise: :func:`pairwise_sum`.)"""

    def __init__(self, cols: int, chunk_rows: int) -> None:
        self._buffer = np.zeros((chunk_rows + 1, cols))

    @property
    def total(self) -> np.ndarray:
        return self._buffer[:1]

    def rows(self, count: int) -> np.ndarray:
        """Where the caller writes the next ``count`` rows (float64)."""
        if count + 1 > self._buffer.shape[0]:
            grown = np.zeros((count + 1, self._buffer.shape[1]))
            grown[0] = self._buffer[0]
            self._buffer = grown
        return self._buffer[1:count + 1]

    def add(self, count: int) -> None:
        """Fold the ``count`` rows written at :meth:`rows` into the total, in order."""
        self._buffer[0] = np.add.reduce(self._buffer[:count + 1], axis=0)


def pairwise_sum(leaf: Callable[[int, int], float], size: int) -> float:
    """``np.sum`` of a float64 array of ``size`` values whose pieces ``leaf(start, stop)`` sums:
    numpy's pairwise tree (halves rounded down to a multiple of 8), descended until a
    piece is short enough to be summed (and computed) on its own."""
    if size == 0:
        return 0.0

    def node(start: int, count: int) -> float:
        if count <= _PAIRWISE_LEAF:
            return float(leaf(start, start + count))
        half = count // 2
        half -= half % 8
        return node(start, half) + node(start + half, count - half)

    return node(0, size)


class Histogram:
    """Counts of integer values fed in chunks.

    Values inside ``window`` (lo, hi), or, without one, inside a dense range grown from
    the data while it stays below 2²⁴ values, are counted in an array; the rest (rare
    outliers, e.g. escaped index pairs) as sorted (value, count) pairs."""

    _DENSE = 1 << 24

    def __init__(self, window: tuple[int, int] | None = None) -> None:
        self._fixed = window is not None
        self.lo = window[0] if window is not None else 0
        self.counts = np.zeros(window[1] - window[0] + 1 if window is not None else 0, np.int64)
        self._sparse = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        self.total = 0
        self.low, self.high = 0, -1  # the smallest and largest value seen (high < low: none yet)

    def add(self, values: np.ndarray) -> None:
        values = values.reshape(-1)
        if not values.size:
            return
        lo, hi = int(values.min()), int(values.max())
        self.low, self.high = (lo, hi) if not self.total else (min(lo, self.low), max(hi, self.high))
        self.total += values.size
        if self.lo <= lo and hi < self.lo + self.counts.size:  # the usual case: one bincount
            self.counts += np.bincount(values - self.lo if self.lo else values, minlength=self.counts.size)
            return
        if not self._fixed:
            new_lo = min(lo, self.lo) if self.counts.size else lo
            new_hi = max(hi, self.lo + self.counts.size - 1) if self.counts.size else hi
            if new_hi - new_lo < self._DENSE:
                if new_lo != self.lo or new_hi - new_lo + 1 != self.counts.size:
                    grown = np.zeros(new_hi - new_lo + 1, np.int64)
                    grown[self.lo - new_lo:self.lo - new_lo + self.counts.size] = self.counts
                    self.lo, self.counts = new_lo, grown
            else:
                self._fixed = True  # the range is fixed from here on; what falls outside is sparse
        shifted = values.astype(np.int64) - self.lo
        inside = (shifted >= 0) & (shifted < self.counts.size)
        if inside.all():
            self.counts += np.bincount(shifted, minlength=self.counts.size)
            return
        self.counts += np.bincount(shifted[inside], minlength=self.counts.size)
        v, c = np.unique(values[~inside].astype(np.int64), return_counts=True)
        keys, inverse = np.unique(np.concatenate((self._sparse[0], v)), return_inverse=True)
        sums = np.zeros(keys.size, np.int64)
        np.add.at(sums, inverse, np.concatenate((self._sparse[1], c)))
        self._sparse = (keys, sums)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(distinct values ascending, their counts > 0)."""
        nonzero = np.flatnonzero(self.counts)
        values = np.concatenate((nonzero + self.lo, self._sparse[0]))
        counts = np.concatenate((self.counts[nonzero], self._sparse[1]))
        order = np.argsort(values, kind="stable")
        return values[order], counts[order]

    def entropy(self) -> float:
        """Empirical entropy in bits per value (as ``entropy_bits`` of all values at once)."""
        counts = self.items()[1].astype(np.float64)
        p = counts / counts.sum()
        return float(-(p * np.log2(p)).sum())
