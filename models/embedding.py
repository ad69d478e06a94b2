"""Product-quantized embedding tables: codebooks + per-row codes, optionally learned with the task.

An embedding table E (V × d) is mostly redundant: its rows live near a
low-complexity set. Product quantization (Jégou et al., "Product Quantization
for Nearest Neighbor Search", TPAMI 2011) splits each row into ``M`` subvectors
of ``d/M`` values and replaces each subvector by the nearest of ``K`` centroids
learned by k-means for that subspace, so a row costs ``M·log2 K`` bits plus a
shared ``K × d`` codebook. Shu & Nakayama ("Compressing Word Embeddings via
Deep Compositional Code Learning", ICLR 2018) and DPQ (Chen et al.,
"Differentiable Product Quantization for End-to-End Embedding Compression",
ICML 2020) learn the codes/codebooks with the downstream loss; Sathyendra et
al. ("Extreme Model Compression for On-device Natural Language Understanding",
COLING 2020) combine PQ of the embedding table with quantization of the rest
and task-aware fine-tuning for ~97 % smaller NLU models at < 4 % accuracy loss.
This module provides all three pieces:

- :func:`product_quantize`: seeded, vectorized k-means (k-means++ init, Lloyd
  iterations batched over subspaces, in torch) per subspace; with ``stages > 1``
  further stages quantize the residual (residual/additive quantization,
  Chen et al., "Approximate Nearest Neighbor Search by Residual Vector
  Quantization", Sensors 2010).
- the ``codebook`` representation (kind ``CODEBOOK``) for model archives, with a
  decoder and a module builder: :func:`ncz.models.load_into` swaps an
  ``nn.Embedding`` for a :class:`CodebookEmbedding` that keeps only codebooks
  and codes in memory.
- :func:`finetune_codebooks`: task-aware training of the codebooks (and the rest
  of the model) with straight-through nearest-centroid codes or annealed
  Gumbel-softmax assignments (DPQ's SX / gumbel variants).

Within each (stage, subspace) the centroids are relabelled by decreasing usage,
so code 0 is the most used everywhere. The usage histograms of different
subspaces then look alike (all decreasing), and one ANS table fitted to all
codes is as small as one table per subspace (on a trained CLINC150 table,
within 0.1 % of the summed per-subspace entropies) while storing one table.
k-means clusters differ in size, so codes cost a little under ``log2 K`` bits
(~2–3 % less at K = 256 there); the big saving is PQ itself.

Residual stages help at equal code bits (M = 4 × 2 stages beat M = 8 × 1 stage
at K = 256: relative error 0.68 vs 0.71), but each stage brings its own K × d
codebook, so at equal *bytes* on small vocabularies plain PQ is usually as good.
On CLINC150 (``bench/nlu_embedding.py``) PQ M = 8, K = 256 with task-aware
straight-through fine-tuning made the whole intent model 97.3 % smaller than
fp32 at −1.5 accuracy points (post-training PQ alone: −8.0 points).

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

Decoders refuse (``InputError``, naming the file and tensor) params of the
wrong type or range, ``M`` not dividing ``d``, parts of the wrong dtype or
shape, codes outside ``0 … K−1`` and non-finite codebooks.

Known limits: rows are approximated whatever their role (a ``padding_idx`` row
of zeros decodes to its nearest code, not to exact zeros); ``max_norm`` is
applied to the looked-up rows without renormalizing the stored table.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ncz.format import Codec, InputError, Kind, Reader, SectionInfo, UsageError, encode_payload

from .archive import register_encoder
from .lossless import encode_lossless
from .quantized import quantize
from .recipe import Recipe, Rule
from .representation import (
    Encoded,
    PendingSection,
    dtype_name,
    part_name,
    read_part,
    register_decoder,
    register_module,
    relative_error,
    smallest_payload,
    symbol_payload,
    torch_dtype,
)

__all__ = [
    "product_quantize",
    "reconstruct",
    "encode_codebook",
    "decode_codebook",
    "CodebookEmbedding",
    "finetune_codebooks",
    "packable_state_dict",
    "CODEBOOK_STORAGE",
]

CODEBOOK_STORAGE = ("float16", "float32", "quantized")
MAX_CENTROIDS = 1 << 16
MAX_STAGES = 64
_FLOATS = ("float16", "bfloat16", "float32", "float64")
_FLOAT_CODECS = [(Codec.RAW, None), (Codec.ZSTD, {"level": 19})]
_CHUNK_ELEMENTS = 1 << 23  # distance-matrix elements per chunk (32 MiB of float32)

Progress = Callable[[int, int, str], None]


# --- k-means ------------------------------------------------------------------------------


def _distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared distances [B, N, K] up to the per-row constant ‖x‖² (argmin is all
    that is needed): ‖c‖² − 2·x·c, one batched matmul (2–3× faster than direct
    differences on CPU)."""
    return torch.baddbmm(c.square().sum(-1).unsqueeze(1), x, c.transpose(1, 2), alpha=-2)


