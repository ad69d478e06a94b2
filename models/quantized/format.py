"""The ``QUANTIZED`` sections: encoder, head check and decoder.

Kind ``QUANTIZED`` (FORMAT.md §5.4). Head params: ``dtype``, ``shape``,
``granularity`` (``tensor`` | ``channel`` | ``group`` | ``rowcol``),
``group_size`` (group only), ``step_base`` (float, the float32 multiplier; absent
in files whose ``#step`` is float32), ``pair`` (K ∈ {4, 8, 16, 32, 64}, only when
indices are paired). Parts:

- ``#q``: int32 (ANS): the indices in C order of the (rows, cols) view (rows =
  first dimension), shape ``[n]``; or (format 1.2, ``fast_decode``, never with
  ``pair``) int8 ``[n]``, stored ZSTD, where −128 marks an index outside −127…127
  whose value is the next entry of ``#qx`` (int32, one per mark, in order): about
  1 % larger than ANS, decoded by zstd's Huffman stage ~30× faster than the ANS
  stack; with ``pair`` = K, ``[ceil(n/2)]`` symbols
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ncz.format import Codec, FormatError, Kind, Reader, SectionInfo, UsageError, encode_payload
from ncz.format.entropy import CategoricalModel, read_symbols
from ncz.format.entropy_tables import fit_table_counts

from ..representation import (
    Encoded,
    PendingSection,
    dtype_name,
    float32_to,
    part_name,
    read_part,
    storage_view,
    symbol_payload,
    tensor_label,
    torch_dtype,
)
from .calibrated import TensorCalibration, quantize_calibrated
from .pairs import PAIR_MIN, PAIR_WIDTHS, pair_symbols, pair_width, pair_width_of, unpair_symbols
from .passes import CHUNK_ELEMENTS, BlockedSum, Histogram, RowSource
from .rdoq import RDOQ_MAX_BITS, CodeLengths, rdoq_rounded, rdoq_search
from .search import Prepared, block_steps, prepare, quantize_codes, rounded, search, zero_choice
from .steps import GRANULARITIES, STEP_CODE_RANGE, Steps, dequantize, step_values

__all__ = ["encode_quantized", "check_quantized_head", "decode_quantized"]


Chunks = Callable[[bool], Iterator[tuple[int, int, np.ndarray, np.ndarray]]]  # even -> (start, stop, q, steps)


def _nearest(prep: Prepared, steps: Steps) -> Chunks:
    return lambda even: rounded(prep, steps, even=even)


def _rate_optimized(prep: Prepared, steps: Steps, lengths: CodeLengths) -> Chunks:
    return lambda even: rdoq_rounded(prep, steps, lengths, even=even)


def _restored_error(prep: Prepared, chunks: Chunks) -> float:
    """Relative error after the decoder's cast back to the tensor's dtype (chunk by chunk)."""
    squares = BlockedSum()
    original = None if prep.source.exact_float32 else 0.0  # float64 tensors: their own norm
    for start, stop, q, full in chunks(False):
        restored = prep.source.cast_back(np.multiply(q, full, out=q))
        if original is not None:  # float64 tensors: the error against the float64 values
            values = prep.source.original(start, stop)
            squares.add(np.square(values - restored.reshape(-1)))
            original += float(np.sum(np.square(values)))
        else:  # float16 / bf16 values and their restored ones are float32 numbers: float32 arithmetic
            diff = np.subtract(prep.source.block(start, stop), restored, out=restored)
            squares.add(np.square(diff, out=diff))
    norm = prep.norm if original is None else math.sqrt(original)
    return math.sqrt(squares.result()) / norm if norm > 0 else 0.0


def _indices(prep: Prepared, chunks: Chunks) -> tuple[np.ndarray | None, Histogram]:
    """The indices as int16 (half the memory of int32; None when some index does not fit) and their histogram."""
    histogram = Histogram()
    small: np.ndarray | None = np.empty(prep.source.size, np.int16)
    for start, stop, q, _ in chunks(False):
        block = q.astype(np.int32).reshape(-1)
        histogram.add(block)
        if small is not None:
            if histogram.low < -(2**15) or histogram.high >= 2**15:
                small = None  # an index beyond int16: the symbols are rounded again instead
            else:
                small[start * prep.source.cols:stop * prep.source.cols] = block
    return small, histogram


def _index_symbols(prep: Prepared, chunks: Chunks,
                   made: tuple[np.ndarray | None, Histogram]) -> tuple[np.ndarray, int | None, Histogram]:
    """The ``#q`` symbols (indices, or index pairs on large tensors) and their histogram, from the
    indices :func:`_indices` ``made`` of ``chunks``."""
    small, indices = made
    width = pair_width_of(*indices.items()) if prep.source.size >= PAIR_MIN else None
    if width is None and small is not None:
        return small, None, indices  # int16 symbols: coded as int32 without making them
    count = prep.source.size if width is None else (prep.source.size + 1) // 2
    symbols = np.empty(count, np.int32)
    histogram = Histogram((0, width * width - 1)) if width is not None else indices
    position = 0
    if small is not None:  # index pairs from the int16 indices, chunk by chunk
        chunk = 2 * CHUNK_ELEMENTS
        for start in range(0, small.size, chunk):
            block = pair_symbols(small[start:start + chunk], width)
            symbols[position:position + block.size] = block
            position += block.size
            histogram.add(block)
        return symbols, width, histogram
    for _, _, q, _ in chunks(True):
        block = q.astype(np.int32).reshape(-1)
        if width is not None:
            block = pair_symbols(block, width)
            histogram.add(block)
        symbols[position:position + block.size] = block
        position += block.size
    return symbols, width, histogram


def _codes_part(name: str, part: str, codes: np.ndarray) -> PendingSection:
    return PendingSection(part_name(name, part), symbol_payload(codes), Kind.PART,
                          {"dtype": "int32", "shape": list(codes.shape)})


def encode_quantized(name: str, tensor: torch.Tensor, *, rel_error: float | None = None, bits: float | None = None,
                     granularity: str = "channel", group_size: int = 64,
                     calibration: TensorCalibration | None = None,
                     calibrated_rel_error: float | None = None, rdoq: bool = False,
                     fast_decode: bool = False) -> Encoded:
    """Quantize ``tensor`` (see :mod:`.steps`); with ``calibration`` (a
    :class:`~.calibrated.TensorCalibration`) and a ``rel_error`` target, the
    output error of plain rounding at ``rel_error`` — or at ``calibrated_rel_error``
    when given, the recipe's allocation for calibrated packing — is met with fewer
    bits (:func:`quantize_calibrated`).

    ``rdoq``: with a ``rel_error`` target, indices are chosen for error + λ·bits
    (:mod:`.rdoq`) and the step refined until the error is met again, when that lowers
    the rate (tried only below :data:`~.rdoq.RDOQ_MAX_BITS` bits per index).

    ``fast_decode``: ``#q`` holds the indices as bytes under zstd, the rare ones outside
    −127…127 escaped to ``#qx`` (FORMAT.md §5.4, format 1.2), instead of an ANS stream of index
    pairs: ~1 % more bytes, decoded at zstd's speed (the ANS decoder's per-symbol search is most
    of an unpack's CPU). Tensors with more than 1/32 of their indices escaped stay ANS.

    Data-free, the tensor is read in chunks of rows (never converted to float32 whole):
    memory is the tensor, its symbols and their code."""
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
    for key, flag in (("rdoq", rdoq), ("fast_decode", fast_decode)):
        if not isinstance(flag, bool):
            raise UsageError(f"{name}: {key} must be true or false, got {flag!r}")
    if (rel_error is None) == (bits is None):
        raise UsageError(f"{name}: give exactly one of rel_error or bits")
    shape = list(tensor.shape)
    rows = shape[0] if len(shape) >= 2 else 1
    cols = tensor.numel() // rows if rows else 0
    if granularity == "group" and cols % group_size:
        granularity = "channel"  # the row length does not split into groups
    if granularity == "rowcol" and (len(shape) < 2 or cols < 2):
        granularity = "channel"  # a vector has no columns to scale
    if tensor.numel() == 0 or (calibration is not None and rel_error is not None):
        return _encode_whole(name, tensor, rows, cols, rel_error, bits, granularity, group_size, calibration, rdoq,
                             fast_decode)
    prep = prepare(RowSource(tensor, rows, cols), granularity, group_size)
    target = rel_error
    for _ in range(8):
        choice = zero_choice(prep) if prep.norm == 0 else search(prep, rel_error=target, bits=bits)
        err = choice.rel_error
        if tensor.dtype == torch.float32:
            break
        # the decoder casts back to the original dtype: report (and bound) that error
        err = _restored_error(prep, _nearest(prep, choice.steps))
        if rel_error is None or err <= rel_error or target < rel_error / 2:
            break
        target *= 0.97  # the cast's rounding pushed it over: aim a little lower
    chunks = _nearest(prep, choice.steps)
    made = _indices(prep, chunks)
    if rdoq and rel_error is not None and err > 0 and made[1].entropy() < RDOQ_MAX_BITS:
        error_of = None if tensor.dtype == torch.float32 else \
            (lambda steps, lengths: _restored_error(prep, _rate_optimized(prep, steps, lengths)))
        better = rdoq_search(prep, choice, made[1], rel_error, error_of)
        if better is not None:
            choice, err = better.choice, better.choice.rel_error
            chunks = _rate_optimized(prep, choice.steps, better.lengths)
            made = _indices(prep, chunks)
    if fast_decode and made[0] is not None:
        fast = _byte_sections(name, tensor, granularity, group_size, choice.base, made[0], prep.row_codes,
                              prep.col_codes, err)
        if fast is not None:
            return fast
    symbols, width, histogram = _index_symbols(prep, chunks, made)
    model = CategoricalModel(fit_table_counts(*histogram.items()))
    return _sections(name, tensor, granularity, group_size, choice.base, symbols, width, model, prep.row_codes,
                     prep.col_codes, err)


def _byte_indices(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 indices with −128 marking an escape, the escaped indices as int32), or None when more
    than 1/32 of them would be escaped (bytes would then cost more than ANS saves in time)."""
    flat = indices.reshape(-1)
    outside = np.flatnonzero((flat < -127) | (flat > 127))
    if outside.size * 32 > flat.size:
        return None
    small = flat.astype(np.int8)  # wraps where escaped; overwritten next
    small[outside] = -128
    return small, flat[outside].astype(np.int32)


