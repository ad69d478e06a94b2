"""The ``LOW_RANK`` sections: encoder, head check, decoder and module builder.

Storage (kind ``LOW_RANK``). A weight of shape (out, …) is viewed as the matrix
W of out × (in·kh·kw) (conv kernels flatten their receptive field), and the
rank-r SVD W_r = U_r S_r V_rᵀ is split evenly: U' = U_r √S_r (out × r),
V' = √S_r V_rᵀ (r × n). Both factors are quantized with :func:`ncz.models.quantized.quantize`
and their int32 indices coded with ANS. Steps are *per component*: an error δ in
column j of U' costs σ_j·‖δ‖² in W (the columns of V' are orthogonal with norm²
σ_j), so the rate–distortion optimal step is ∝ σ_j^(−1/2). We get exactly that
by quantizing Ũ = U'√S (one step for the whole matrix, in a domain where errors
count as in W) and storing step_j = step/√σ_j; same for V. ``factor_rel_error``
is then the error each factor's quantization adds, relative to ‖W_r‖.

Head params: ``dtype``, ``shape`` (the original tensor), ``rank`` (1 ≤ r ≤
min(out, n)), ``view`` ([out, n], the matrix view). Parts:

- ``#u`` int32 [out, r] (ANS), ``#u_step`` float32 [r] (raw or zstd),
- ``#v`` int32 [r, n] (ANS), ``#v_step`` float32 [r] (raw or zstd).

Decoding: U = q_u · u_step (per column), V = q_v · v_step (per row), both
float32; W = U @ V in float32, reshaped to ``shape`` and cast to ``dtype``.
``load_into(model, path, factorized=True)`` replaces an ``nn.Linear`` by
:class:`LowRankLinear` (x ↦ (x Vᵀ) Uᵀ + b, only the factors held) and an
``nn.Conv2d`` (groups = 1, zero padding) by :class:`LowRankConv2d` (a conv of
r output channels, then a 1×1 conv); other owners get the dense weight.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ncz.format import Codec, FormatError, InputError, Kind, LimitError, Reader, SectionInfo, UsageError, encode_payload

from ..lossless import encode_lossless
from ..quantized import encode_quantized, quantize
from ..representation import (
    Encoded,
    PendingSection,
    dtype_name,
    entropy_bits,
    part_name,
    read_part,
    smallest_payload,
    symbol_payload,
    torch_dtype,
)
from .modules import LowRankConv2d, LowRankLinear
from .svd import break_even_rank, matrix_shape, thin_svd, truncation_tails

__all__ = ["encode_lowrank", "check_lowrank_head", "decode_lowrank", "build_lowrank_module"]


def _quantize_factors(u: np.ndarray, s: np.ndarray, vh: np.ndarray, rank: int, *, factor_rel_error: float | None,
                      bits: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(q_u [m, r], u_step [r], q_v [r, n], v_step [r]) with per-component steps ∝ σ_j^(−1/2) (see module doc)."""
    s_r = s[:rank]
    target = {"rel_error": factor_rel_error} if bits is None else {"bits": bits}
    weighted_u = u[:, :rank] * s_r  # Ũ = U'·√S = U·S: errors here count as in W
    weighted_v = s_r[:, None] * vh[:rank]
    qu, su, _ = quantize(weighted_u, granularity="tensor", **target)
    qv, sv, _ = quantize(weighted_v, granularity="tensor", **target)
    top = float(s_r[0]) if rank else 0.0
    s_eff = np.maximum(s_r, top * 1e-12) if top > 0 else np.ones(rank)
    root = np.sqrt(s_eff)
    step_u = (float(su.reshape(-1)[0]) / root).astype(np.float32)
    step_v = (float(sv.reshape(-1)[0]) / root).astype(np.float32)
    return qu.astype(np.int32), step_u, qv.astype(np.int32), step_v


def _product(qu: np.ndarray, step_u: np.ndarray, qv: np.ndarray, step_v: np.ndarray) -> torch.Tensor:
    """The decoder's arithmetic: float32 factors, float32 matmul."""
    u = torch.from_numpy(np.ascontiguousarray(qu.astype(np.float32) * step_u[None, :].astype(np.float32)))
    v = torch.from_numpy(np.ascontiguousarray(qv.astype(np.float32) * step_v[:, None].astype(np.float32)))
    return u @ v


