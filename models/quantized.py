"""Uniform scalar quantization with entropy-coded indices (DeepCABAC's idea, order-0).

Ŵ = q · step, q = round(W / step) as int32, coded with ANS under a table fitted to
the tensor (so frequent small indices cost little and outliers stay exact up to
the step: no clipping). With entropy coding, one uniform step is what minimizes
MSE at a given rate in the high-rate regime; per-channel or per-group steps
(∝ the channel's / group's RMS) equalize *relative* error where rows differ in
scale, which matters for activations downstream.

The step comes from a target: ``rel_error`` (‖W − Ŵ‖/‖W‖) or ``bits`` (coded
bits per weight of the indices), found by bisection on a global multiplier.

Kind ``QUANTIZED``: head params ``dtype``, ``shape``, ``granularity``
(``tensor`` | ``channel`` | ``group``), ``group_size`` (group only); parts ``#q``
(int32 indices, shape = the tensor's element count) and ``#step`` (float32 steps:
1, rows, or rows × groups).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ncz.format import Codec, InputError, Kind, Reader, SectionInfo, UsageError, encode_payload

from .representation import (
    Encoded,
    PendingSection,
    dtype_name,
    part_name,
    read_part,
    register_decoder,
    smallest_payload,
    torch_dtype,
)

__all__ = ["quantize", "encode_quantized", "GRANULARITIES"]

GRANULARITIES = ("tensor", "channel", "group")


def _unit_steps(w: np.ndarray, granularity: str, group_size: int) -> np.ndarray:
    """Relative step per row/group (∝ RMS), broadcastable to w's (rows, cols) view."""
    rows = w.shape[0]
    if granularity == "tensor":
        return np.ones((1, 1))
    if granularity == "channel":
        rms = np.sqrt(np.mean(w.astype(np.float64) ** 2, axis=1, keepdims=True))
    else:
        cols = w.shape[1]
        if cols % group_size:
            raise UsageError(f"group_size {group_size} does not divide the row length {cols}")
        g = w.reshape(rows, cols // group_size, group_size).astype(np.float64)
        rms = np.sqrt(np.mean(g**2, axis=2))  # rows × groups
    overall = float(np.sqrt(np.mean(rms**2))) or 1.0
    return np.where(rms > 0, rms / overall, 1.0)


def _expand(steps: np.ndarray, shape: tuple[int, int], granularity: str, group_size: int) -> np.ndarray:
    if granularity == "group":
        return np.repeat(steps, group_size, axis=1)
    return np.broadcast_to(steps, shape)


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


def quantize(w: np.ndarray, *, rel_error: float | None = None, bits: float | None = None,
             granularity: str = "channel", group_size: int = 64) -> tuple[np.ndarray, np.ndarray, float]:
    """(int32 indices, float32 steps, achieved relative error) for the 2-D view ``w``."""
    if (rel_error is None) == (bits is None):
        raise UsageError("give exactly one of rel_error or bits")
    if granularity not in GRANULARITIES:
        raise UsageError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    w64 = w.astype(np.float64)
    norm = float(np.linalg.norm(w64))
    unit = _unit_steps(w, granularity, group_size)
    if norm == 0 or not np.isfinite(norm):
        if not np.isfinite(norm):
            raise InputError("cannot quantize a tensor with NaN or inf; use the lossless representation")
        steps = unit.astype(np.float32)
        return np.zeros(w.shape, np.int32), steps, 0.0
    rms = norm / math.sqrt(w.size)

    def attempt(multiplier: float):
        steps = (unit * multiplier).astype(np.float32)
        full = _expand(steps, w.shape, granularity, group_size)
        q = np.rint(w64 / full)
        if np.abs(q).max() >= 2**30:
            return None
        restored = q.astype(np.float32) * full  # exactly the decoder's float32 arithmetic
        err = float(np.linalg.norm(w64 - restored)) / norm
        return q.astype(np.int32), steps, err

    # bisection on log(multiplier): error and bits are monotone in the step
    lo, hi = math.log(rms * 1e-7), math.log(rms * 64)
    best = None
    for _ in range(40):
        mid = (lo + hi) / 2
        result = attempt(math.exp(mid))
        if result is None:  # step too small for int32 indices
            lo = mid
            continue
        q, steps, err = result
        if rel_error is not None:  # feasible at fine steps: find the coarsest that meets the error
            if err <= rel_error:
                best, lo = result, mid
            else:
                hi = mid
        elif _entropy_bits(q) <= bits:  # feasible at coarse steps: find the finest within the bits
            best, hi = result, mid
        else:
            lo = mid
        if hi - lo < 1e-3:
            break
    if best is None:
        best = attempt(math.exp(lo if rel_error is not None else hi))
        if best is None:
            raise UsageError("no step meets the target within int32 indices")
    return best


def encode_quantized(name: str, tensor: torch.Tensor, *, rel_error: float | None = None, bits: float | None = None,
                     granularity: str = "channel", group_size: int = 64) -> Encoded:
    if not tensor.is_floating_point():
        raise UsageError(f"{name}: only floating-point tensors can be quantized")
    shape = list(tensor.shape)
    w = tensor.detach().float().cpu().numpy()
    rows = shape[0] if len(shape) >= 2 else 1
    w2 = w.reshape(rows, -1) if w.size else w.reshape(0, 0)
    if granularity == "group" and w2.shape[1] % group_size:
        granularity = "channel"  # the row length does not split into groups
    q, steps, err = quantize(w2, rel_error=rel_error, bits=bits, granularity=granularity, group_size=group_size)
    if tensor.dtype != torch.float32:  # the decoder casts back to the original dtype: report that error
        full = np.repeat(steps, group_size, axis=1) if granularity == "group" else steps
        restored = torch.from_numpy(q.astype(np.float32) * full).to(tensor.dtype).double().reshape(-1)
        original = tensor.detach().double().reshape(-1)
        err = float((original - restored).norm() / original.norm()) if float(original.norm()) > 0 else 0.0
    params = {"dtype": dtype_name(tensor.dtype), "shape": shape, "granularity": granularity}
    if granularity == "group":
        params["group_size"] = group_size
    head = PendingSection(name, encode_payload(b"", Codec.RAW), Kind.QUANTIZED, params)
    indices = encode_payload(q.astype("<i4").tobytes(), Codec.ANS)
    step_bytes = steps.astype("<f4").tobytes()
    step_payload = smallest_payload(step_bytes, [(Codec.RAW, None), (Codec.ZSTD, {"level": 19})])
    sections = [
        head,
        PendingSection(part_name(name, "q"), indices, Kind.PART, {"dtype": "int32", "shape": [q.size]}),
        PendingSection(part_name(name, "step"), step_payload, Kind.PART, {"dtype": "float32", "shape": list(steps.shape)}),
    ]
    return Encoded(name, f"quantized/{granularity}", sections, tensor.numel(), err)


def decode_quantized(head: SectionInfo, reader: Reader) -> torch.Tensor:
    shape = head.params["shape"]
    granularity = head.params.get("granularity")
    if granularity not in GRANULARITIES:
        raise InputError(f"{reader.name}: {head.name!r}: params.granularity must be one of {GRANULARITIES}")
    count = int(np.prod(shape, dtype=np.int64))
    rows = shape[0] if len(shape) >= 2 else 1
    cols = count // rows if rows else 0
    q = read_part(reader, head, "q", dtype="int32")
    steps = read_part(reader, head, "step", dtype="float32").astype(np.float32)
    if q.size != count:
        raise InputError(f"{reader.name}: {head.name!r} has {q.size} indices for {count} weights")
    group_size = int(head.params.get("group_size", 1)) if granularity == "group" else 1
    expected = {"tensor": (1, 1), "channel": (rows, 1), "group": (rows, cols // group_size if group_size else 0)}[granularity]
    if granularity == "group" and (group_size <= 0 or cols % group_size):
        raise InputError(f"{reader.name}: {head.name!r}: group_size {group_size} does not divide {cols}")
    if tuple(steps.shape) != expected:
        raise InputError(f"{reader.name}: {head.name!r}: steps have shape {list(steps.shape)}, expected {list(expected)}")
    q2 = q.reshape(rows, cols)
    full = np.repeat(steps, group_size, axis=1) if granularity == "group" else steps
    w = (q2.astype(np.float32) * full).reshape(shape)
    return torch.from_numpy(np.ascontiguousarray(w)).to(torch_dtype(head.params["dtype"]))


register_decoder(Kind.QUANTIZED, decode_quantized)