def _assign(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid and its squared distance, batched over subspaces, chunked over rows."""
    b, n, _ = x.shape
    k = c.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * k))
    codes = torch.empty(b, n, dtype=torch.long, device=x.device)
    dist = torch.empty(b, n, dtype=x.dtype, device=x.device)
    for start in range(0, n, chunk):
        part = x[:, start:start + chunk]
        best, idx = _distances(part, c).min(dim=2)
        codes[:, start:start + chunk] = idx
        dist[:, start:start + chunk] = (best + part.square().sum(-1)).clamp_min_(0)
    return codes, dist


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007), one codebook per batch entry."""
    b, n, dim = x.shape
    rows = torch.arange(b)
    centroids = torch.empty(b, k, dim, dtype=x.dtype)
    first = torch.randint(n, (b,), generator=generator)
    centroids[:, 0] = x[rows, first]
    d2 = (x - centroids[:, :1]).square().sum(-1)
    for j in range(1, k):
        weights = d2.clamp_min(0).double()
        empty = weights.sum(1) <= 0
        if bool(empty.any()):  # all points already covered: any point will do
            weights[empty] = 1.0
        pick = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        centroids[:, j] = x[rows, pick]
        d2 = torch.minimum(d2, (x - centroids[:, j:j + 1]).square().sum(-1))
    return centroids


def _kmeans(x: torch.Tensor, k: int, *, iterations: int, generator: torch.Generator,
            progress: Progress | None = None, label: str = "k-means") -> torch.Tensor:
    """Lloyd's algorithm batched over B independent problems: x [B, N, D] → centroids [B, k, D]."""
    b, n, dim = x.shape
    centroids = _kmeans_pp(x, k, generator)
    previous = None
    offsets = (torch.arange(b) * k).unsqueeze(1)
    for it in range(iterations):
        codes, dist = _assign(x, centroids)
        if previous is not None and torch.equal(codes, previous):
            break
        previous = codes
        flat = (codes + offsets).reshape(-1)
        sums = torch.zeros(b * k, dim, dtype=torch.float64).index_add_(0, flat, x.reshape(-1, dim).double())
        counts = torch.bincount(flat, minlength=b * k).reshape(b, k)
        sums = sums.reshape(b, k, dim)
        filled = counts > 0
        means = sums / counts.clamp_min(1).unsqueeze(2)
        centroids = torch.where(filled.unsqueeze(2), means, centroids.double()).to(x.dtype)
        for batch in torch.nonzero((~filled).any(1)).flatten().tolist():
            empty = torch.nonzero(~filled[batch]).flatten()
            far = torch.argsort(dist[batch], descending=True, stable=True)[: empty.numel()]
            centroids[batch, empty[: far.numel()]] = x[batch, far]  # re-seed at the worst-served points
        if progress:
            progress(it + 1, iterations, label)
    return centroids


def _split(table: torch.Tensor, subspaces: int) -> torch.Tensor:
    """[V, d] → [M, V, d/M]."""
    v, d = table.shape
    return table.reshape(v, subspaces, d // subspaces).permute(1, 0, 2).contiguous()


def reconstruct(codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Rows from codebooks ``[S, M, K, d/M]`` and codes ``[N, S·M]`` (or ``[N, S, M]``) → ``[N, d]``.

    Stages are summed left to right, so this is bit-identical wherever it runs
    (decoder, :class:`CodebookEmbedding`, the encoder's error report).
    """
    s, m, k, sub = codebooks.shape
    n = codes.shape[0]
    index = codes.reshape(n, s, m).long() + (torch.arange(s * m, device=codes.device) * k).reshape(s, m)
    picked = codebooks.reshape(s * m * k, sub)[index]  # [N, S, M, sub]
    out = picked[:, 0]
    for stage in range(1, s):
        out = out + picked[:, stage]
    return out.reshape(n, m * sub)


def _reconstruct_table(codebooks: torch.Tensor, codes: torch.Tensor, rows_per_chunk: int = 65536) -> torch.Tensor:
    """:func:`reconstruct` of a whole table in row chunks (bounded temporary memory, same values)."""
    n = codes.shape[0]
    if n <= rows_per_chunk:
        return reconstruct(codebooks, codes)
    out = torch.empty(n, codebooks.shape[1] * codebooks.shape[3], dtype=codebooks.dtype, device=codebooks.device)
    for start in range(0, n, rows_per_chunk):
        out[start:start + rows_per_chunk] = reconstruct(codebooks, codes[start:start + rows_per_chunk])
    return out


def _assign_stages(table: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Greedy codes [V, S·M] for given codebooks: each stage takes the nearest centroid of the residual."""
    s, m, k, sub = codebooks.shape
    residual = table.float()
    codes = []
    for stage in range(s):
        c, _ = _assign(_split(residual, m), codebooks[stage])  # [M, V]
        codes.append(c.t())
        residual = residual - reconstruct(codebooks[stage:stage + 1], c.t().contiguous())
    return torch.cat(codes, dim=1)


def _default_subspaces(d: int) -> int:
    """The fewest subspaces whose width is at most 8 (a common PQ operating point)."""
    for m in range(1, d + 1):
        if d % m == 0 and d // m <= 8:
            return m
    return max(d, 1)


def product_quantize(table: torch.Tensor, *, subspaces: int | None = None, centroids: int = 256, stages: int = 1,
                     iterations: int = 20, seed: int = 0, max_train_rows: int | None = 131072,
                     progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebooks float32 ``[S, M, K, d/M]``, codes int64 ``[V, S·M]``) for a 2-D ``table``.

    Stage s runs k-means on the residual left by stages < s. k-means trains on at
    most ``max_train_rows`` seeded random rows (all rows when ``None``); every row
    is then assigned. ``K`` is reduced to ``V`` when the table has fewer rows.
    Centroids are relabelled by decreasing usage (see the module docstring).
    """
    if table.dim() != 2:
        raise UsageError(f"product quantization needs a 2-D table, got shape {list(table.shape)}")
    v, d = table.shape
    if v == 0 or d == 0:
        raise UsageError("product quantization needs a non-empty table")
    m = _default_subspaces(d) if subspaces is None else int(subspaces)
    if m < 1 or d % m:
        raise UsageError(f"subspaces {m} must be ≥ 1 and divide the row length {d}")
    if not 1 <= int(centroids) <= MAX_CENTROIDS:
        raise UsageError(f"centroids must lie in 1..{MAX_CENTROIDS}, got {centroids}")
    if not 1 <= int(stages) <= MAX_STAGES:
        raise UsageError(f"stages must lie in 1..{MAX_STAGES}, got {stages}")
    if iterations < 0:
        raise UsageError("iterations must be ≥ 0")
    k = min(int(centroids), v)
    data = table.detach().float().cpu()
    if not bool(torch.isfinite(data).all()):
        raise UsageError("cannot product-quantize a table with NaN or inf")
    generator = torch.Generator().manual_seed(int(seed))
    train_index = None
    if max_train_rows is not None and v > max_train_rows:
        train_index = torch.randperm(v, generator=generator)[:max_train_rows].sort().values
    books = []
    residual = data
    for stage in range(int(stages)):
        train = residual if train_index is None else residual[train_index]
        book = _kmeans(_split(train, m), k, iterations=iterations, generator=generator, progress=progress,
                       label=f"k-means stage {stage}")
        books.append(book)
        codes, _ = _assign(_split(residual, m), book)
        residual = residual - reconstruct(book.unsqueeze(0), codes.t().contiguous())
    codebooks = torch.stack(books)
    codes = _assign_stages(data, codebooks)
    return _relabel(codebooks, codes)


def _relabel(codebooks: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Permute each codebook so code 0 is its most used centroid (ties: lower old label first)."""
    s, m, k, sub = codebooks.shape
    books = codebooks.reshape(s * m, k, sub)
    new_codes = torch.empty_like(codes)
    new_books = torch.empty_like(books)
    for j in range(s * m):
        counts = torch.bincount(codes[:, j], minlength=k)
        order = torch.argsort(-counts, stable=True)  # new label → old label
        rank = torch.empty_like(order)
        rank[order] = torch.arange(k)
        new_books[j] = books[j, order]
        new_codes[:, j] = rank[codes[:, j]]
    return new_books.reshape(s, m, k, sub), new_codes


# --- the archive representation ---------------------------------------------------------


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
        codes = _assign_stages(table, books)
    else:
        books, codes = product_quantize(table, subspaces=subspaces, centroids=centroids, stages=stages,
                                        iterations=iterations, seed=seed, max_train_rows=max_train_rows)
        s, m, k, sub = books.shape
    parts, stored = _store_codebooks(name, books, codebook, codebook_rel_error)
    if fixed is None and codebook != "float32":
        codes = _assign_stages(table, stored)  # best codes for the codebooks the decoder will see
    restored = _reconstruct_table(stored, codes).to(tensor.dtype)
    err = relative_error(tensor, restored)
    params = {"dtype": dtype_name(tensor.dtype), "shape": [v, d], "M": m, "K": k, "stages": s, "codebook": codebook}
    head = PendingSection(name, encode_payload(b"", Codec.RAW), Kind.CODEBOOK, params)
    code_part = PendingSection(part_name(name, "codes"),
                               symbol_payload(codes.numpy()), Kind.PART,
                               {"dtype": "int32", "shape": [v, s * m]})
    return Encoded(name, f"codebook/M{m}K{k}S{s}", [head, code_part, *parts], tensor.numel(), err)


def _int_param(head: SectionInfo, reader: Reader, key: str, lo: int, hi: int) -> int:
    value = head.params.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InputError(f"{reader.name}: {head.name!r}: params.{key} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def _read_codebook(head: SectionInfo, reader: Reader) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(codebooks float32 [S, M, K, d/M], codes int64 [V, S·M], dtype name), validated against the head."""
    where = f"{reader.name}: {head.name!r}"
    shape = head.params.get("shape")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape)):
        raise InputError(f"{where}: a codebook table needs params.shape [rows, width], got {shape!r}")
    v, d = shape
    dtype = head.params.get("dtype")
    if dtype not in _FLOATS:
        raise InputError(f"{where}: params.dtype must be one of {_FLOATS}, got {dtype!r}")
    m = _int_param(head, reader, "M", 1, max(d, 1))
    k = _int_param(head, reader, "K", 1, MAX_CENTROIDS)
    s = _int_param(head, reader, "stages", 1, MAX_STAGES)
    if d % m:
        raise InputError(f"{where}: M = {m} does not divide the row width {d}")
    sub = d // m
    storage = head.params.get("codebook")
    if storage not in CODEBOOK_STORAGE:
        raise InputError(f"{where}: params.codebook must be one of {CODEBOOK_STORAGE}, got {storage!r}")
    codes = read_part(reader, head, "codes", dtype="int32")
    if codes.shape != (v, s * m):
        raise InputError(f"{where}: codes have shape {list(codes.shape)}, expected {[v, s * m]}")
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= k):
        raise InputError(f"{where}: codes must lie in 0..{k - 1}, found {int(codes.min())}..{int(codes.max())}")
    if storage == "quantized":
        q = read_part(reader, head, "codebooks", dtype="int32")
        steps = read_part(reader, head, "steps", dtype="float32")
        if q.shape != (s * m, k * sub):
            raise InputError(f"{where}: quantized codebooks have shape {list(q.shape)}, expected {[s * m, k * sub]}")
        if steps.shape != (s * m, 1):
            raise InputError(f"{where}: steps have shape {list(steps.shape)}, expected {[s * m, 1]}")
        books = (q.astype(np.float32) * steps.astype(np.float32)).reshape(s, m, k, sub)
    else:
        raw = read_part(reader, head, "codebooks", dtype=storage)
        if raw.shape != (s, m, k, sub):
            raise InputError(f"{where}: codebooks have shape {list(raw.shape)}, expected {[s, m, k, sub]}")
        books = raw.astype(np.float32)
    if not np.isfinite(books).all():
        raise InputError(f"{where}: codebooks hold NaN or inf")
    return (torch.from_numpy(np.ascontiguousarray(books)), torch.from_numpy(codes.astype(np.int64)), dtype)


def decode_codebook(head: SectionInfo, reader: Reader) -> torch.Tensor:
    """The dense ``[V, d]`` table of a ``CODEBOOK`` head."""
    books, codes, dtype = _read_codebook(head, reader)
    return _reconstruct_table(books, codes).to(torch_dtype(dtype))


# --- the compact module -----------------------------------------------------------------


def _code_dtype(k: int) -> torch.dtype:
    return torch.uint8 if k <= 256 else torch.int16 if k <= 32768 else torch.int32


class CodebookEmbedding(nn.Module):
    """An embedding whose rows are looked up as sums of centroids: memory ≈ codebooks + codes.

    ``codebooks`` ``[S, M, K, d/M]`` is a trainable float32 parameter; ``codes``
    ``[V, S·M]`` is a buffer of the smallest integer type holding ``K`` values
    (uint8 up to 256). ``forward`` gives exactly the rows of the decoded table
    (:func:`reconstruct`), cast to ``dtype``. ``padding_idx`` is kept for
    compatibility (its row is whatever its codes say); ``max_norm`` renormalizes
    the looked-up rows (the stored table is not modified).
    """

    def __init__(self, codebooks: torch.Tensor, codes: torch.Tensor, *, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0, dtype: torch.dtype = torch.float32):
        super().__init__()
        if codebooks.dim() != 4:
            raise UsageError(f"codebooks must be [stages, M, K, d/M], got {list(codebooks.shape)}")
        s, m, k, sub = codebooks.shape
        codes = torch.as_tensor(codes).reshape(codes.shape[0], -1)
        if codes.shape[1] != s * m:
            raise UsageError(f"codes must be [V, {s * m}], got {list(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
            raise UsageError(f"codes must lie in 0..{k - 1}")
        self.codebooks = nn.Parameter(codebooks.detach().float().clone())
        self.register_buffer("codes", codes.to(_code_dtype(k)).contiguous())
        self.num_embeddings = int(codes.shape[0])
        self.embedding_dim = m * sub
        if padding_idx is not None and padding_idx < 0:
            padding_idx += self.num_embeddings
        self.padding_idx = padding_idx
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.dtype = dtype

    @property
    def stages(self) -> int:
        return self.codebooks.shape[0]

    @property
    def subspaces(self) -> int:
        return self.codebooks.shape[1]

    @property
    def centroids(self) -> int:
        return self.codebooks.shape[2]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = reconstruct(self.codebooks, self.codes[flat])
        if self.max_norm is not None:
            norms = rows.norm(p=self.norm_type, dim=1, keepdim=True)
            rows = rows * torch.where(norms > self.max_norm, self.max_norm / (norms + 1e-7), torch.ones_like(norms))
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def dense(self) -> torch.Tensor:
        """The whole table ``[V, d]`` (materialized; for export and checks)."""
        return _reconstruct_table(self.codebooks, self.codes).to(self.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, M={self.subspaces}, K={self.centroids}, "
                f"stages={self.stages}" + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""))


def _build_module(head: SectionInfo, reader: Reader, original: nn.Module) -> nn.Module:
    books, codes, dtype = _read_codebook(head, reader)
    weight = getattr(original, "weight", None)
    if weight is None or list(weight.shape) != list(head.params["shape"]):
        raise InputError(f"{reader.name}: {head.name!r} has shape {head.params['shape']}, the model expects "
                         f"{None if weight is None else list(weight.shape)}")
    if isinstance(original, nn.Embedding):
        return CodebookEmbedding(books, codes, padding_idx=original.padding_idx, max_norm=original.max_norm,
                                 norm_type=original.norm_type, dtype=weight.dtype)
    with torch.no_grad():  # not an embedding (e.g. a tied output layer): fill its weight densely
        weight.copy_(_reconstruct_table(books, codes).to(torch_dtype(dtype)).to(weight.dtype))
    return original


# --- task-aware training ------------------------------------------------------------------


class _TrainablePQ(nn.Module):
    """An embedding trained through its product quantization (DPQ, Chen et al. 2020).

    Keeps a continuous table ``e`` (the DPQ "query") and trainable codebooks.
    Forward quantizes the looked-up rows stage by stage:

    - ``straight-through``: nearest centroid; output ``q + e − sg(e)`` — the
      value is the quantized row, the task gradient reaches both the chosen
      centroids and ``e`` (so codes move when ``e`` crosses a cell border);
    - ``gumbel``: soft assignment ``softmax((−‖r − c‖²/scale + g)/τ)`` with
      Gumbel noise g (Jang et al. 2017), τ annealed geometrically; the last
      ``hard_fraction`` of the steps uses the noise-free nearest centroid with a
      straight-through gradient, i.e. exactly the codes the final model will
      hold (on CLINC150 the soft phase alone left a train/test mismatch: a
      longer hard phase did better, and plain straight-through best).

    A commitment term ‖e − sg(q)‖² / ‖sg(e)‖² (VQ-VAE, van den Oord et al. 2017)
    keeps ``e`` near its cell so the final nearest-centroid codes agree with training.
    """

    def __init__(self, weight: torch.Tensor, codebooks: torch.Tensor, *, method: str, padding_idx: int | None,
                 commitment: float, scales: list[float], seed: int):
        super().__init__()
        self.e = nn.Parameter(weight.detach().float().clone())
        self.codebooks = nn.Parameter(codebooks.detach().float().clone())
        self.method = method
        self.padding_idx = padding_idx
        self.commitment = commitment
        self.scales = scales
        self.tau = 1.0
        self.hard = method == "straight-through"
        self.aux = torch.zeros((), device=self.e.device)
        self.generator = torch.Generator(device=self.e.device).manual_seed(seed)
        if padding_idx is not None:  # as nn.Embedding: the padding row gets no gradient
            self.e.register_hook(lambda grad: grad.index_fill(0, torch.tensor([padding_idx], device=grad.device), 0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        e = self.e[unique]
        s, m, k, sub = self.codebooks.shape
        residual = e
        total = torch.zeros_like(e)
        for stage in range(s):
            parts = residual.reshape(-1, m, sub).transpose(0, 1)  # [M, n, sub]
            book = self.codebooks[stage]  # [M, K, sub]
            if self.hard:
                with torch.no_grad():
                    index = _distances(parts, book).argmin(-1)  # [M, n]
                q = torch.gather(book, 1, index.unsqueeze(-1).expand(-1, -1, sub))
            else:
                d2 = (parts.square().sum(-1, keepdim=True) - 2 * parts @ book.transpose(1, 2)
                      + book.square().sum(-1).unsqueeze(1))  # [M, n, K], differentiable
                u = torch.rand(d2.shape, generator=self.generator, device=d2.device).clamp_(1e-10, 1 - 1e-10)
                logits = (-d2 / self.scales[stage] - torch.log(-torch.log(u))) / self.tau
                q = torch.softmax(logits, -1) @ book
            q = q.transpose(0, 1).reshape(-1, m * sub)
            total = total + q
            residual = e - total
        out = total + e - e.detach() if self.hard else total
        denom = e.detach().square().mean().clamp_min(1e-12)
        self.aux = self.aux + self.commitment * (e - total.detach()).square().mean() / denom
        return out[inverse].reshape(*ids.shape, m * sub)


def _module_name(model: nn.Module, name: str) -> str:
    if name.endswith(".weight"):
        name = name[: -len(".weight")]
    try:
        model.get_submodule(name)
    except AttributeError:
        raise UsageError(f"the model has no module {name!r}") from None
    return name


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def finetune_codebooks(model: nn.Module, embedding_name: str, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                       data_iter: Iterable, *, steps: int, lr: float, method: str = "straight-through",
                       subspaces: int | None = None, centroids: int = 256, stages: int = 1,
                       codebooks: torch.Tensor | None = None, train_rest: bool = True, rest_lr: float | None = None,
                       commitment: float = 0.25, tau: tuple[float, float] = (1.0, 0.05), hard_fraction: float = 0.5,
                       iterations: int = 20, seed: int = 0, progress: Progress | None = None) -> nn.Module:
    """Learn the embedding's product quantization jointly with the task; returns ``model``.

    The embedding ``embedding_name`` (an ``nn.Embedding``, or a
    :class:`CodebookEmbedding` to continue from) is initialized by k-means
    (:func:`product_quantize` with ``subspaces``, ``centroids``, ``stages``) or
    from the given ``codebooks`` ``[S, M, K, d/M]``,
    replaced by a differentiable PQ embedding (see :class:`_TrainablePQ` for
    ``method`` = ``"straight-through"`` or ``"gumbel"``) and trained with Adam on
    ``loss_fn(model, batch)`` + the commitment term for ``steps`` batches of
    ``data_iter`` (re-iterated when it runs out, if it can be). With
    ``train_rest`` the other parameters train too (at ``rest_lr``, default
    ``lr``). Afterwards every row gets its nearest-centroid codes and the module
    is swapped, in place, for a :class:`CodebookEmbedding`; the model keeps its
    train/eval mode. ``progress(step, steps, "loss …")`` is called per step.
    """
    if method not in ("straight-through", "gumbel"):
        raise UsageError(f"method must be 'straight-through' or 'gumbel', got {method!r}")
    if steps < 0 or lr <= 0:
        raise UsageError("steps must be ≥ 0 and lr > 0")
    if not (0 <= hard_fraction <= 1 and tau[0] > 0 and tau[1] > 0):
        raise UsageError("hard_fraction must lie in [0, 1] and both temperatures be > 0")
    name = _module_name(model, embedding_name)
    original = model.get_submodule(name)
    if isinstance(original, CodebookEmbedding):
        weight, books = original.dense().detach().float(), original.codebooks.detach()
        padding_idx, max_norm, norm_type = original.padding_idx, original.max_norm, original.norm_type
        dtype = original.dtype
    elif isinstance(original, nn.Embedding):
        weight = original.weight.detach().float()
        if codebooks is not None:
            books = torch.as_tensor(codebooks).detach().float().to(weight.device)
            if books.dim() != 4 or books.shape[1] * books.shape[3] != weight.shape[1]:
                raise UsageError(f"codebooks {list(books.shape)} do not fit the table {list(weight.shape)}")
        else:  # k-means runs on the CPU (seeded, deterministic)
            books, _ = product_quantize(weight.cpu(), subspaces=subspaces, centroids=centroids, stages=stages,
                                        iterations=iterations, seed=seed)
            books = books.to(weight.device)
        padding_idx, max_norm, norm_type, dtype = (original.padding_idx, original.max_norm, original.norm_type,
                                                   original.weight.dtype)
    else:
        raise UsageError(f"{name!r} is a {type(original).__name__}, not an nn.Embedding")
    # per-stage distance scale for the Gumbel logits: the mean squared error of the initial assignment
    scales, residual = [], weight
    for stage in range(books.shape[0]):
        codes, dist = _assign(_split(residual, books.shape[1]), books[stage])
        scales.append(float(dist.mean().clamp_min(1e-12)))  # per subspace, as the logits see it
        residual = residual - reconstruct(books[stage:stage + 1], codes.t().contiguous())
    pq = _TrainablePQ(weight, books, method=method, padding_idx=padding_idx, commitment=commitment,
                      scales=scales, seed=seed)
    _set_module(model, name, pq)
    own = [pq.e, pq.codebooks]
    groups = [{"params": own, "lr": lr}]
    if train_rest:
        rest = [p for p in model.parameters() if p.requires_grad and all(p is not o for o in own)]
        if rest:
            groups.append({"params": rest, "lr": rest_lr if rest_lr is not None else lr})
    optimizer = torch.optim.Adam(groups)
    was_training = model.training
    model.train()
    iterator = iter(data_iter)
    try:
        for step in range(steps):
            try:
                batch = next(iterator)
            except StopIteration:
                iterator = iter(data_iter)
                try:
                    batch = next(iterator)
                except StopIteration:
                    break  # a one-shot iterator ran out
            fraction = step / max(steps, 1)
            if method == "gumbel":
                pq.hard = fraction >= 1 - hard_fraction
                pq.tau = tau[0] * (tau[1] / tau[0]) ** min(1.0, fraction / max(1e-9, 1 - hard_fraction))
            pq.aux = torch.zeros((), device=pq.e.device)
            loss = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            (loss + pq.aux).backward()
            optimizer.step()
            if progress:
                progress(step + 1, steps, f"loss {float(loss.detach()):.4f}")
    finally:
        with torch.no_grad():
            books = pq.codebooks.detach().clone()
            codes = _assign_stages(pq.e.detach(), books)
        module = CodebookEmbedding(books, codes, padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
                                   dtype=dtype)
        _set_module(model, name, module)
        model.train(was_training)
    return model


def packable_state_dict(model: nn.Module, recipe: Recipe | str = "lossless",
                        **options: Any) -> tuple[dict[str, torch.Tensor], Recipe]:
    """A state dict and recipe that :func:`ncz.models.pack` stores a model with
    :class:`CodebookEmbedding` modules from: each such module ``name`` becomes a
    dense ``name.weight`` (what an ``nn.Embedding`` model expects, so
    :func:`ncz.models.load_into` fits it) whose rule stores the module's own
    codebooks and codes (``fixed``), with ``options`` (e.g. ``codebook="float16"``)
    passed to :func:`encode_codebook`. Other tensors follow ``recipe``.
    """
    base = Recipe.preset(recipe) if isinstance(recipe, str) else recipe
    modules = {n: mod for n, mod in model.named_modules() if isinstance(mod, CodebookEmbedding)}
    state: dict[str, torch.Tensor] = {}
    rules = []
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in modules and leaf in ("codebooks", "codes"):
            if leaf == "codebooks":
                module = modules[owner]
                weight_name = f"{owner}.weight" if owner else "weight"
                state[weight_name] = module.dense().detach()
                rules.append(Rule(glob.escape(weight_name), "codebook", {**options, "fixed": module}))
            continue
        state[key] = value
    return state, Recipe(f"{base.name}+codebooks", tuple(rules) + base.rules)


register_encoder("codebook", encode_codebook)
register_decoder(Kind.CODEBOOK, decode_codebook)
register_module(Kind.CODEBOOK, _build_module)
