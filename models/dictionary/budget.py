"""One budget for a group sharing a dictionary: atoms, sparsity per tensor and column, value steps.

DirNet adapts two things to meet one budget (the package docstring says what is coded):

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
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ncz.format import UsageError

from ..quantized import quantize
from ..representation import Encoded, Progress, dtype_name
from .format import TensorCode, delta_code, dictionary_sections, reconstruct
from .learning import initial_dictionary, learn_for_target
from .omp import SparseCodes, batch_omp

__all__ = ["encode_dictionary_group", "encode_dictionary"]

_DEFAULT_SHARES = (0.3, 0.5, 0.7)
_ITEM_BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "float64": 64}


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
class _Realized:
    K: int
    qD: np.ndarray  # (d, K) int32
    stepD: np.ndarray  # (1, 1) float32
    codes: list[TensorCode]
    bits: float  # estimated stored bits of the group
    objective: float  # Σ numel · err² / Σ numel
    retry: Callable[[float], _Realized]  # the same allocation with another value share

    def worst(self) -> float:
        return max((c.rel_error for c in self.codes), default=0.0)



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
            restored = reconstruct(D_hat, counts, atoms, q.astype(np.float32) * step.reshape(()),
                                    m.blocks, m.cols, m.tensor.shape)
            err = _restored_error(m, restored)
            bits += _ans_bits(counts) + _ans_bits(delta_code(counts, atoms)) + _ans_bits(q) + 32
            objective += m.tensor.numel() * err * err
            out.append(TensorCode(counts, atoms.astype(np.int64), q.astype(np.int32), step.astype(np.float32), err))
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
    return dictionary_sections([m.name for m in members], [m.tensor for m in members], [m.blocks for m in members],
                               d, best.K, best.qD, best.stepD, best.codes)


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



def _learn(group: _Group, D: torch.Tensor, target: float, sweeps: int, *, climb: bool,
           tick: Callable[[str], None], label: str) -> tuple[torch.Tensor, int, float]:
    """:func:`~.learning.learn_for_target` with every column allowed its tensor's mean
    residual energy at relative error ``target``."""
    columns = np.array([m.sl.stop - m.sl.start for m in group.members], dtype=np.float64)
    owner = np.concatenate([np.full(m.sl.stop - m.sl.start, t) for t, m in enumerate(group.members)])
    stop = ((target * target) * group.numel / columns)[owner]
    return learn_for_target(D, group.Yn, stop, sweeps, climb=climb, tick=tick, label=label)


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
            codes, curve, _ = batch_omp(D, Y, np.full(N, smax), want_curve=True)
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
    D0 = initial_dictionary(Y, K, seed)
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