def _byte_sections(name: str, tensor: torch.Tensor, granularity: str, group_size: int, base: float,
                   indices: np.ndarray, row_codes: np.ndarray, col_codes: np.ndarray | None,
                   err: float) -> Encoded | None:
    """The sections with byte indices (``fast_decode``), or None when too many would be escaped."""
    escaped = _byte_indices(indices)
    if escaped is None:
        return None
    return _sections(name, tensor, granularity, group_size, base, escaped[0], None, None, row_codes, col_codes, err,
                     escaped[1])


def _encode_whole(name: str, tensor: torch.Tensor, rows: int, cols: int, rel_error: float | None,
                  bits: float | None, granularity: str, group_size: int,
                  calibration: TensorCalibration | None, rdoq: bool = False, fast_decode: bool = False) -> Encoded:
    """The whole float32 view at once: calibrated rounding (GPTQ needs it) and empty tensors."""
    w2 = tensor.detach().float().cpu().numpy().reshape(rows, cols)
    target = rel_error
    for _ in range(8):
        result = quantize_codes(w2, rel_error=target, bits=bits, granularity=granularity, group_size=group_size)
        err = result.rel_error
        if tensor.dtype == torch.float32 or tensor.numel() == 0:
            break
        err = _whole_restored_error(tensor, result.q, result.steps, granularity, group_size)
        if rel_error is None or err <= rel_error or target < rel_error / 2:
            break
        target *= 0.97
    if calibration is not None and rel_error is not None:
        result, granularity = quantize_calibrated(w2, result, calibration, granularity, group_size, rdoq=rdoq)
        err = _whole_restored_error(tensor, result.q, result.steps, granularity, group_size) \
            if tensor.dtype != torch.float32 else result.rel_error
    if fast_decode and result.q.size:
        fast = _byte_sections(name, tensor, granularity, group_size, result.base, result.q, result.row_codes,
                              result.col_codes, err)
        if fast is not None:
            return fast
    width = pair_width(result.q)
    symbols = result.q.ravel() if width is None else pair_symbols(result.q, width)
    return _sections(name, tensor, granularity, group_size, result.base, symbols, width, None, result.row_codes,
                     result.col_codes, err)


