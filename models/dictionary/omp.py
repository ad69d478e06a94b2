"""Sparse coding: batched orthogonal matching pursuit over a dictionary with unit-norm atoms.

Batch-OMP of Rubinstein, Zibulevsky & Elad 2008: correlations updated through the
Gram matrix, Cholesky factor grown one row per step, vectorised over columns in
torch/float64. OMP is greedy and nested, so one deep run records every column's
codes and residual after 0, 1, 2, ... atoms (snapshots and residual curves).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ncz.format import UsageError

__all__ = ["SparseCodes", "batch_omp", "omp"]


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


def batch_omp(D: torch.Tensor, Y: torch.Tensor, limit: np.ndarray, snapshots: Sequence[np.ndarray] = (),
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
    codes, _, _ = batch_omp(D / norms, Y, limit)
    scale = norms.numpy()[codes.support]
    coef = np.where(np.arange(codes.coef.shape[1])[None, :] < codes.count[:, None], codes.coef / scale, 0.0)
    return SparseCodes(codes.support, coef, codes.count)
