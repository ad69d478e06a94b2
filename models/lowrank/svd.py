"""Shapes, SVDs and truncation errors shared by rank selection, the encoder and the penalty."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ncz.format import UsageError

__all__ = ["matrix_shape", "break_even_rank", "thin_svd", "singular_values", "truncation_tails", "factorize"]

SVD_F64_LIMIT = 1 << 18  # matrices up to 256 Ki entries get a float64 SVD; larger ones float32 (speed)


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(out, in·kh·kw…): the 2-D view a weight is factorized in."""
    m = int(shape[0])
    n = 1
    for d in shape[1:]:
        n *= int(d)
    return m, n


def break_even_rank(m: int, n: int) -> int:
    """The largest rank whose factors r·(m+n) hold fewer numbers than the dense m·n (0: none)."""
    return (m * n - 1) // (m + n) if m > 0 and n > 0 else 0


def thin_svd(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD (U, s, Vh) of a 2-D tensor as float64 arrays, with deterministic signs."""
    work = w.detach().cpu().double() if w.numel() <= SVD_F64_LIMIT else w.detach().cpu().float()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    u, s, vh = u.double().numpy(), s.double().numpy(), vh.double().numpy()
    if s.size:  # sign convention: the largest |entry| of each right singular vector is positive
        idx = np.abs(vh).argmax(axis=1)
        signs = np.where(vh[np.arange(vh.shape[0]), idx] < 0, -1.0, 1.0)
        u, vh = u * signs, vh * signs[:, None]
    return u, s, vh


def singular_values(w: torch.Tensor) -> np.ndarray:
    work = w.detach().cpu().double() if w.numel() <= SVD_F64_LIMIT else w.detach().cpu().float()
    return torch.linalg.svdvals(work).double().numpy()


def truncation_tails(s: np.ndarray) -> np.ndarray:
    """tail[r] = Σ_{i≥r} σ_i² for r = 0..len(s) (tail[len(s)] = 0): the squared rank-r truncation error."""
    sq = s.astype(np.float64) ** 2
    tail = np.zeros(sq.size + 1)
    tail[:-1] = np.cumsum(sq[::-1])[::-1]
    return tail


def factorize(tensor: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors (U·√S, √S·Vᵀ) of ``tensor``'s matrix view, float32, unquantized.

    The best rank-r approximation in Frobenius and spectral norm (Eckart–Young),
    with the singular values split evenly so that both factors have the same
    scale (which is what makes one quantization step per factor sensible).
    """
    if tensor.dim() < 2:
        raise UsageError(f"factorize needs a tensor of 2 or more dimensions, got shape {list(tensor.shape)}")
    m, n = matrix_shape(tensor.shape)
    if not 1 <= rank <= min(m, n):
        raise UsageError(f"rank {rank} is outside 1..{min(m, n)} for a {m}×{n} matrix")
    u, s, vh = thin_svd(tensor.reshape(m, n))
    root = np.sqrt(s[:rank])
    return (torch.from_numpy((u[:, :rank] * root).astype(np.float32)),
            torch.from_numpy((root[:, None] * vh[:rank]).astype(np.float32)))