def _error(original: torch.Tensor, restored: torch.Tensor, dtype: torch.dtype) -> float:
    a = original.reshape(-1)
    b = restored.to(dtype).double().reshape(-1)
    norm = float(a.norm())
    diff = float((a - b).norm())
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


def _factor_bits(qu: np.ndarray, qv: np.ndarray) -> float:
    return sum(entropy_bits(q) * q.size for q in (qu, qv) if q.size)


def encode_lowrank(name: str, tensor: torch.Tensor, *, rank: int | None = None, rel_error: float | None = None,
                   factor_rel_error: float | None = 0.01, bits: float | None = None,
                   fallback: bool = True) -> Encoded:
    """``tensor`` as quantized low-rank factors (kind ``LOW_RANK``).

    Give ``rank`` (the plan of :func:`select_ranks`; factors quantized to
    ``factor_rel_error`` each, or to ``bits`` per entry), or ``rel_error``: the
    smallest stored size whose reconstruction is within ``rel_error`` of the
    original, searched over a few splits of the error between truncation and
    quantization. With ``rel_error`` and ``fallback``, a tensor that does not
    factorize profitably is stored quantized instead (whichever is smaller).
    Tensors with fewer than 2 dimensions, or empty, are stored losslessly.
    The reported ``rel_error`` is that of the final reconstruction.
    """
    if not tensor.is_floating_point():
        raise UsageError(f"{name}: only floating-point tensors can be factorized")
    if tensor.dim() < 2 or tensor.numel() == 0:
        return encode_lossless(name, tensor)
    if (rank is None) == (rel_error is None):
        raise UsageError(f"{name}: give exactly one of rank or rel_error for the lowrank representation")
    if bits is not None:
        factor_rel_error = None
    if rank is None and not (isinstance(rel_error, (int, float)) and 0 < rel_error < 1):
        raise UsageError(f"{name}: rel_error must be in (0, 1), got {rel_error!r}")
    if rank is not None and factor_rel_error is None and bits is None:
        raise UsageError(f"{name}: give factor_rel_error or bits for the factors")
    if factor_rel_error is not None and not 0 < factor_rel_error < 1:
        raise UsageError(f"{name}: factor_rel_error must be in (0, 1), got {factor_rel_error!r}")
    if bits is not None and not 0 < bits <= 24:
        raise UsageError(f"{name}: bits must be in (0, 24], got {bits!r}")
    shape = list(tensor.shape)
    m, n = matrix_shape(shape)
    full = min(m, n)
    original = tensor.detach().cpu().double().reshape(m, n)
    if not bool(torch.isfinite(original).all()):
        raise UsageError(f"{name}: cannot factorize a tensor with NaN or inf; use the lossless representation")
    u, s, vh = thin_svd(original)

    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
            raise UsageError(f"{name}: rank must be an int in 1..{full} for a {m}×{n} matrix, got {rank!r}")
        qu, step_u, qv, step_v = _quantize_factors(u, s, vh, rank, factor_rel_error=factor_rel_error, bits=bits)
        err = _error(original, _product(qu, step_u, qv, step_v), tensor.dtype)
        chosen = (rank, qu, step_u, qv, step_v, err)
    else:
        chosen = _search_rel_error(original, tensor.dtype, u, s, vh, float(rel_error))
    encoded = _lowrank_sections(name, tensor, shape, m, n, chosen) if chosen is not None else None
    if rel_error is not None and fallback:
        dense = encode_quantized(name, tensor, rel_error=float(rel_error))
        if encoded is None or dense.file_bytes < encoded.file_bytes:
            return dense
    if encoded is None:
        raise UsageError(f"{name}: no rank of a {m}×{n} matrix meets rel_error {rel_error} with fewer parameters")
    return encoded


