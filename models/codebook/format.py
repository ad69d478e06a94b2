"""The ``CODEBOOK`` sections: encoder, head check, decoder and module builder.

Layout (kind ``CODEBOOK`` = 9, FORMAT.md §5.4). Head params:

- ``dtype``, ``shape`` — the original table, ``[V, d]``;
- ``M`` (subspaces, divides ``d``), ``K`` (centroids per codebook, 1…65536),
  ``stages`` (≥ 1; residual stages, summed);
- ``codebook`` — how the codebooks are stored: ``float16``, ``float32`` or
  ``quantized``.

Parts:

- ``#codes``: int32 ``[V, stages·M]`` (ANS coded), row ``v`` holds the codes of
  stage 0 subspaces 0…M−1, then stage 1, …; every code in ``0 … K−1``;
- ``#codebooks``: for ``float16`` / ``float32`` that dtype, shape
  ``[stages, M, K, d/M]`` (raw or zstd, whichever is smaller); for
  ``quantized`` int32 ``[stages·M, K·d/M]`` (ANS) with
- ``#steps``: float32 ``[stages·M, 1]`` (one step per codebook), the codebook
  value being ``q · step`` in float32 (as :mod:`ncz.models.quantized`).

Decoding: ``row[v] = Σ_s concat_m codebooks[s, m, codes[v, s·M + m]]``, the
stage sum evaluated left to right in float32, then cast to ``dtype``.

Decoders refuse (``FormatError``, naming the file and tensor) params of the
wrong type or range, ``M`` not dividing ``d``, parts of the wrong dtype or
shape, codes outside ``0 … K−1`` and non-finite codebooks.

Known limits: rows are approximated whatever their role (a ``padding_idx`` row
of zeros decodes to its nearest code, not to exact zeros); ``max_norm`` is
applied to the looked-up rows without renormalizing the stored table.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ncz.format import Codec, FormatError, InputError, Kind, Reader, SectionInfo, UsageError, encode_payload

from ..lossless import encode_lossless
from ..quantized import quantize
from ..representation import (
    Encoded,
    PendingSection,
    dtype_name,
    part_name,
    read_part,
    relative_error,
    smallest_payload,
    symbol_payload,
    tensor_label,
    torch_dtype,
)
from .module import CodebookEmbedding
from .pq import MAX_CENTROIDS, MAX_STAGES, assign_stages, product_quantize, reconstruct_table

__all__ = ["CODEBOOK_STORAGE", "encode_codebook", "check_codebook_head", "decode_codebook", "build_codebook_module"]

CODEBOOK_STORAGE = ("float16", "float32", "quantized")
_FLOATS = ("float16", "bfloat16", "float32", "float64")
_FLOAT_CODECS = [(Codec.RAW, None), (Codec.ZSTD, {"level": 19})]


def _store_codebooks(name: str, codebooks: torch.Tensor, storage: str,
                     rel_error: float) -> tuple[list[PendingSection], torch.Tensor]:
    """Parts holding the codebooks, and the codebooks exactly as the decoder will see them."""
    s, m, k, sub = codebooks.shape
    if storage in ("float16", "float32"):
        stored = codebooks.to(torch.float16 if storage == "float16" else torch.float32)
        data = stored.contiguous().numpy().astype("<f2" if storage == "float16" else "<f4").tobytes()
        payload = smallest_payload(data, _FLOAT_CODECS)
        part = PendingSection(part_name(name, "codebooks"), payload, Kind.PART,
                              {"dtype": storage, "shape": [s, m, k, sub]})
        return [part], stored.float()
    w2 = codebooks.reshape(s * m, k * sub).numpy().astype(np.float32)
    q, steps, _ = quantize(w2, rel_error=rel_error, granularity="channel")
    restored = torch.from_numpy(q.astype(np.float32) * steps).reshape(s, m, k, sub)
    parts = [
        PendingSection(part_name(name, "codebooks"), symbol_payload(q), Kind.PART,
                       {"dtype": "int32", "shape": [s * m, k * sub]}),
        PendingSection(part_name(name, "steps"),
                       smallest_payload(steps.astype("<f4").tobytes(), _FLOAT_CODECS),
                       Kind.PART, {"dtype": "float32", "shape": [s * m, 1]}),
    ]
    return parts, restored


def _fixed_pq(fixed: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(fixed, CodebookEmbedding):
        return fixed.codebooks.detach().float().cpu(), fixed.codes.long().cpu()
    if isinstance(fixed, (tuple, list)) and len(fixed) == 2:
        books, codes = (torch.as_tensor(t) for t in fixed)
        if books.dim() != 4:
            raise UsageError(f"fixed codebooks must be [stages, M, K, d/M], got {list(books.shape)}")
        return books.detach().float().cpu(), codes.detach().long().cpu().reshape(codes.shape[0], -1)
    raise UsageError("fixed must be a CodebookEmbedding or a (codebooks, codes) pair")


def encode_codebook(name: str, tensor: torch.Tensor, *, subspaces: int | None = None, centroids: int = 256,
                    stages: int = 1, iterations: int = 20, seed: int = 0, codebook: str = "quantized",
                    codebook_rel_error: float = 0.01, max_train_rows: int | None = 131072,
                    codebooks: torch.Tensor | None = None, fixed: Any = None) -> Encoded:
    """The ``codebook`` representation of a 2-D table (recipe name ``"codebook"``).

    ``subspaces`` (M, default: row width ≤ 8), ``centroids`` (K), ``stages``:
    see :func:`product_quantize`. ``codebook`` picks how codebooks are stored
    (``quantized`` at ``codebook_rel_error``, the default, or ``float16`` /
    ``float32``); with lossy storage the codes are re-assigned against the stored
    codebooks. ``fixed`` (a :class:`CodebookEmbedding` or ``(codebooks, codes)``,
    e.g. from :func:`finetune_codebooks`) stores that quantization as it is
    instead of running k-means (see :func:`packable_state_dict`); ``codebooks``
    (``[S, M, K, d/M]``, e.g. from an earlier :func:`product_quantize`) skips
    k-means but assigns the codes to this table.
    """
    if codebook not in CODEBOOK_STORAGE:
        raise UsageError(f"{name}: codebook storage must be one of {CODEBOOK_STORAGE}, got {codebook!r}")
    if not tensor.is_floating_point():
        raise UsageError(f"{name}: only floating-point tables can be product-quantized")
    if tensor.dim() != 2:
        raise UsageError(f"{name}: the codebook representation is for 2-D tables, got shape {list(tensor.shape)}")
    if tensor.numel() == 0:
        return encode_lossless(name, tensor)
    table = tensor.detach().float().cpu()
    v, d = table.shape
    if fixed is not None:
        books, codes = _fixed_pq(fixed)
        s, m, k, sub = books.shape
        if m * sub != d or codes.shape != (v, s * m):
            raise UsageError(f"{name}: fixed codebooks {list(books.shape)} / codes {list(codes.shape)} do not fit "
                             f"a [{v}, {d}] table")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
            raise UsageError(f"{name}: fixed codes must lie in 0..{k - 1}")
    elif codebooks is not None:
        books = torch.as_tensor(codebooks).detach().float().cpu()
        if books.dim() != 4 or books.shape[1] * books.shape[3] != d or not 1 <= books.shape[2] <= MAX_CENTROIDS:
            raise UsageError(f"{name}: codebooks {list(books.shape)} do not fit a [{v}, {d}] table")
        s, m, k, sub = books.shape
        codes = assign_stages(table, books)
    else:
        books, codes = product_quantize(table, subspaces=subspaces, centroids=centroids, stages=stages,
                                        iterations=iterations, seed=seed, max_train_rows=max_train_rows)
        s, m, k, sub = books.shape
    parts, stored = _store_codebooks(name, books, codebook, codebook_rel_error)
    if fixed is None and codebook != "float32":
        codes = assign_stages(table, stored)  # best codes for the codebooks the decoder will see
    restored = reconstruct_table(stored, codes).to(tensor.dtype)
    err = relative_error(tensor, restored)
    params = {"dtype": dtype_name(tensor.dtype), "shape": [v, d], "M": m, "K": k, "stages": s, "codebook": codebook}
    head = PendingSection(name, encode_payload(b"", Codec.RAW), Kind.CODEBOOK, params)
    code_part = PendingSection(part_name(name, "codes"),
                               symbol_payload(codes.numpy()), Kind.PART,
                               {"dtype": "int32", "shape": [v, s * m]})
    return Encoded(name, f"codebook/M{m}K{k}S{s}", [head, code_part, *parts], tensor.numel(), err)


def _int_param(head: SectionInfo, label: str, key: str, lo: int, hi: int) -> int:
    value = head.params.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise FormatError(f"{label}: params.{key} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def check_codebook_head(head: SectionInfo, reader: Reader) -> None:
    """Params of a ``CODEBOOK`` head (FORMAT.md §5.4), before any part is read."""
    label, shape = tensor_label(reader, head), head.params.get("shape")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape)):
        raise FormatError(f"{label}: a codebook table needs params.shape [rows, width], got {shape!r}")
    d = shape[1]
    dtype = head.params.get("dtype")
    if dtype not in _FLOATS:
        raise FormatError(f"{label}: params.dtype must be one of {_FLOATS}, got {dtype!r}")
    m = _int_param(head, label, "M", 1, max(d, 1))
    _int_param(head, label, "K", 1, MAX_CENTROIDS)
    _int_param(head, label, "stages", 1, MAX_STAGES)
    if d % m:
        raise FormatError(f"{label}: M = {m} does not divide the row width {d}")
    storage = head.params.get("codebook")
    if storage not in CODEBOOK_STORAGE:
        raise FormatError(f"{label}: params.codebook must be one of {CODEBOOK_STORAGE}, got {storage!r}")


def _read_codebook(head: SectionInfo, reader: Reader) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(codebooks float32 [S, M, K, d/M], codes int64 [V, S·M], dtype name), validated against the head."""
    check_codebook_head(head, reader)
    label, params = tensor_label(reader, head), head.params
    (v, d), m, k, s, storage = params["shape"], params["M"], params["K"], params["stages"], params["codebook"]
    sub = d // m
    codes = read_part(reader, head, "codes", dtype="int32")
    if codes.shape != (v, s * m):
        raise FormatError(f"{label}: codes have shape {list(codes.shape)}, expected {[v, s * m]}")
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= k):
        raise FormatError(f"{label}: codes must lie in 0..{k - 1}, found {int(codes.min())}..{int(codes.max())}")
    if storage == "quantized":
        q = read_part(reader, head, "codebooks", dtype="int32")
        steps = read_part(reader, head, "steps", dtype="float32")
        if q.shape != (s * m, k * sub):
            raise FormatError(f"{label}: quantized codebooks have shape {list(q.shape)}, expected {[s * m, k * sub]}")
        if steps.shape != (s * m, 1):
            raise FormatError(f"{label}: steps have shape {list(steps.shape)}, expected {[s * m, 1]}")
        books = (q.astype(np.float32) * steps.astype(np.float32)).reshape(s, m, k, sub)
    else:
        raw = read_part(reader, head, "codebooks", dtype=storage)
        if raw.shape != (s, m, k, sub):
            raise FormatError(f"{label}: codebooks have shape {list(raw.shape)}, expected {[s, m, k, sub]}")
        books = raw.astype(np.float32)
    if not np.isfinite(books).all():
        raise FormatError(f"{label}: codebooks hold NaN or inf")
    return (torch.from_numpy(np.ascontiguousarray(books)), torch.from_numpy(codes.astype(np.int64)),
            params["dtype"])


