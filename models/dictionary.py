"""Shared dictionary + sparse codes (DirNet), kind ``DICTIONARY``.

Zhang et al., "DirNet: Dimensionality Reduction via a Shared Dictionary for
Compressing Neural Networks" (and "Learning Compact RNNs with shared dictionary
and sparse codes"): the matrices of a *group* (the four gate blocks of an LSTM
weight, every FFN projection of one shape, ...) are written as ``W ≈ D·C`` with
one learned dictionary ``D`` (``dim × K``, unit-norm atoms) shared by the whole
group and a sparse code ``C`` per matrix: every column of ``W`` is a combination
of a few atoms. The dictionary is paid once for the group, so the more matrices
share it the cheaper each one gets; the code costs ~(index + value) bits per
non-zero. Two things adapt to meet one budget, as in DirNet:

- **sparsity across layers** (and columns): OMP is greedy and nested, so one
  deep OMP run records every column's residual after 0, 1, 2, ... atoms. With a
  ``bits``/``ratio`` budget two allocations are compared at equal non-zero
  counts: the greedy marginal-gain allocation per tensor (repeatedly give one
  more non-zero per column to the tensor whose normalised residual drops most
  per extra non-zero) and one residual threshold for every column of the group
  (error-constrained coding: hard columns get more atoms than easy ones); a
  ladder of non-zero counts, refined twice, finds the most accurate encoding
  that fits. With a ``rel_error`` target (a per-tensor contract, as for the
  other representations) each tensor gets either the smallest sparsity that
  meets it or the largest common per-column residual that still does, whichever
  codes smaller.
- **atoms within a layer (group)**: ``K`` is chosen from a small candidate set
  (default ``dim/4, dim/2, dim, 2·dim``) by total cost: dictionary storage
  plus codes (or by error within the budget). Small groups end up with few atoms
  because a large dictionary does not amortise; if no candidate reaches a
  ``rel_error`` target a complete dictionary (K = dim) is used.

Learning alternates batched OMP (Batch-OMP of Rubinstein, Zibulevsky & Elad
2008: correlations updated through the Gram matrix, Cholesky factor grown one
row per step, vectorised over columns in torch/float64) with MOD updates
(Engan et al. 1999: ``D = Y Xᵀ (X Xᵀ)⁻¹``; unused or duplicated atoms re-seeded
with the worst represented columns). On synthetic data MOD came within ~20 % of
exact K-SVD's residual at a small fraction of its time, and beat approximate
(one power step) K-SVD. Codes during learning are error-constrained (each
column down to its tensor's mean allowed residual); the cap on atoms per column
climbs 1, 2, 3, 4, 6, 8, 12, ... because a dictionary trained at a high
sparsity from a poor start stays poor (measured: 2–3× the non-zeros), and the
climb stops once the non-zeros needed to meet the target stop falling. With a
bits budget the target is first guessed from the budget, then re-aimed once at
the error the budget actually bought. Every tensor of a group is normalised to
unit mean square first, so the shared dictionary and the allocation weigh the
tensors' *relative* errors (``Σ_t numel_t · rel_err_t²``), not whichever layer
has the largest weights. Initialisation is seeded: same input, same bytes.

The dictionary and the code values are quantized with :func:`quantize`
(uniform step, ANS-coded indices). The value step of tensor ``t`` is set so its
quantization error is a share ρ of its approximation error (the encoder tries a
few shares, 0.3/0.5/0.7, and keeps the cheapest / most accurate); the
dictionary's relative error is a quarter of that. The reported ``rel_error`` is
measured on the decoder's own arithmetic. A budget counts the parts' stored
bytes plus their ANS tables; one too small for even the smallest dictionary
yields the cheapest encoding, over budget.

Cost: learning is ``iterations`` OMP sweeps of ``N·s·(s + K)`` each (N coded
columns, s atoms per column), so groups of unstructured weights that need many
atoms per column are slow to encode and gain nothing: dictionary coding pays off
where columns really are sparse over a shared basis (DirNet's trained RNNs);
on near-random weights scalar quantization is several times smaller.

Layout (kind ``DICTIONARY``, FORMAT.md §5.4)
--------------------------------------------
The tensor's 2-D view is ``rows × cols`` with ``rows = shape[0]`` and
``cols = prod(shape[1:])``; it is cut into ``blocks`` row blocks of ``dim`` rows
(``rows = blocks · dim``). Its coded *columns* are, block-major, column ``i`` of
block ``j`` at position ``c = j·cols + i`` (``N = blocks · cols`` columns), each
a vector of length ``dim``. Decoding: ``W[j·dim:(j+1)·dim, i] = D̂ · ĉ_{j·cols+i}``.

Head params (besides ``dtype``/``shape`` of the original tensor):

==============  ====  =========================================================
``dictionary``  str   name of the head that owns the dictionary parts (the
                      encoder: the group's first tensor); an owner names
                      itself. A reference MUST name a ``DICTIONARY`` head that
                      names itself (no chains, hence no cycles)
``atoms``       int   K ≥ 1, atoms in the dictionary (equal to the owner's)
``dim``         int   atom length ≥ 1 (equal to the owner's)
``blocks``      int   ≥ 1, with ``shape[0] = blocks · dim``
``sparsity``    int   0 ≤ sparsity ≤ atoms: the most non-zeros of any column
==============  ====  =========================================================

Parts (``<head>#<part>``):

- owner only — ``#dict``: int32 ``[dim·K]`` (ANS), quantized dictionary,
  row-major ``dim × K``; ``#dict_step``: float32 ``[1, 1]``;
  ``D̂ = float32(q) · step``.
- ``#count``: int32 ``[N]`` (ANS), non-zeros of each column, ``0 ≤ n_c ≤ sparsity``.
- ``#index``: int32 ``[Σ n_c]`` (ANS), atom indices column by column, ascending
  within a column and delta-coded: the first index as is, then
  ``a_k − a_{k−1} − 1 ≥ 0``; every decoded index ``< K``.
- ``#value``: int32 ``[Σ n_c]`` (ANS), quantized code values in the same order;
  ``#step``: float32 ``[1, 1]``; value = ``float32(q) · step``.

Integer parts are written with ANS; a reader takes any codec. The decoder sums
each column's ``value · D̂[:, atom]`` terms in float64 in stored order, rounds
to float32, then casts to ``dtype``. Everything is validated (indices < K, counts vs. lengths, shapes,
finite steps, dictionary references) and failures raise
:class:`ncz.format.InputError` naming the file and the tensor.

Whole models: :func:`plan_dictionary` encodes the groups of a state dict (glob
patterns) and returns per-tensor :class:`Encoded` results; ``load_into`` swaps an
``nn.Linear`` whose weight is stored this way for :class:`DictionaryLinear`,
which keeps ``D`` (shared between the modules of a group) and the sparse codes
and never materialises the dense weight.
"""

from __future__ import annotations

import fnmatch
import heapq
import math
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ncz.format import Codec, InputError, Kind, Reader, SectionInfo, UsageError, encode_payload

from .quantized import quantize
from .representation import (
    Encoded,
    PendingSection,
    dtype_name,
    part_name,
    read_part,
    register_decoder,
    register_module,
    symbol_payload,
    torch_dtype,
)

__all__ = [
    "SparseCodes",
    "omp",
    "learn_dictionary",
    "encode_dictionary",
    "encode_dictionary_group",
    "plan_dictionary",
    "decode_dictionary",
    "DictionaryLinear",
]

Progress = Callable[[int, int, str], None]

_DEFAULT_SHARES = (0.3, 0.5, 0.7)
_ITEM_BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "float64": 64}


# ---------------------------------------------------------------------------
# Batched OMP
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseCodes:
    """Sparse codes of N signals: column ``c`` uses atoms ``support[c, :count[c]]``
    (in selection order) with coefficients ``coef[c, :count[c]]``; the rest is padding."""

    support: np.ndarray  # (N, s) int64
    coef: np.ndarray  # (N, s) float64
    count: np.ndarray  # (N,) int64

    def dense(self, atoms: int) -> np.ndarray:
        """The K × N code matrix."""
        n, s = self.support.shape
        out = np.zeros((atoms, n))
        mask = np.arange(s)[None, :] < self.count[:, None]
        cols = np.broadcast_to(np.arange(n)[:, None], (n, s))
        out[self.support[mask], cols[mask]] = self.coef[mask]
        return out