def _search_rel_error(original: torch.Tensor, dtype: torch.dtype, u: np.ndarray, s: np.ndarray, vh: np.ndarray,
                      rel_error: float):
    """The smallest (by entropy estimate) factorization within ``rel_error``, or None."""
    m, n = original.shape
    r0 = break_even_rank(m, n)
    tail = truncation_tails(s)
    norm2 = float(tail[0])
    if norm2 == 0:
        qu, su, qv, sv = _quantize_factors(u, s, vh, 1, factor_rel_error=0.5, bits=None)
        return (1, qu, su, qv, sv, _error(original, _product(qu, su, qv, sv), dtype))
    budget2 = rel_error**2 * norm2
    best, tried = None, set()
    for share in (0.5, 0.75, 0.9):  # share of the squared error spent on truncation
        fits = np.nonzero(tail[1:] <= share * budget2)[0]
        if not fits.size:
            continue
        rank = int(fits[0]) + 1
        if rank > r0 or rank in tried:
            continue
        tried.add(rank)
        head2 = norm2 - float(tail[rank])
        factor = math.sqrt(max(budget2 - float(tail[rank]), 0.0) / max(head2, 1e-300) / 2)
        factor = min(max(factor, 1e-6), 0.5)
        for _ in range(16):
            qu, su, qv, sv = _quantize_factors(u, s, vh, rank, factor_rel_error=factor, bits=None)
            err = _error(original, _product(qu, su, qv, sv), dtype)
            if err <= rel_error:
                cost = _factor_bits(qu, qv)
                if best is None or cost < best[0]:
                    best = (cost, (rank, qu, su, qv, sv, err))
                break
            factor *= 0.8
    return best[1] if best is not None else None


def _lowrank_sections(name: str, tensor: torch.Tensor, shape: list[int], m: int, n: int, chosen) -> Encoded:
    rank, qu, step_u, qv, step_v, err = chosen
    params = {"dtype": dtype_name(tensor.dtype), "shape": shape, "rank": int(rank), "view": [m, n]}
    steps = [(Codec.RAW, None), (Codec.ZSTD, {"level": 19})]
    sections = [
        PendingSection(name, encode_payload(b"", Codec.RAW), Kind.LOW_RANK, params),
        PendingSection(part_name(name, "u"), symbol_payload(qu), Kind.PART,
                       {"dtype": "int32", "shape": [m, int(rank)]}),
        PendingSection(part_name(name, "u_step"), smallest_payload(step_u.astype("<f4").tobytes(), steps), Kind.PART,
                       {"dtype": "float32", "shape": [int(rank)]}),
        PendingSection(part_name(name, "v"), symbol_payload(qv), Kind.PART,
                       {"dtype": "int32", "shape": [int(rank), n]}),
        PendingSection(part_name(name, "v_step"), smallest_payload(step_v.astype("<f4").tobytes(), steps), Kind.PART,
                       {"dtype": "float32", "shape": [int(rank)]}),
    ]
    return Encoded(name, "lowrank", sections, tensor.numel(), float(err))


# --------------------------------------------------------------------------- decoder


def check_lowrank_head(head: SectionInfo, reader: Reader) -> None:
    """Params of a ``LOW_RANK`` head (FORMAT.md §5.4), before any part is read."""
    label = f"{reader.name}: low-rank tensor {head.name!r}"
    shape = head.params.get("shape")
    if not isinstance(shape, list) or len(shape) < 2 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise FormatError(f"{label}: params.shape must list 2 or more positive dimensions, got {shape!r}")
    if head.params.get("dtype") not in ("float32", "float16", "bfloat16", "float64"):
        raise FormatError(f"{label}: params.dtype {head.params.get('dtype')!r} is not a float dtype")
    m, n = matrix_shape(shape)
    view = head.params.get("view")
    if view != [m, n]:
        raise FormatError(f"{label}: params.view is {view!r}, expected [{m}, {n}] for shape {shape}")
    rank = head.params.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
        raise FormatError(f"{label}: params.rank is {rank!r}, expected an int in 1..{min(m, n)} for a {m}×{n} matrix")
    if m * n * 4 > reader.limits.max_decoded_bytes:  # the float32 product, before the cast to dtype
        raise LimitError(f"{label}: a {m}×{n} float32 result exceeds the decoded-size limit "
                         f"{reader.limits.max_decoded_bytes} (Limits.max_decoded_bytes)")