def _whole_restored_error(tensor: torch.Tensor, q: np.ndarray, steps: Steps, granularity: str,
                          group_size: int) -> float:
    restored = torch.from_numpy(dequantize(q, steps, granularity, group_size)).to(tensor.dtype).double().reshape(-1)
    original = tensor.detach().double().reshape(-1)
    return float((original - restored).norm() / original.norm()) if float(original.norm()) > 0 else 0.0


def _sections(name: str, tensor: torch.Tensor, granularity: str, group_size: int, base: float, symbols: np.ndarray,
              width: int | None, model: CategoricalModel | None, row_codes: np.ndarray,
              col_codes: np.ndarray | None, err: float, escapes: np.ndarray | None = None) -> Encoded:
    params = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape), "granularity": granularity,
              "step_base": base}
    if granularity == "group":
        params["group_size"] = group_size
    if width is not None:
        params["pair"] = width
    sections = [
        PendingSection(name, encode_payload(b"", Codec.RAW), Kind.QUANTIZED, params),
        _index_part(name, symbols, model),
        _codes_part(name, "step", row_codes),
    ]
    if escapes is not None and escapes.size:
        sections.append(_codes_part(name, "qx", escapes))
    if col_codes is not None:
        sections.append(_codes_part(name, "colscale", col_codes))
    return Encoded(name, f"quantized/{granularity}", sections, tensor.numel(), err)