def _batch_omp(D: torch.Tensor, Y: torch.Tensor, limit: np.ndarray, snapshots: Sequence[np.ndarray] = (),
               want_curve: bool = False, stop: np.ndarray | None = None,
               ) -> tuple[SparseCodes, np.ndarray | None, list[SparseCodes]]:
    """Batch-OMP of every column of ``Y`` over ``D`` (unit-norm atoms), float64.

    ``limit[c]`` caps the non-zeros of column ``c``; a column also stops once its
    residual energy is at most ``stop[c]`` (error-constrained OMP), once it
    vanishes, or when the next atom is linearly dependent on its support.
    ``snapshots`` are further (smaller or equal) per-column limits whose codes are
    captured on the way (OMP is nested, so one run serves them all). With
    ``want_curve`` the residual energy after 0..max(limit) steps is returned
    (``N × (s+1)``, constant after a column stops).
    """
    d, K = D.shape
    N = Y.shape[1]
    limit = np.minimum(np.asarray(limit, dtype=np.int64), K)
    snaps = [np.minimum(np.asarray(s, dtype=np.int64), limit) for s in snapshots]
    stop_energy = np.zeros(N) if stop is None else np.broadcast_to(np.asarray(stop, dtype=np.float64), (N,))
    smax = int(limit.max(initial=0))
    G = D.T @ D
    gdiag = torch.diagonal(G).clone()
    support = np.zeros((N, smax), np.int64)
    coef = np.zeros((N, smax))
    count = np.zeros(N, np.int64)
    curve = np.zeros((N, smax + 1)) if want_curve else None
    snap_out = [(np.zeros((N, int(s.max(initial=0))), np.int64), np.zeros((N, int(s.max(initial=0)))),
                 np.zeros(N, np.int64)) for s in snaps]
    # memory per chunk ≈ n · smax · K doubles for the gathered Gram rows
    chunk = int(max(64, min(N, (1 << 23) // max(1, smax * K)))) if N else 1
    for start in range(0, N, chunk):
        end = min(N, start + chunk)
        n = end - start
        Yc = Y[:, start:end]
        lim = torch.from_numpy(limit[start:end])
        floor = torch.from_numpy(np.maximum(stop_energy[start:end], 1e-30))
        A0 = Yc.T @ D  # (n, K) correlations with the signal
        alpha = A0.clone()
        e0 = (Yc * Yc).sum(0)
        energy = e0.clone()
        L = torch.eye(max(smax, 1), dtype=D.dtype).repeat(n, 1, 1)
        S = torch.zeros(n, max(smax, 1), dtype=torch.long)
        x = torch.zeros(n, max(smax, 1), dtype=D.dtype)
        cnt = torch.zeros(n, dtype=torch.long)
        active = (lim > 0) & (e0 > floor)
        if curve is not None:
            curve[start:end, 0] = e0.numpy()
        steps_done = 0
        for k in range(smax):
            active &= (lim > k) & (energy > floor)
            rows = active.nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            score = alpha[rows].abs()
            if k:
                score.scatter_(1, S[rows, :k], -1.0)
            best, new = score.max(1)
            ok = best > 1e-12 * torch.sqrt(e0[rows])
            if k:
                g = G[S[rows, :k], new[:, None]]  # (m, k): Gram of the new atom with the support
                w = torch.linalg.solve_triangular(L[rows, :k, :k], g.unsqueeze(-1), upper=False).squeeze(-1)
                d2 = gdiag[new] - (w * w).sum(1)
            else:
                w = None
                d2 = gdiag[new].clone()
            ok &= d2 > 1e-10 * gdiag[new]
            active[rows[~ok]] = False
            rows, new, d2 = rows[ok], new[ok], d2[ok]
            if rows.numel():
                if k:
                    L[rows, k, :k] = w[ok]
                L[rows, k, k] = torch.sqrt(d2)
                S[rows, k] = new
                cnt[rows] = k + 1
                Lk = L[rows, : k + 1, : k + 1]
                rhs = A0[rows].gather(1, S[rows, : k + 1])
                z = torch.linalg.solve_triangular(Lk, rhs.unsqueeze(-1), upper=False)
                xs = torch.linalg.solve_triangular(Lk.transpose(1, 2), z, upper=True).squeeze(-1)
                x[rows, : k + 1] = xs
                alpha[rows] = A0[rows] - torch.bmm(xs.unsqueeze(1), G[S[rows, : k + 1]]).squeeze(1)
                energy[rows] = torch.clamp(e0[rows] - (rhs * xs).sum(1), min=0.0)
            steps_done = k + 1
            if curve is not None:
                curve[start:end, k + 1] = energy.numpy()
            for s_lim, (s_sup, s_coef, s_cnt) in zip(snaps, snap_out):
                hit = np.nonzero(s_lim[start:end] == k + 1)[0]
                if hit.size:
                    s_sup[start + hit, : k + 1] = S[hit, : k + 1].numpy()
                    s_coef[start + hit, : k + 1] = x[hit, : k + 1].numpy()
                    s_cnt[start + hit] = cnt[hit].numpy()
        if curve is not None and steps_done < smax:
            curve[start:end, steps_done + 1:] = energy.numpy()[:, None]
        support[start:end] = S[:, :smax].numpy()
        coef[start:end] = x[:, :smax].numpy()
        count[start:end] = cnt.numpy()
        for s_lim, (s_sup, s_coef, s_cnt) in zip(snaps, snap_out):
            late = np.nonzero(s_lim[start:end] > steps_done)[0]  # stopped before reaching the snapshot
            if late.size:
                width = s_sup.shape[1]
                s_sup[start + late] = S[late, :width].numpy() if width <= S.shape[1] else 0
                s_coef[start + late] = x[late, :width].numpy()
                s_cnt[start + late] = cnt[late].numpy()
    for s_sup, s_coef, s_cnt in snap_out:  # zero the padding beyond each column's count
        pad = np.arange(s_sup.shape[1])[None, :] >= s_cnt[:, None]
        s_sup[pad] = 0
        s_coef[pad] = 0.0
    return SparseCodes(support, coef, count), curve, [SparseCodes(*s) for s in snap_out]


def omp(dictionary: np.ndarray | torch.Tensor, signals: np.ndarray | torch.Tensor,
        sparsity: int | np.ndarray) -> SparseCodes:
    """Orthogonal matching pursuit of every column of ``signals`` (d × N) over
    ``dictionary`` (d × K, columns normalised internally), at most ``sparsity``
    non-zeros per column (an int or one per column). Coefficients refer to the
    *given* (unnormalised) atoms."""
    D = torch.as_tensor(np.asarray(dictionary, dtype=np.float64))
    Y = torch.as_tensor(np.asarray(signals, dtype=np.float64))
    if D.dim() != 2 or Y.dim() != 2 or D.shape[0] != Y.shape[0]:
        raise UsageError(f"omp needs a d×K dictionary and d×N signals, got {list(D.shape)} and {list(Y.shape)}")
    norms = D.norm(dim=0)
    if bool((norms == 0).any()):
        raise UsageError("omp: the dictionary has an all-zero atom")
    limit = np.broadcast_to(np.asarray(sparsity, dtype=np.int64), (Y.shape[1],))
    if (limit < 0).any():
        raise UsageError("omp: sparsity must be ≥ 0")
    codes, _, _ = _batch_omp(D / norms, Y, limit)
    scale = norms.numpy()[codes.support]
    coef = np.where(np.arange(codes.coef.shape[1])[None, :] < codes.count[:, None], codes.coef / scale, 0.0)
    return SparseCodes(codes.support, coef, codes.count)


# ---------------------------------------------------------------------------
# Dictionary update (MOD) and learning
# ---------------------------------------------------------------------------


def _code_matrix(codes: SparseCodes, K: int) -> torch.Tensor:
    n, s = codes.support.shape
    mask = np.arange(s)[None, :] < codes.count[:, None]
    cols = np.broadcast_to(np.arange(n)[:, None], (n, s))[mask]
    index = torch.from_numpy(np.stack([codes.support[mask], cols]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: sparse support "in beta"
        return torch.sparse_coo_tensor(index, torch.from_numpy(codes.coef[mask]), (K, n),
                                       check_invariants=False).coalesce()


def _mod_update(D: torch.Tensor, Y: torch.Tensor, codes: SparseCodes) -> torch.Tensor:
    """Method of optimal directions (Engan et al. 1999): the least-squares
    dictionary ``Y Xᵀ (X Xᵀ)⁻¹`` for fixed codes, atoms renormalised. Atoms that
    went unused or duplicate another (|cos| > 0.99) are re-seeded with the
    normalised residuals of the worst-represented columns, which gets the
    learning out of its usual local minima (deterministic: by residual energy)."""
    d, K = D.shape
    X = _code_matrix(codes, K)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        YXt = torch.sparse.mm(X, Y.T).T  # d × K
        XXt = torch.sparse.mm(X, X.t()).to_dense()
    usage = torch.diagonal(XXt)
    reg = 1e-9 * float(usage.sum()) / K + 1e-12
    new = torch.linalg.solve(XXt + reg * torch.eye(K, dtype=D.dtype), YXt.T).T
    norms = new.norm(dim=0)
    dead = (usage <= 0) | (norms <= 1e-10 * float(norms.max()))
    new = torch.where(dead[None, :], D, new / torch.where(norms > 0, norms, 1.0))
    coherence = (new.T @ new).abs().tril(-1)
    dead |= coherence.max(dim=1).values > 0.99
    if bool(dead.any()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            residual = Y - torch.sparse.mm(X.t(), new.T).T
        energy = (residual * residual).sum(0)
        order = torch.argsort(energy, descending=True, stable=True)
        for slot, col in zip(dead.nonzero().squeeze(1).tolist(), order.tolist()):
            if float(energy[col]) <= 1e-30:
                break
            new[:, slot] = residual[:, col] / residual[:, col].norm()
    return new


def _initial_dictionary(Y: torch.Tensor, K: int, seed: int) -> torch.Tensor:
    """K distinct non-zero signals (seeded), normalised; random atoms if there are too few."""
    rng = np.random.default_rng(seed)
    d, N = Y.shape
    norms = Y.norm(dim=0).numpy()
    candidates = np.nonzero(norms > 1e-12 * max(float(norms.max(initial=0)), 1e-300))[0]
    take = rng.permutation(candidates)[:K]
    D = torch.from_numpy(rng.standard_normal((d, K)))
    if take.size:
        D[:, : take.size] = Y[:, torch.from_numpy(take)]
    return D / D.norm(dim=0).clamp_min(1e-300)


def learn_dictionary(signals: np.ndarray | torch.Tensor, atoms: int, sparsity: int, *, iterations: int = 10,
                     seed: int = 0, progress: Progress | None = None) -> tuple[np.ndarray, SparseCodes]:
    """(D, codes): a d × K dictionary with unit-norm atoms and codes with at most
    ``sparsity`` non-zeros per column, by alternating OMP and MOD."""
    Y = torch.as_tensor(np.asarray(signals, dtype=np.float64))
    if Y.dim() != 2 or atoms < 1 or sparsity < 0:
        raise UsageError("learn_dictionary needs d×N signals, atoms ≥ 1 and sparsity ≥ 0")
    D = _initial_dictionary(Y, atoms, seed)
    limit = np.full(Y.shape[1], sparsity, np.int64)
    for it in range(iterations):
        codes, _, _ = _batch_omp(D, Y, limit)
        D = _mod_update(D, Y, codes)
        if progress:
            progress(it + 1, iterations, "dictionary update")
    codes, _, _ = _batch_omp(D, Y, limit)
    return D.numpy(), codes


# ---------------------------------------------------------------------------
# Group encoding
# ---------------------------------------------------------------------------


def _ans_bits(symbols: np.ndarray) -> float:
    """Estimated bits of an ANS part: order-0 entropy of the symbols (what the
    fitted table achieves, within a word) plus the table kept in params
    (≈ 2 bytes per entry of its window)."""
    if symbols.size == 0:
        return 0.0
    values, counts = np.unique(symbols, return_counts=True)
    p = counts / symbols.size
    window = min(int(values[-1]) - int(values[0]) + 2, 4097)
    return float(-(counts * np.log2(p)).sum()) + 32 + 16 * window + 48


@dataclass
class _Member:
    name: str
    tensor: torch.Tensor
    w: np.ndarray  # rows × cols, float64
    blocks: int
    cols: int  # columns of the 2-D view
    sl: slice  # its columns in the group's Y
    norm: float
    scale: float  # Yn = Y · scale (unit mean square)


@dataclass
class _TensorCode:
    counts: np.ndarray  # (N_t,) int
    atoms: np.ndarray  # (nnz,) ascending within a column
    q: np.ndarray  # (nnz,) int32
    step: np.ndarray  # (1, 1) float32
    rel_error: float


@dataclass
class _Realized:
    K: int
    qD: np.ndarray  # (d, K) int32
    stepD: np.ndarray  # (1, 1) float32
    codes: list[_TensorCode]
    bits: float  # estimated stored bits of the group
    objective: float  # Σ numel · err² / Σ numel
    retry: Callable[[float], "_Realized"]  # the same allocation with another value share

    def worst(self) -> float:
        return max((c.rel_error for c in self.codes), default=0.0)


def _reconstruct(D_hat: np.ndarray, counts: np.ndarray, atoms: np.ndarray, values: np.ndarray,
                 blocks: int, cols: int, shape: Sequence[int]) -> np.ndarray:
    """float32 tensor D̂·Ĉ in the tensor's shape: the decoder's exact arithmetic.

    Column c is Σ_j value_j · D̂[:, atom_j] over its own entries, summed in float64
    in entry order (numpy's reduceat: no BLAS, so the same bits on every
    machine), then rounded to float32. Cost: non-zeros × dim."""
    d, K = D_hat.shape
    N = counts.size
    Wt = np.zeros((N, d))
    if atoms.size:
        terms = D_hat.T.astype(np.float64)[atoms] * values.astype(np.float64)[:, None]  # nnz × d
        used = np.nonzero(counts > 0)[0]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[used]
        Wt[used] = np.add.reduceat(terms, starts, axis=0)
    W = Wt.T.reshape(d, blocks, cols).transpose(1, 0, 2).reshape(blocks * d, cols)
    return W.astype(np.float32).reshape(shape)


def _restored_error(member: _Member, restored: np.ndarray) -> float:
    t = torch.from_numpy(restored).to(member.tensor.dtype).double().reshape(-1)
    a = member.tensor.detach().double().reshape(-1)
    norm = float(a.norm())
    diff = float((a - t).norm())
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


def _sorted_code(codes: SparseCodes, sl: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(counts, atoms ascending per column, coefficients) of the columns in ``sl``."""
    sup, cf, cnt = codes.support[sl], codes.coef[sl], codes.count[sl]
    s = sup.shape[1]
    mask = np.arange(s)[None, :] < cnt[:, None]
    key = np.where(mask, sup, np.iinfo(np.int64).max)
    order = np.argsort(key, axis=1, kind="stable")
    sup = np.take_along_axis(sup, order, 1)
    cf = np.take_along_axis(cf, order, 1)
    mask = np.take_along_axis(mask, order, 1)
    return cnt.copy(), sup[mask], cf[mask]


def _delta(counts: np.ndarray, atoms: np.ndarray) -> np.ndarray:
    """Ascending atoms per column → first index, then gaps − 1."""
    out = atoms.astype(np.int64).copy()
    if atoms.size:
        first = np.zeros(atoms.size, bool)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        first[starts[counts > 0]] = True
        out[1:] = np.where(first[1:], atoms[1:], atoms[1:] - atoms[:-1] - 1)
    return out


class _Group:
    """The state of one group's encoding: data, per-tensor curves, realisations."""

    def __init__(self, members: list[_Member], d: int, Yn: torch.Tensor):
        self.members = members
        self.d = d
        self.Yn = Yn
        self.numel = np.array([m.tensor.numel() for m in members], dtype=np.float64)
        self._dict_cache: dict[tuple, tuple] = {}

    # per-tensor curves from one OMP run: E_t(s) (normalised squared error) and nnz_t(s)
    def curves(self, curve: np.ndarray, codes: SparseCodes) -> tuple[list[np.ndarray], list[np.ndarray]]:
        E, Z = [], []
        s = curve.shape[1] - 1
        for m in self.members:
            E.append(curve[m.sl].sum(0))
            Z.append(np.minimum(np.arange(s + 1)[None, :], codes.count[m.sl][:, None]).sum(0))
        return E, Z

    def greedy_order(self, E: list[np.ndarray], Z: list[np.ndarray]) -> list[int]:
        """Increments (tensor ids) by marginal gain per extra non-zero, best first."""
        heap, order = [], []
        level = [0] * len(E)

        def push(t: int) -> None:
            s = level[t]
            if s + 1 < E[t].size and Z[t][s + 1] > Z[t][s]:
                gain = max(0.0, float(E[t][s] - E[t][s + 1]))
                heapq.heappush(heap, (-gain / float(Z[t][s + 1] - Z[t][s]), t))

        for t in range(len(E)):
            push(t)
        while heap:
            _, t = heapq.heappop(heap)
            order.append(t)
            level[t] += 1
            push(t)
        return order

    def realize(self, D: torch.Tensor, codes: SparseCodes, approx: list[float], share: float,
                dict_base: float) -> _Realized:
        """Quantize the dictionary and the values for one allocation; measure everything.

        Tensor t's values get the relative step that makes their quantization error
        ≈ ``share`` × its approximation error (‖D·Δx‖ ≈ ‖Δx‖ for unit atoms and
        independent errors); the dictionary's relative error is ``share · dict_base``."""
        K = D.shape[1]
        dict_error = max(share * dict_base, 1e-6)
        key = (id(D), round(math.log(dict_error), 3))
        if key not in self._dict_cache:
            if len(self._dict_cache) > 64:
                self._dict_cache.clear()
            qD, stepD, _ = quantize(D.numpy().astype(np.float32), rel_error=dict_error, granularity="tensor")
            self._dict_cache[key] = (qD, stepD, D)  # D kept alive so its id stays unique
        qD, stepD, _ = self._dict_cache[key]
        D_hat = qD.astype(np.float32) * stepD
        bits = _ans_bits(qD) + 32
        out, objective = [], 0.0
        for t, m in enumerate(self.members):
            counts, atoms, coef = _sorted_code(codes, m.sl)
            values = coef / m.scale if m.scale > 0 else coef
            if values.size and np.any(values):
                target = share * max(approx[t], 1e-4) * m.norm / float(np.linalg.norm(values))
                q, step, _ = quantize(values[None, :].astype(np.float32), rel_error=min(target, 1.0),
                                      granularity="tensor")
                q = q.reshape(-1)
            else:
                q, step = np.zeros(values.size, np.int32), np.ones((1, 1), np.float32)
            restored = _reconstruct(D_hat, counts, atoms, q.astype(np.float32) * step.reshape(()),
                                    m.blocks, m.cols, m.tensor.shape)
            err = _restored_error(m, restored)
            bits += _ans_bits(counts) + _ans_bits(_delta(counts, atoms)) + _ans_bits(q) + 32
            objective += m.tensor.numel() * err * err
            out.append(_TensorCode(counts, atoms.astype(np.int64), q.astype(np.int32), step.astype(np.float32), err))
        return _Realized(K, qD, stepD, out, bits, objective / float(self.numel.sum()),
                         lambda new_share: self.realize(D, codes, approx, new_share, dict_base))


def _collect(names: Sequence[str], tensors: Sequence[torch.Tensor], dim: int | None) -> tuple[list[_Member], int]:
    if len(names) != len(tensors) or not names:
        raise UsageError("encode_dictionary_group needs as many names as tensors (at least one)")
    if len(set(names)) != len(names):
        raise UsageError("encode_dictionary_group: tensor names repeat")
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise UsageError(f"{name}: only floating-point tensors can be dictionary coded")
        if t.dim() < 2 or t.numel() == 0:
            raise UsageError(f"{name}: dictionary coding needs a non-empty tensor of ≥ 2 dimensions, "
                             f"got shape {list(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise UsageError(f"{name}: has NaN or inf; use the lossless representation")
        if "#" in name:
            raise UsageError(f"tensor name {name!r} contains '#', which ncz reserves for parts")
    if dim is None:
        rows = {int(t.shape[0]) for t in tensors}
        if len(rows) != 1:
            raise UsageError(f"tensors of a group have different row counts {sorted(rows)}; give dim= (a common "
                             "divisor) to cut them into blocks")
        dim = rows.pop()
    if not isinstance(dim, int) or dim < 1:
        raise UsageError(f"dim must be a positive int, got {dim!r}")
    members, start = [], 0
    for name, t in zip(names, tensors):
        rows = int(t.shape[0])
        if rows % dim:
            raise UsageError(f"{name}: {rows} rows are not a multiple of dim={dim}")
        w = t.detach().cpu().double().numpy().reshape(rows, -1)
        cols = w.shape[1]
        blocks = rows // dim
        norm = float(np.linalg.norm(w))
        scale = math.sqrt(w.size) / norm if norm > 0 else 0.0
        n = blocks * cols
        members.append(_Member(name, t, w, blocks, cols, slice(start, start + n), norm, scale))
        start += n
    return members, dim


def _signals(members: list[_Member], d: int) -> torch.Tensor:
    parts = [(m.w.reshape(m.blocks, d, m.cols).transpose(1, 0, 2).reshape(d, m.blocks * m.cols)) * m.scale
             for m in members]
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(parts, axis=1)))


def _sections(members: list[_Member], d: int, best: _Realized) -> list[Encoded]:
    encoded = []
    owner = members[0].name
    for i, (m, code) in enumerate(zip(members, best.codes)):
        params = {"dtype": dtype_name(m.tensor.dtype), "shape": list(m.tensor.shape), "dictionary": owner,
                  "atoms": best.K, "dim": d, "blocks": m.blocks, "sparsity": int(code.counts.max(initial=0))}
        sections = [PendingSection(m.name, encode_payload(b"", Codec.RAW), Kind.DICTIONARY, params)]
        parts: list[tuple[str, np.ndarray, str, list[int]]] = []
        if i == 0:
            parts += [("dict", best.qD.reshape(-1), "int32", [best.qD.size]),
                      ("dict_step", best.stepD, "float32", [1, 1])]
        delta = _delta(code.counts, code.atoms)
        parts += [("count", code.counts, "int32", [code.counts.size]), ("index", delta, "int32", [delta.size]),
                  ("value", code.q, "int32", [code.q.size]), ("step", code.step, "float32", [1, 1])]
        for key, array, dtype, shape in parts:
            if dtype == "int32":
                payload = symbol_payload(array)
            else:
                payload = encode_payload(array.astype("<f4").tobytes(), Codec.RAW)
            sections.append(PendingSection(part_name(m.name, key), payload, Kind.PART,
                                           {"dtype": dtype, "shape": shape}))
        encoded.append(Encoded(m.name, f"dictionary/K{best.K}", sections, m.tensor.numel(), code.rel_error))
    return encoded


def _budget_bits(members: list[_Member], bits: float | None, ratio: float | None) -> float | None:
    if bits is not None:
        if not bits > 0:
            raise UsageError(f"bits must be > 0, got {bits!r}")
        return bits * sum(m.tensor.numel() for m in members)
    if ratio is not None:
        if not ratio > 0:
            raise UsageError(f"ratio must be > 0, got {ratio!r}")
        return sum(m.tensor.numel() * _ITEM_BITS.get(dtype_name(m.tensor.dtype), 32) for m in members) / ratio
    return None


_LEVELS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def _learn(group: _Group, D: torch.Tensor, target: float, sweeps: int, *, climb: bool,
           tick: Callable[[str], None], label: str) -> tuple[torch.Tensor, int, float]:
    """Learn a dictionary for error-constrained codes at relative error ``target``.

    Every column is coded down to its tensor's mean allowed residual energy (error-
    constrained OMP, as in K-SVD's error-constrained variant) with at most
    ``level`` atoms; MOD updates the dictionary. A dictionary suits the sparsity it
    was trained at, and training at a high sparsity from a poor start ends in a
    poor dictionary; so with ``climb`` the cap climbs 1, 2, 3, 4, 6, 8, 12, ...
    (gain-shape VQ first), three sweeps per level, each level warm-started from
    the last; after each level the non-zeros needed to meet the target are
    counted, the climb stops when that got worse twice, and the remaining sweeps
    go to the best level. Returns (D, best level, mean non-zeros per column).
    """
    members, Y = group.members, group.Yn
    N = Y.shape[1]
    d, K = D.shape
    cap = min(d, K)
    columns = np.array([m.sl.stop - m.sl.start for m in members], dtype=np.float64)
    owner = np.concatenate([np.full(m.sl.stop - m.sl.start, t) for t, m in enumerate(members)])
    stop = ((target * target) * group.numel / columns)[owner]
    done = 0

    def sweep(level: int, count: int) -> None:
        nonlocal D, done
        for _ in range(count):
            if done >= sweeps:
                return
            codes, _, _ = _batch_omp(D, Y, np.full(N, min(level, cap)), stop=stop)
            D = _mod_update(D, Y, codes)
            done += 1
            tick(f"{label}: learning {done}/{sweeps} (≤ {min(level, cap)} atoms per column)")

    def needed() -> float:
        codes, _, _ = _batch_omp(D, Y, np.full(N, cap), stop=stop)
        return float(np.mean(codes.count)) if N else 0.0

    levels = [lv for lv in _LEVELS if lv < cap] + [cap] if climb else [cap]
    best = (needed(), D, levels[0] if climb else cap)
    worse = 0
    for level in levels:
        if done >= sweeps:
            break
        sweep(level, 3 if climb else sweeps)
        score = needed()
        tick(f"{label}: after level {level}, {score:.1f} atoms per column meet the target")
        if score < best[0]:
            best, worse = (score, D, level), 0
        else:
            worse += 1
            if worse >= 2 or score < level / 2:  # later levels would only pass what columns need
                break
    D = best[1]
    if done < sweeps:
        sweep(best[2], sweeps - done)
        score = needed()
        if score < best[0]:
            best = (score, D, best[2])
    return best[1], best[2], best[0]


def _counts_at(curve: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """Per column, the fewest steps whose residual energy is ≤ eps (else the deepest)."""
    ok = curve <= eps[:, None]
    return np.where(ok.any(1), ok.argmax(1), curve.shape[1] - 1)


def _equal_residual(block: np.ndarray, allowed: float) -> np.ndarray | None:
    """Counts per column (error-constrained: one residual threshold for all the
    columns of ``block``) with the fewest non-zeros whose total residual energy is
    ≤ ``allowed``; bisection on the threshold. None if even the deepest codes miss."""
    rows = np.arange(block.shape[0])

    def total(eps: float) -> float:
        return float(block[rows, _counts_at(block, np.full(rows.size, eps))].sum())

    lo, hi = allowed / max(rows.size, 1), allowed  # every column ≤ allowed/columns meets the total
    if total(lo) > allowed:
        return None
    for _ in range(30):
        if hi <= lo * 1.02:
            break
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if total(mid) <= allowed else (lo, mid)
    return _counts_at(block, np.full(rows.size, lo))


def _min_sparsity(E: np.ndarray, numel: float, target: float) -> int | None:
    ok = np.nonzero(E <= target * target * numel)[0]
    return int(ok[0]) if ok.size else None


def _limits(members: list[_Member], sparsity: Sequence[int], N: int) -> np.ndarray:
    out = np.zeros(N, np.int64)
    for m, s in zip(members, sparsity):
        out[m.sl] = s
    return out


class _Search:
    """Allocations for one learned dictionary: residual curves, candidate limits, realisations."""

    def __init__(self, group: _Group, D: torch.Tensor, depth: int, tick: Callable[[str], None], label: str,
                 need: Callable[[list[np.ndarray]], bool]):
        self.group, self.D = group, D
        Y = group.Yn
        self.N = N = Y.shape[1]
        cap = min(D.shape)
        smax = int(min(cap, max(2, depth)))
        while True:  # deep enough for every candidate allocation
            codes, curve, _ = _batch_omp(D, Y, np.full(N, smax), want_curve=True)
            E, Z = group.curves(curve, codes)
            if smax >= cap or need(E):
                break
            smax = min(cap, 2 * smax)
        self.smax, self.curve, self.E, self.Z, self.path = smax, curve, E, Z, codes
        tick(f"{label}: residual curves to depth {smax}")

    def approx(self, counts: np.ndarray) -> list[float]:
        residual = self.curve[np.arange(self.N), counts]
        g = self.group
        return [math.sqrt(max(float(residual[m.sl].sum()), 0.0) / g.numel[t]) for t, m in enumerate(g.members)]

    def overall(self, counts: np.ndarray) -> float:
        residual = float(self.curve[np.arange(self.N), counts].sum())
        return math.sqrt(max(residual, 0.0) / float(self.group.numel.sum()))

    def codes_at(self, counts: np.ndarray) -> SparseCodes:
        """The OMP codes truncated to ``counts`` atoms per column: OMP is nested, so
        these are the first atoms of the deep run's supports with their
        least-squares coefficients, re-solved here instead of re-running OMP."""
        path, Y = self.path, self.group.Yn
        counts = np.minimum(np.asarray(counts, dtype=np.int64), path.count)
        width = int(counts.max(initial=0))
        support = np.where(np.arange(width)[None, :] < counts[:, None], path.support[:, :width], 0)
        coef = np.zeros((self.N, width))
        Dt = self.D.T.contiguous()
        for c in np.unique(counts[counts > 0]).tolist():
            cols_all = np.nonzero(counts == c)[0]
            step = max(1, (1 << 22) // (c * max(c, Y.shape[0])))
            for i in range(0, cols_all.size, step):
                cols = cols_all[i:i + step]
                atoms = Dt[torch.from_numpy(support[cols, :c])]  # (n, c, d)
                gram = atoms @ atoms.transpose(1, 2)
                rhs = atoms @ Y[:, torch.from_numpy(cols)].T.unsqueeze(-1)
                factor, info = torch.linalg.cholesky_ex(gram)
                x = torch.cholesky_solve(rhs, factor).squeeze(-1)
                bad = (info != 0).nonzero().squeeze(1)
                if bad.numel():  # numerically dependent supports (OMP stops before those): least squares
                    x[bad] = torch.linalg.lstsq(gram[bad], rhs[bad]).solution.squeeze(-1)
                coef[cols, :c] = x.numpy()
        return SparseCodes(support, coef, counts)

    def realize(self, limit_sets: list[np.ndarray], dict_bases: list[float],
                share_sets: list[Sequence[float]]) -> list[_Realized]:
        out = []
        for limits, dict_base, share_list in zip(limit_sets, dict_bases, share_sets):
            code = self.codes_at(limits)
            approx = self.approx(code.count)
            out += [self.group.realize(self.D, code, approx, share, dict_base) for share in share_list]
        return out

    # -- error target: every tensor within rel_error --------------------------------
    def for_error(self, rel_error: float, shares: Sequence[float]) -> _Realized:
        """Per share ρ the approximation gets e_a = √(1−ρ²)·target and quantization the
        rest. Two allocations each: one sparsity per tensor (the smallest meeting
        e_a), and one count per column (error-constrained: the largest common
        residual per column of a tensor that still meets e_a, by bisection)."""
        g, N, curve = self.group, self.N, self.curve
        limit_sets, bases, share_sets = [], [], []
        for share in shares:
            target = rel_error * math.sqrt(1 - share * share)
            uniform = [_min_sparsity(self.E[t], g.numel[t], target) for t in range(len(g.members))]
            limit_sets.append(_limits(g.members, [self.smax if u is None else u for u in uniform], N))
            per_column = np.full(N, self.smax)
            for t, m in enumerate(g.members):
                counts = _equal_residual(curve[m.sl], target * target * g.numel[t])
                if counts is not None:
                    per_column[m.sl] = counts
            limit_sets.append(per_column)
            bases += [0.25 * rel_error] * 2
            share_sets += [[share], [share]]
        final = []
        for result, share in zip(self.realize(limit_sets, bases, share_sets), [s for ss in share_sets for s in ss]):
            for _ in range(4):  # tighten the steps while a tensor is above the target
                if result.worst() <= rel_error:
                    break
                share *= 0.6
                result = result.retry(share)
            final.append(result)
        return _rank_error(final, rel_error)[0]

    # -- bits budget: the best weighted error within the budget ------------------------
    def for_budget(self, budget: float, shares: Sequence[float], tick: Callable[[str], None],
                   label: str) -> list[_Realized]:
        """Two families of allocations indexed by their non-zero count: the greedy
        per-tensor order (one sparsity per tensor, each increment to the tensor
        whose residual drops most per extra non-zero) and one residual threshold
        for every column of the group. A ladder of non-zero counts, then a finer
        one up to the largest that fits. Returns the realisations best first."""
        g, N, curve = self.group, self.N, self.curve
        T = len(g.members)
        order = g.greedy_order(self.E, self.Z)
        prefix_s = np.zeros((len(order) + 1, T), np.int64)
        for p, t in enumerate(order):
            prefix_s[p + 1] = prefix_s[p]
            prefix_s[p + 1, t] += 1
        prefix_nnz = np.array([sum(int(self.Z[t][s[t]]) for t in range(T)) for s in prefix_s])
        top = float(curve[:, 0].max(initial=0.0))

        def greedy_limits(nnz: float) -> np.ndarray:
            p = int(np.searchsorted(prefix_nnz, nnz, side="right")) - 1
            return _limits(g.members, list(prefix_s[max(p, 0)]), N)

        def column_limits(nnz: float) -> np.ndarray:
            lo, hi = 0.0, max(top, 1e-30)  # a larger threshold → fewer non-zeros
            for _ in range(40):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if _counts_at(curve, np.full(N, mid)).sum() <= nnz else (mid, hi)
            return _counts_at(curve, np.full(N, hi))

        families = (greedy_limits, column_limits)

        def ladder(targets: Sequence[float], share_list: Sequence[float]) -> list[tuple[float, int, _Realized]]:
            sets = [(z, f, families[f](z)) for z in targets for f in range(len(families))]
            results = self.realize([lim for _, _, lim in sets], [0.25 * max(self.overall(lim), 1e-3)
                                                                for _, _, lim in sets], [share_list] * len(sets))
            return [(z, f, r) for (z, f, _), r in zip([x for x in sets for _ in share_list], results)]

        d, K = self.D.shape
        most = float(prefix_nnz[-1])
        guess = max(1.0, (budget - 8.0 * d * K - N) / (math.log2(max(K, 2)) + 8.0))
        targets = sorted({min(most, z) for z in np.geomspace(guess * 0.25, guess * 2.0, 7)})
        middle = [shares[len(shares) // 2]]
        results = ladder(targets, middle)  # the middle value share first ...
        for round_ in range(2):  # ... zooming in on the largest count that fits
            tick(f"{label}: ladder {round_ + 1}")
            fitting = [z for z, _, r in results if r.bits <= budget]
            lo = max(fitting) if fitting else 0.0
            above = sorted({z for z, _, _ in results if z > lo})
            if not above or above[0] - lo < 2:
                break
            results += ladder(list(np.linspace(lo, above[0], 5)[1:-1]), middle)
        # ... then the other shares around the largest fitting count of each family
        others = [sh for sh in shares if sh != middle[0]]
        if others:
            for f in range(len(families)):
                zs = sorted({z for z, ff, _ in results if ff == f})
                fit = [z for z, ff, r in results if ff == f and r.bits <= budget]
                near = [z for z in zs if fit and z >= max(fit)][:2] or zs[:1]
                sets = [families[f](z) for z in near]
                extra = self.realize(sets, [0.25 * max(self.overall(lim), 1e-3) for lim in sets],
                                     [others] * len(sets))
                results += [(0.0, f, r) for r in extra]
        return _rank_budget([r for _, _, r in results], budget)


def _rank_error(results: list[_Realized], rel_error: float) -> list[_Realized]:
    """Feasible (every tensor within the target) cheapest first, then the closest misses."""
    return sorted(results, key=lambda r: (r.worst() > rel_error, r.bits if r.worst() <= rel_error else r.worst()))


def _rank_budget(results: list[_Realized], budget: float) -> list[_Realized]:
    """Within the budget most accurate first, then the cheapest overruns."""
    return sorted(results, key=lambda r: (r.bits > budget, r.objective if r.bits <= budget else r.bits))


def _encode_with_atoms(group: _Group, K: int, *, rel_error: float | None, budget: float | None, iterations: int,
                       seed: int, shares: Sequence[float], tick: Callable[[str], None]) -> list[_Realized]:
    """Learn a K-atom dictionary for the group and return its best realisations."""
    d, Y = group.d, group.Yn
    N = Y.shape[1]
    label = f"K={K}"
    D0 = _initial_dictionary(Y, K, seed)
    if rel_error is not None:
        middle = shares[len(shares) // 2]
        D, level, mean = _learn(group, D0, rel_error * math.sqrt(1 - middle * middle), iterations, climb=True,
                                tick=tick, label=label)
        need_e = rel_error * math.sqrt(1 - max(shares) ** 2)
        search = _Search(group, D, int(2 * mean + 2), tick, label,
                         lambda E: all(_min_sparsity(E[t], group.numel[t], need_e) is not None
                                       for t in range(len(E))))
        return [search.for_error(rel_error, shares)]
    # budget: learn for a guessed error, see what the budget buys, re-aim once if far off
    spare = budget - 8.0 * d * K - N
    if spare <= 0:
        return []  # the dictionary alone eats the budget
    bits_per_weight = spare / float(group.numel.sum())
    target = min(0.5, 2.0 ** (-1.5 * bits_per_weight))
    D, level, mean = _learn(group, D0, target, iterations, climb=True, tick=tick, label=label)
    afford = spare / (math.log2(max(K, 2)) + 8.0) / N  # non-zeros per column (rough)
    depth = int(max(2 * mean + 2, 3 * afford, 8))
    search = _Search(group, D, depth, tick, label, lambda E: True)
    ranked = search.for_budget(budget, shares, tick, label)
    achieved = math.sqrt(ranked[0].objective)
    if ranked[0].bits <= budget and not 0.67 < achieved / target < 1.5 and iterations:
        D2, _, mean2 = _learn(group, D, achieved, max(3, iterations // 2), climb=False, tick=tick,
                              label=f"{label} (re-aimed at {achieved:.3g})")
        search2 = _Search(group, D2, int(max(2 * mean2 + 2, 3 * afford, 8)), tick, label, lambda E: True)
        ranked = _rank_budget(ranked + search2.for_budget(budget, shares, tick, label), budget)
    return ranked[:6]


def _stored_bits(encoded: list[Encoded]) -> int:
    """Payload bits plus the entropy tables kept in params (what the budget counts)."""
    total = 0
    for e in encoded:
        for s in e.sections:
            total += 8 * s.payload.stored_length + 8 * len(s.payload.params.get("table", b""))
    return total


def encode_dictionary_group(names: Sequence[str], tensors: Sequence[torch.Tensor], *, rel_error: float | None = None,
                            bits: float | None = None, ratio: float | None = None, dim: int | None = None,
                            atoms: int | Sequence[int] | None = None, iterations: int = 30, seed: int = 0,
                            value_shares: Sequence[float] = _DEFAULT_SHARES,
                            progress: Progress | None = None) -> list[Encoded]:
    """Encode ``tensors`` with one shared dictionary; one :class:`Encoded` per tensor.

    Give exactly one budget: ``rel_error`` (every tensor's ‖W−Ŵ‖/‖W‖ at most this),
    ``bits`` (coded bits per weight over the group, dictionary and entropy tables
    included) or ``ratio`` (original bits / coded bits). ``dim`` is the atom
    length (default: the common row count); each tensor's rows must be a multiple
    of it (an LSTM's ``4·hidden`` gate rows with ``dim=hidden`` put the four gates
    on one dictionary). ``atoms`` fixes K or lists the candidates (default
    ``dim/4, dim/2, dim, 2·dim``, at most the column count); when none of them
    meets ``rel_error`` a complete dictionary (K = dim) is tried too. The first
    tensor carries the dictionary. ``iterations`` OMP/MOD sweeps per candidate;
    ``value_shares`` the fractions of the error given to quantizing the code
    values that are tried. ``progress(done, total, what)`` follows the work.
    """
    if sum(x is not None for x in (rel_error, bits, ratio)) != 1:
        raise UsageError("give exactly one of rel_error, bits or ratio")
    if rel_error is not None and not 0 < rel_error < 1:
        raise UsageError(f"rel_error must be in (0, 1), got {rel_error!r}")
    if not value_shares or not all(0 < s < 1 for s in value_shares):
        raise UsageError("value_shares must be fractions in (0, 1)")
    if iterations < 0:
        raise UsageError("iterations must be ≥ 0")
    members, d = _collect(list(names), list(tensors), dim)
    budget = _budget_bits(members, bits, ratio)
    Y = _signals(members, d)
    N = Y.shape[1]
    if atoms is None:
        candidates = sorted({k for k in (d // 4, d // 2, d, 2 * d) if 1 <= k <= N} or {min(d, N)})
    else:
        candidates = sorted({int(atoms)} if isinstance(atoms, (int, np.integer)) else {int(k) for k in atoms})
        if not candidates or candidates[0] < 1:
            raise UsageError(f"atoms must be ≥ 1, got {atoms!r}")
    group = _Group(members, d, Y)
    total = len(candidates) * (iterations + 24) + 1  # learning sweeps and level checks, curves, ladders
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done = min(done + 1, total - 1)
        if progress:
            progress(done, total, what)

    shares = tuple(sorted(value_shares))
    chosen: list[tuple[tuple, list[Encoded]]] = []
    for K in candidates:
        ranked = _encode_with_atoms(group, K, rel_error=rel_error, budget=budget, iterations=iterations,
                                    seed=seed, shares=shares, tick=tick)
        if not ranked and K == candidates[0] and budget is not None and all(
                budget - 8.0 * d * k - N <= 0 for k in candidates):
            # every dictionary alone exceeds the budget: the smallest, as if it were free (over budget)
            ranked = _encode_with_atoms(group, K, rel_error=None, budget=budget + 8.0 * d * K + N,
                                        iterations=iterations, seed=seed, shares=shares, tick=tick)
        for realized in ranked:  # the estimate may miss: the first whose real size fits
            encoded = _sections(members, d, realized)
            size = _stored_bits(encoded)
            if rel_error is not None:
                fits = realized.worst() <= rel_error
                chosen.append(((not fits, size if fits else realized.worst()), encoded))
                break
            fits = size <= budget
            chosen.append(((not fits, realized.objective if fits else size), encoded))
            if fits:
                break
    if rel_error is not None and all(key[0] for key, _ in chosen) and max(candidates) < d:
        # fewer atoms than dimensions may not reach the target; a complete dictionary always can
        ranked = _encode_with_atoms(group, d, rel_error=rel_error, budget=None, iterations=iterations, seed=seed,
                                    shares=shares, tick=tick)
        realized = ranked[0]
        chosen.append(((realized.worst() > rel_error, realized.bits), _sections(members, d, realized)))
    if progress:
        progress(total, total, "done")
    return min(chosen, key=lambda item: item[0])[1]


def encode_dictionary(name: str, tensor: torch.Tensor, **options: Any) -> Encoded:
    """One tensor as a group of one (recipes: ``representation = "dictionary"``).

    With ``dim`` below the row count the row blocks share the dictionary, e.g.
    an LSTM ``weight_hh`` with ``dim = hidden``."""
    return encode_dictionary_group([name], [tensor], **options)[0]


def plan_dictionary(state_dict: Mapping[str, torch.Tensor], group_patterns: Sequence[str] | Mapping[str, Mapping],
                    *, rel_error: float | None = None, bits: float | None = None, ratio: float | None = None,
                    progress: Progress | None = None, **options: Any) -> dict[str, Encoded]:
    """Dictionary-code the groups of a model; returns ``{name: Encoded}`` for pack.

    ``group_patterns`` are glob patterns, or a mapping pattern → options for that
    group (e.g. ``{"*.lstm.weight_*": {"dim": 128}}``). Each pattern's tensors
    (floating point, ≥ 2-D, finite, not taken by an earlier pattern) are split by
    atom length (``dim``, default: the row count) and each subgroup gets one
    dictionary and the whole budget (one of ``rel_error``/``bits``/``ratio``).
    Tensors not returned are left to the recipe.
    """
    items = list(group_patterns.items()) if isinstance(group_patterns, Mapping) else \
        [(p, {}) for p in group_patterns]
    taken: set[str] = set()
    jobs: list[tuple[list[str], dict]] = []
    for pattern, extra in items:
        opts = {**options, **dict(extra)}
        by_dim: dict[int, list[str]] = {}
        for name, tensor in state_dict.items():
            if name in taken or not fnmatch.fnmatchcase(name, pattern):
                continue
            if not tensor.is_floating_point() or tensor.dim() < 2 or tensor.numel() == 0 \
                    or not bool(torch.isfinite(tensor).all()):
                continue
            d = opts.get("dim") or int(tensor.shape[0])
            if tensor.shape[0] % d:
                raise UsageError(f"{name}: {tensor.shape[0]} rows are not a multiple of dim={d} (pattern {pattern!r})")
            by_dim.setdefault(d, []).append(name)
            taken.add(name)
        for d, names in by_dim.items():
            jobs.append((names, {**opts, "dim": d}))
    out: dict[str, Encoded] = {}
    for index, (names, opts) in enumerate(jobs):
        encoded = encode_dictionary_group(names, [state_dict[n] for n in names], rel_error=rel_error, bits=bits,
                                          ratio=ratio, **opts)
        out.update({e.name: e for e in encoded})
        if progress:
            progress(index + 1, len(jobs), names[0])
    return {name: out[name] for name in state_dict if name in out}


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


def _int_param(reader: Reader, head: SectionInfo, key: str, low: int) -> int:
    value = head.params.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InputError(f"{reader.name}: {head.name!r}: params.{key} must be an int ≥ {low}, got {value!r}")
    return value


def _step(reader: Reader, head: SectionInfo, key: str) -> np.float32:
    step = read_part(reader, head, key, dtype="float32")
    if step.size != 1 or not np.isfinite(step).all():
        raise InputError(f"{reader.name}: {part_name(head.name, key)!r} must hold one finite float32 step")
    return np.float32(step.reshape(()))


def _dictionary_of(head: SectionInfo, reader: Reader, atoms: int, dim: int) -> np.ndarray:
    """The decoded dictionary D̂ (dim × K, float32) that ``head`` refers to."""
    ref = head.params.get("dictionary")
    if not isinstance(ref, str) or not ref:
        raise InputError(f"{reader.name}: {head.name!r}: params.dictionary must name the head holding the dictionary")
    if ref == head.name:
        owner = head
    else:
        if ref not in reader:
            raise InputError(f"{reader.name}: {head.name!r} refers to dictionary {ref!r}, which the file lacks")
        owner = reader.info(ref)
        if owner.kind != Kind.DICTIONARY or owner.params.get("dictionary") != ref:
            raise InputError(f"{reader.name}: {head.name!r} refers to {ref!r}, which does not hold its own "
                             "dictionary (references must point at a dictionary owner: no chains or cycles)")
        if owner.params.get("atoms") != atoms or owner.params.get("dim") != dim:
            raise InputError(f"{reader.name}: {head.name!r} expects a {dim}×{atoms} dictionary but {ref!r} declares "
                             f"{owner.params.get('dim')}×{owner.params.get('atoms')}")
    q = read_part(reader, owner, "dict", dtype="int32")
    if q.size != dim * atoms:
        raise InputError(f"{reader.name}: {part_name(owner.name, 'dict')!r} has {q.size} entries, expected "
                         f"{dim}×{atoms}")
    return q.reshape(dim, atoms).astype(np.float32) * _step(reader, owner, "dict_step")


def _decode_parts(head: SectionInfo, reader: Reader):
    """Validated (D̂, counts, atoms, values, blocks, cols) of a DICTIONARY head."""
    shape = head.params.get("shape")
    if not isinstance(shape, list) or len(shape) < 2:
        raise InputError(f"{reader.name}: {head.name!r}: a dictionary-coded tensor has ≥ 2 dimensions, "
                         f"got shape {shape!r}")
    atoms = _int_param(reader, head, "atoms", 1)
    dim = _int_param(reader, head, "dim", 1)
    blocks = _int_param(reader, head, "blocks", 1)
    sparsity = _int_param(reader, head, "sparsity", 0)
    if sparsity > atoms:
        raise InputError(f"{reader.name}: {head.name!r}: sparsity {sparsity} exceeds the {atoms} atoms")
    if shape[0] != blocks * dim:
        raise InputError(f"{reader.name}: {head.name!r}: shape[0]={shape[0]} is not blocks×dim={blocks}×{dim}")
    cols = math.prod(shape[1:])  # exact (the container capped the dense size)
    counts = read_part(reader, head, "count", dtype="int32")
    if counts.size != blocks * cols:
        raise InputError(f"{reader.name}: {head.name!r} has {counts.size} column counts, expected {blocks * cols}")
    if counts.size and (counts.min() < 0 or counts.max() > sparsity):
        raise InputError(f"{reader.name}: {head.name!r}: column counts must lie in 0..{sparsity}")
    nnz = int(counts.astype(np.int64).sum())
    delta = read_part(reader, head, "index", dtype="int32")
    q = read_part(reader, head, "value", dtype="int32")
    if delta.size != nnz or q.size != nnz:
        raise InputError(f"{reader.name}: {head.name!r}: counts sum to {nnz} but there are {delta.size} indices "
                         f"and {q.size} values")
    if nnz and delta.min() < 0:
        raise InputError(f"{reader.name}: {head.name!r}: negative atom index or gap in its index part")
    # undo the delta coding: index = running sum of (gap + 1) within the column, the first as is
    steps = delta.astype(np.int64) + 1
    starts = np.concatenate([[0], np.cumsum(counts.astype(np.int64))[:-1]])[counts > 0]
    steps[starts] = delta[starts].astype(np.int64)
    running = np.cumsum(steps)
    base = np.zeros(nnz, np.int64)
    base[starts] = running[starts] - steps[starts]
    base = np.maximum.accumulate(base) if nnz else base  # running sum before the column's first entry
    idx = running - base
    if nnz and idx.max() >= atoms:
        raise InputError(f"{reader.name}: {head.name!r}: atom index {int(idx.max())} ≥ K={atoms}")
    D_hat = _dictionary_of(head, reader, atoms, dim)
    values = q.astype(np.float32) * _step(reader, head, "step")
    return D_hat, counts.astype(np.int64), idx, values, blocks, cols


def decode_dictionary(head: SectionInfo, reader: Reader) -> torch.Tensor:
    D_hat, counts, idx, values, blocks, cols = _decode_parts(head, reader)
    w = _reconstruct(D_hat, counts, idx, values, blocks, cols, head.params["shape"])
    return torch.from_numpy(np.ascontiguousarray(w)).to(torch_dtype(head.params["dtype"]))


# ---------------------------------------------------------------------------
# Compact module
# ---------------------------------------------------------------------------


class DictionaryLinear(nn.Module):
    """``y = x · (D·C)ᵀ + b`` without the dense weight.

    ``D`` (``dim × K``, a Parameter that modules of one group share) and the sparse
    codes of the ``blocks`` row blocks, kept as a CSR matrix ``(blocks·K) × in``
    (int32 row pointers and columns, values a Parameter). Forward computes
    ``z = C · xᵀ`` (sparse, ``nnz`` multiply-adds per input row) then ``D · z``
    per block (``blocks·K·dim``): cheaper than the dense ``rows·in`` product
    whenever the codes are sparse and K is small, and the memory is the
    compressed size. The CSR wrapper is rebuilt per call (no copy of the data),
    so gradients reach both ``dictionary`` and ``values``.
    """

    def __init__(self, dictionary: torch.Tensor | nn.Parameter, counts: torch.Tensor, atoms: torch.Tensor,
                 values: torch.Tensor, *, blocks: int, in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        dim, K = dictionary.shape
        counts = torch.as_tensor(counts, dtype=torch.int64)
        atoms = torch.as_tensor(atoms, dtype=torch.int64)
        if counts.numel() != blocks * in_features or not int(counts.sum()) == atoms.numel() == values.numel():
            raise UsageError("DictionaryLinear: counts, atoms and values do not agree")
        column = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        block, col_in = column // in_features, column % in_features
        row = block * K + atoms
        order = torch.argsort(row * in_features + col_in, stable=True)
        crow = torch.zeros(blocks * K + 1, dtype=torch.int64)
        crow[1:] = torch.cumsum(torch.bincount(row, minlength=blocks * K), 0)
        self.in_features = in_features
        self.out_features = blocks * dim
        self.blocks = blocks
        self.dictionary = dictionary if isinstance(dictionary, nn.Parameter) else nn.Parameter(dictionary)
        self.register_buffer("crow", crow.to(torch.int32))
        self.register_buffer("col", col_in[order].to(torch.int32))
        self.values = nn.Parameter(torch.as_tensor(values)[order].to(self.dictionary.dtype).clone())
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias)

    def _codes(self) -> torch.Tensor:
        dim, K = self.dictionary.shape
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            return torch.sparse_csr_tensor(self.crow, self.col, self.values, (self.blocks * K, self.in_features),
                                           check_invariants=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim, K = self.dictionary.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.dictionary.dtype)
        z = (self._codes() @ x2.T).T.reshape(-1, self.blocks, K)  # batch × blocks × K
        y = (z @ self.dictionary.T).reshape(-1, self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The ``out × in`` weight (materialised; for inspection and tests)."""
        dim, K = self.dictionary.shape
        C = self._codes().to_dense().reshape(self.blocks, K, self.in_features)
        return (self.dictionary @ C).reshape(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        dim, K = self.dictionary.shape
        return (f"in_features={self.in_features}, out_features={self.out_features}, atoms={K}, blocks={self.blocks}, "
                f"nnz={self.values.numel()}, bias={self.bias is not None}")


# one Parameter per (open reader, dictionary owner), so a group's modules share D
_SHARED: "weakref.WeakKeyDictionary[Reader, dict[str, nn.Parameter]]" = weakref.WeakKeyDictionary()


def build_dictionary_linear(head: SectionInfo, reader: Reader, original: nn.Module) -> nn.Module:
    """``load_into`` hook: an ``nn.Linear`` becomes a :class:`DictionaryLinear`;
    any other owner keeps its class and gets the dense weight."""
    shape = head.params.get("shape")
    weight = getattr(original, "weight", None)
    if not isinstance(weight, torch.Tensor) or list(weight.shape) != shape:
        raise InputError(f"{reader.name}: {head.name!r} has shape {shape}, the model expects "
                         f"{list(weight.shape) if isinstance(weight, torch.Tensor) else None}")
    if not isinstance(original, nn.Linear):
        with torch.no_grad():
            weight.copy_(decode_dictionary(head, reader).to(weight.dtype))
        return original
    D_hat, counts, idx, values, blocks, cols = _decode_parts(head, reader)
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    shared = _SHARED.setdefault(reader, {})
    key = f"{head.params['dictionary']}:{dtype}"
    if key not in shared:
        shared[key] = nn.Parameter(torch.from_numpy(np.ascontiguousarray(D_hat)).to(dtype))
    return DictionaryLinear(shared[key], torch.from_numpy(counts), torch.from_numpy(idx),
                            torch.from_numpy(values).to(dtype), blocks=blocks, in_features=cols,
                            bias=original.bias)


register_decoder(Kind.DICTIONARY, decode_dictionary)
register_module(Kind.DICTIONARY, build_dictionary_linear)


def _register_encoder() -> None:
    from .archive import ENCODERS, register_encoder  # noqa: PLC0415 - archive imports this module

    if "dictionary" not in ENCODERS:
        register_encoder("dictionary", encode_dictionary)


_register_encoder()