def _factors(head: SectionInfo, reader: Reader) -> tuple[np.ndarray, np.ndarray]:
    """Validated float32 factors U [m, r], V [r, n] of a LOW_RANK head."""
    check_lowrank_head(head, reader)
    label = f"{reader.name}: low-rank tensor {head.name!r}"
    (m, n), rank = head.params["view"], head.params["rank"]
    expected = {"u": ("int32", (m, rank)), "u_step": ("float32", (rank,)),
                "v": ("int32", (rank, n)), "v_step": ("float32", (rank,))}
    parts = {}
    for part, (dtype_str, want) in expected.items():
        array = read_part(reader, head, part, dtype=dtype_str)
        if tuple(array.shape) != want:
            raise FormatError(f"{label}: part {part_name(head.name, part)!r} has shape {list(array.shape)}, "
                              f"expected {list(want)}")
        parts[part] = array
    for part in ("u_step", "v_step"):
        if not np.isfinite(parts[part]).all():
            raise FormatError(f"{label}: part {part_name(head.name, part)!r} holds non-finite steps")
    with np.errstate(over="ignore", invalid="ignore"):
        u = parts["u"].astype(np.float32) * parts["u_step"].astype(np.float32)[None, :]
        v = parts["v"].astype(np.float32) * parts["v_step"].astype(np.float32)[:, None]
    if not (np.isfinite(u).all() and np.isfinite(v).all()):
        raise FormatError(f"{label}: its factors overflow float32")
    return np.ascontiguousarray(u), np.ascontiguousarray(v)


def decode_lowrank(head: SectionInfo, reader: Reader) -> torch.Tensor:
    """The dense tensor U·V (float32 product, cast to the original dtype)."""
    u, v = _factors(head, reader)
    w = torch.from_numpy(u) @ torch.from_numpy(v)
    if not bool(torch.isfinite(w).all()):
        raise FormatError(f"{reader.name}: low-rank tensor {head.name!r} reconstructs to non-finite values")
    return w.reshape(head.params["shape"]).to(torch_dtype(head.params["dtype"]))


def build_lowrank_module(head: SectionInfo, reader: Reader, original: nn.Module) -> nn.Module:
    """``load_into`` hook: ``nn.Linear`` → :class:`LowRankLinear`, ``nn.Conv2d`` (groups 1, zero
    padding) → :class:`LowRankConv2d`; any other owner keeps its class and gets the dense weight."""
    u, v = _factors(head, reader)
    shape = head.params["shape"]
    weight = getattr(original, "weight", None)
    if not isinstance(weight, torch.Tensor) or list(weight.shape) != shape:
        got = list(weight.shape) if isinstance(weight, torch.Tensor) else None
        raise InputError(f"{reader.name}: {head.name!r} has shape {shape}, the model expects {got}")
    kw = {"device": weight.device, "dtype": weight.dtype}
    tu, tv = torch.from_numpy(u).to(**kw), torch.from_numpy(v).to(**kw)
    bias = getattr(original, "bias", None)
    # the original's bias Parameter is reused, not copied: load_into may load "<owner>.bias" after
    # this swap, into the storage of the original module's parameter
    if type(original) is nn.Linear:
        return LowRankLinear.from_factors(tu, tv, bias)
    if (type(original) is nn.Conv2d and original.groups == 1 and original.padding_mode == "zeros"
            and not isinstance(original.padding, str)):
        module = LowRankConv2d(original.in_channels, original.out_channels, tuple(original.kernel_size),
                               u.shape[1], stride=original.stride, padding=original.padding,
                               dilation=original.dilation, bias=bias is not None, **kw)
        with torch.no_grad():
            module.u.copy_(tu)
            module.v.copy_(tv)
        module.bias = bias
        return module
    with torch.no_grad():  # any other owner: the dense weight, in place
        weight.copy_((tu.float() @ tv.float()).reshape(shape).to(weight.dtype))
    return original