def decode_codebook(head: SectionInfo, reader: Reader) -> torch.Tensor:
    """The dense ``[V, d]`` table of a ``CODEBOOK`` head."""
    books, codes, dtype = _read_codebook(head, reader)
    return reconstruct_table(books, codes).to(torch_dtype(dtype))


def build_codebook_module(head: SectionInfo, reader: Reader, original: nn.Module) -> nn.Module:
    """``load_into`` hook: ``nn.Embedding`` → :class:`CodebookEmbedding`; any other owner (e.g.
    a tied output layer) keeps its class and gets the dense weight."""
    books, codes, dtype = _read_codebook(head, reader)
    weight = getattr(original, "weight", None)
    if weight is None or list(weight.shape) != list(head.params["shape"]):
        raise InputError(f"{reader.name}: {head.name!r} has shape {head.params['shape']}, the model expects "
                         f"{None if weight is None else list(weight.shape)}")
    if isinstance(original, nn.Embedding):
        return CodebookEmbedding(books, codes, padding_idx=original.padding_idx, max_norm=original.max_norm,
                                 norm_type=original.norm_type, dtype=weight.dtype)
    with torch.no_grad():  # not an embedding (e.g. a tied output layer): fill its weight densely
        weight.copy_(reconstruct_table(books, codes).to(torch_dtype(dtype)).to(weight.dtype))
    return original