# zstd level of byte indices: level 3 was no smaller on Llama-shaped weights (the bytes are near-random), only slower
FAST_ZSTD_LEVEL = 1


def _index_part(name: str, symbols: np.ndarray, model: CategoricalModel | None) -> PendingSection:
    """``#q``: int32 symbols as ANS (or ZSTD when too predictable), int8 indices as ZSTD."""
    if symbols.dtype == np.int8:
        payload = encode_payload(memoryview(np.ascontiguousarray(symbols)).cast("B"), Codec.ZSTD,
                                 {"level": FAST_ZSTD_LEVEL})
        return PendingSection(part_name(name, "q"), payload, Kind.PART, {"dtype": "int8", "shape": [symbols.size]})
    return PendingSection(part_name(name, "q"), symbol_payload(symbols, model=model), Kind.PART,
                          {"dtype": "int32", "shape": [symbols.size]})


def _read_codes(reader: Reader, head: SectionInfo, part: str) -> np.ndarray:
    codes = read_part(reader, head, part, dtype="int32")
    lo, hi = STEP_CODE_RANGE
    if codes.size and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise FormatError(f"{tensor_label(reader, head)}: step codes of {part_name(head.name, part)!r} "
                          f"must lie in {lo}..{hi}")
    return step_values(codes)


def _view(shape: list[int]) -> tuple[int, int]:
    """(rows, cols) of the 2-D view: rows = the first dimension (1 for a vector or scalar)."""
    count = math.prod(shape)  # exact (the container capped the dense size)
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, count // rows if rows else 0


def check_quantized_head(head: SectionInfo, reader: Reader) -> None:
    """Params of a ``QUANTIZED`` head (FORMAT.md §5.4), before any part is read."""
    label, params = tensor_label(reader, head), head.params
    granularity = params.get("granularity")
    if granularity not in GRANULARITIES:
        raise FormatError(f"{label}: params.granularity must be one of {GRANULARITIES}")
    if "step_base" in params:  # absent in files whose #step holds float32 steps
        base = params["step_base"]
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not math.isfinite(base) or base <= 0:
            raise FormatError(f"{label}: params.step_base must be a positive finite number")
    width = params.get("pair")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width not in PAIR_WIDTHS):
        raise FormatError(f"{label}: params.pair must be one of {list(PAIR_WIDTHS)}")
    if granularity == "group":
        group_size = params.get("group_size", 1)
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise FormatError(f"{label}: params.group_size must be an int, got {group_size!r}")
        cols = _view(params["shape"])[1]
        if group_size <= 0 or cols % group_size:
            raise FormatError(f"{label}: group_size {group_size} does not divide {cols}")


def _escaped_indices(reader: Reader, head: SectionInfo, q: np.ndarray, label: str) -> np.ndarray:
    """Byte indices with every −128 replaced by the next ``#qx`` entry (each outside −127…127)."""
    marks = np.flatnonzero(q == -128)
    name = part_name(head.name, "qx")
    if name not in reader:
        if marks.size:
            raise FormatError(f"{label}: {marks.size} escaped indices but no part {name!r}")
        return q
    extra = read_part(reader, head, "qx", dtype="int32").reshape(-1)
    if extra.size != marks.size:
        raise FormatError(f"{label}: {name!r} holds {extra.size} indices for {marks.size} escapes")
    if ((extra >= -127) & (extra <= 127)).any():
        raise FormatError(f"{label}: an escaped index lies in -127..127 (not canonical)")
    if not marks.size:
        return q
    wide = q.astype(np.int16 if int(extra.min()) >= -(2**15) and int(extra.max()) < 2**15 else np.int32)
    wide[marks] = extra
    return wide


