"""The one place that talks to constriction (https://bamler-lab.github.io/constriction/).

Thin and typed: int32 symbols and integer tables in, uint32 words out, and back.
Rules kept here so nobody else has to remember them:

- every categorical model is built with ``perfect=False`` explicitly (its fast
  quantization reproduces our exact 2^-24 tables; "perfect" would be slower and
  is a different bitstream);
- words are little-endian uint32 on disk (``to_bytes``/``from_bytes``);
- constriction's ValueError/TypeError/RuntimeError become :class:`StreamError`;
- an ANS stack decodes zeros from an empty stack without complaint, so callers
  check ``num_valid_bits`` before borrowing bits (see :class:`AnsStack`);
- symbols are decoded in chunks of at most ``CHUNK`` into a numpy array: a failed
  allocation inside constriction (Rust) aborts the process, one in numpy raises.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Sequence

import constriction
import numpy as np

from .entropy_tables import FrequencyTable
from .errors import StreamError

__all__ = ["Coder", "encode_groups", "encode_chunks", "GroupDecoder", "AnsStack", "to_bytes", "from_bytes"]

_stack = constriction.stream.stack
_queue = constriction.stream.queue
_model = constriction.stream.model


class Coder(enum.Enum):
    """Which stream coder: a queue (range coding, FIFO) or a stack (ANS, LIFO)."""

    RANGE = "range"
    ANS = "ans"


@functools.lru_cache(maxsize=4096)
def _categorical(table: FrequencyTable):
    # tables are immutable and hashed by identity; the grid caches them too
    return _model.Categorical(table.probabilities, perfect=False)


def to_bytes(words: np.ndarray) -> bytes:
    return np.ascontiguousarray(words, dtype="<u4").tobytes()


def from_bytes(data: bytes | memoryview, where: str) -> np.ndarray:
    if len(data) % 4:
        raise StreamError(f"{where}: coder stream of {len(data)} bytes is not whole 32-bit words")
    # the coders copy the words they are given, so a read-only view suffices
    return np.frombuffer(data, dtype="<u4").astype(np.uint32, copy=False)


CHUNK = 1 << 20  # symbols per call into constriction


def _decode_chunked(decode, count: int, model) -> np.ndarray:
    """``count`` indices from ``decode(model, n)``, at most CHUNK per call."""
    if count <= CHUNK:
        return decode(model, count)
    out = np.empty(count, np.int32)
    for start in range(0, count, CHUNK):
        stop = min(start + CHUNK, count)
        out[start:stop] = decode(model, stop - start)
    return out


Group = tuple[np.ndarray, FrequencyTable]  # table indices, their table
Plan = tuple[int, FrequencyTable]  # how many indices to decode, with which table


def encode_groups(coder: Coder, groups: Sequence[Group]) -> np.ndarray:
    """Encode each group in order; :func:`decode_groups` with the same plan mirrors it."""
    if coder is Coder.RANGE:
        encoder = _queue.RangeEncoder()
        for indices, table in groups:
            if indices.size:
                encoder.encode(np.ascontiguousarray(indices, dtype=np.int32), _categorical(table))
        return encoder.get_compressed()
    ans = _stack.AnsCoder()
    for indices, table in reversed(groups):  # a stack: last pushed is first popped
        if indices.size:
            ans.encode_reverse(np.ascontiguousarray(indices, dtype=np.int32), _categorical(table))
    return ans.get_compressed()


def encode_chunks(coder: Coder, table: FrequencyTable, count: int, chunk: Callable[[int], np.ndarray],
                  tail: Sequence[Group] = ()) -> np.ndarray:
    """``encode_groups(coder, [(concatenation of chunk(0) … chunk(count − 1), table), *tail])`` without
    the concatenation: chunks are made one at a time (an ANS stack takes them last to first)."""
    model = _categorical(table)
    if coder is Coder.RANGE:
        encoder = _queue.RangeEncoder()
        for i in range(count):
            indices = chunk(i)
            if indices.size:
                encoder.encode(np.ascontiguousarray(indices, dtype=np.int32), model)
        for indices, group_table in tail:
            if indices.size:
                encoder.encode(np.ascontiguousarray(indices, dtype=np.int32), _categorical(group_table))
        return encoder.get_compressed()
    ans = _stack.AnsCoder()
    for indices, group_table in reversed(tail):
        if indices.size:
            ans.encode_reverse(np.ascontiguousarray(indices, dtype=np.int32), _categorical(group_table))
    for i in reversed(range(count)):
        indices = chunk(i)
        if indices.size:
            ans.encode_reverse(np.ascontiguousarray(indices, dtype=np.int32), model)
    return ans.get_compressed()


class GroupDecoder:
    """Decodes groups one at a time, so a caller can decide the next group's
    plan from what it has decoded (e.g. how many escapes follow)."""

    def __init__(self, coder: Coder, words: np.ndarray, where: str):
        self.coder, self.where = coder, where
        words = np.ascontiguousarray(words, dtype=np.uint32)
        try:
            if coder is Coder.RANGE:
                self._dec = _queue.RangeDecoder(words)
                self._empty_input = words.size == 0
            else:
                self._dec = _stack.AnsCoder(words)
        except (ValueError, TypeError) as exc:
            raise StreamError(f"{where}: corrupt {coder.value} stream ({exc})") from exc

    def decode(self, count: int, table: FrequencyTable) -> np.ndarray:
        if count == 0:
            return np.zeros(0, np.int32)
        try:
            indices = _decode_chunked(self._dec.decode, count, _categorical(table))
        except (ValueError, TypeError, RuntimeError, OverflowError, AssertionError) as exc:
            # constriction signals invalid range-coder data with an AssertionError
            raise StreamError(f"{self.where}: corrupt {self.coder.value} stream ({exc})") from exc
        # one pass: a negative int32 is a large uint32
        if int(indices.view(np.uint32).max()) >= table.freqs.size:
            raise StreamError(f"{self.where}: decoded an index outside its table")
        return indices

    def finish(self) -> None:
        """Raise unless every word of the stream was consumed.

        For ANS this is also the whole canonicality check: constriction's ANS
        decode step is the exact inverse of its encode step (the decoder refills a
        word exactly when the encoder would have flushed it), so a stream that
        decodes to ``s`` and leaves the coder empty (state 0) *is* the encoding
        of ``s``; see :func:`ncz.format.entropy.decode`.
        """
        if self.coder is Coder.RANGE:
            done = self._empty_input or self._dec.maybe_exhausted()
        else:
            done = self._dec.is_empty()
        if not done:
            raise StreamError(f"{self.where}: {self.coder.value} stream has data left after the last symbol "
                              "(corrupt or padded)")


class AnsStack:
    """An ANS stack for bits-back coding: push (encode) and pop (decode) groups.

    ``pop`` *borrows* bits: it decodes from whatever is on the stack. The stack
    must hold at least the popped symbols' information content, or constriction
    would silently decode from zeros; callers check with ``num_valid_bits``
    (see :class:`ncz.format.entropy.BitsBackStack`).
    """

    def __init__(self, words: np.ndarray | None = None):
        try:
            self._ans = _stack.AnsCoder() if words is None or words.size == 0 else _stack.AnsCoder(
                np.ascontiguousarray(words, dtype=np.uint32))
        except (ValueError, TypeError) as exc:
            raise StreamError(f"invalid ANS stack ({exc})") from exc

    @property
    def num_valid_bits(self) -> int:
        return int(self._ans.num_valid_bits())

    def words(self) -> np.ndarray:
        return self._ans.get_compressed()

    def push(self, indices: np.ndarray, table: FrequencyTable) -> None:
        if indices.size:
            self._ans.encode_reverse(np.ascontiguousarray(indices, dtype=np.int32), _categorical(table))

    def pop(self, count: int, table: FrequencyTable) -> np.ndarray:
        if count == 0:
            return np.zeros(0, np.int32)
        try:
            return _decode_chunked(self._ans.decode, count, _categorical(table))
        except (ValueError, RuntimeError, AssertionError) as exc:
            raise StreamError(f"ANS pop failed ({exc})") from exc

    def is_empty(self) -> bool:
        return bool(self._ans.is_empty())