@dataclass(frozen=True)
class QuantizedParts:
    """What a ``QUANTIZED`` tensor stores, checked: indices and steps before Ŵ = q · step.

    ``q``: (rows, cols) integer indices; ``steps``: as :func:`~.search.block_steps` takes them
    (rowcol: the pair of row steps and column scales). For tools that study the code itself
    (e.g. ``bench/quantizer_bound.py``); :func:`decode_quantized` reconstructs from the same.
    """

    q: np.ndarray
    steps: Steps
    granularity: str
    group_size: int

    def step_matrix(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The float32 step of every weight of rows ``start:stop``, as the decoder multiplies."""
        rows, cols = self.q.shape
        stop = rows if stop is None else stop
        return np.broadcast_to(block_steps(self.steps, start, stop, cols, self.granularity, self.group_size),
                               (stop - start, cols))


def read_quantized(head: SectionInfo, reader: Reader) -> QuantizedParts:
    """The checked indices and steps of a ``QUANTIZED`` head (FORMAT.md §5.4)."""
    check_quantized_head(head, reader)
    label, shape, granularity = tensor_label(reader, head), head.params["shape"], head.params["granularity"]
    rows, cols = _view(shape)
    count = rows * cols
    q_info = reader.info(part_name(head.name, "q")) if part_name(head.name, "q") in reader else None
    q_dtype = q_info.params.get("dtype") if q_info is not None else None
    if q_info is not None and q_info.kind == Kind.PART and q_dtype == "int32" \
            and q_info.codec in (Codec.ANS, Codec.RANGE):
        q = read_symbols(reader, q_info.name)  # straight from the coder, no copy through bytes
    elif q_dtype == "int8" and "pair" not in head.params:  # format 1.2: byte indices, escapes in #qx
        q = _escaped_indices(reader, head, read_part(reader, head, "q", dtype="int8"), label)
    else:
        q = read_part(reader, head, "q", dtype="int32")
    step_info = reader.info(part_name(head.name, "step")) if part_name(head.name, "step") in reader else None
    if step_info is not None and step_info.params.get("dtype") == "float32":  # steps stored as floats
        steps = read_part(reader, head, "step", dtype="float32").astype(np.float32)
        if steps.size and not (np.isfinite(steps).all() and (steps > 0).all()):
            raise FormatError(f"{label}: quantization steps must be finite and > 0")
    else:  # step codes × step_base
        if "step_base" not in head.params:
            raise FormatError(f"{label}: params.step_base must be a positive finite number")
        steps = _read_codes(reader, head, "step") * np.float32(head.params["step_base"])
    width = head.params.get("pair")
    if width is not None:
        q = unpair_symbols(q, width, count, label)
    if q.size != count:
        raise FormatError(f"{label} has {q.size} indices for {count} weights")
    group_size = head.params.get("group_size", 1) if granularity == "group" else 1
    expected = {"tensor": (1, 1), "channel": (rows, 1), "rowcol": (rows, 1),
                "group": (rows, cols // group_size)}[granularity]
    if tuple(steps.shape) != expected:
        raise FormatError(f"{label}: steps have shape {list(steps.shape)}, expected {list(expected)}")
    if granularity == "rowcol":
        col_scales = _read_codes(reader, head, "colscale")
        if tuple(col_scales.shape) != (1, cols):
            raise FormatError(f"{label}: column scales have shape {list(col_scales.shape)}, expected {[1, cols]}")
        steps = (steps, col_scales)
    return QuantizedParts(q.reshape(rows, cols), steps, granularity, group_size)


def decode_quantized(head: SectionInfo, reader: Reader) -> torch.Tensor:
    parts = read_quantized(head, reader)
    shape, granularity, group_size = head.params["shape"], parts.granularity, parts.group_size
    (rows, cols), q, steps = parts.q.shape, parts.q, parts.steps
    count = rows * cols
    # Ŵ = q · step in float32, cast to the dtype: chunk by chunk into the output (no float32 copy of it all)
    out = torch.empty(count, dtype=torch_dtype(head.params["dtype"]))
    target = storage_view(out)
    chunk_rows = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, chunk_rows):
        stop = min(rows, start + chunk_rows)
        block = q[start:stop].astype(np.float32) * block_steps(steps, start, stop, cols, granularity, group_size)
        target[start * cols:stop * cols] = float32_to(block, out.dtype).reshape(-1)
    return out.reshape(shape)

