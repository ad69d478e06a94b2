"""Compression-friendly training (BSR §3.2): the stable-rank penalty.

After Eo, Kang & Rhee (Neural Networks 2023, "BSR"). BSR trains with a regularizer built
on the stable rank, srank(W) = ‖W‖_F² / ‖W‖_2², a smooth surrogate of the rank, modified
for the target rank r chosen by rank selection. The form used here is

    srank_r(W) = (‖W‖_F² − Σ_{i≤r} σ_i²) / sg(σ_1²) = Σ_{i>r} σ_i² / sg(σ_1²),

i.e. the energy *beyond the target rank* in units of the largest singular value (r =
0 gives the plain stable rank), with sg = stop-gradient on the normalizer. It is
zero exactly when W has rank ≤ r, its value is scale-free (comparable across layers,
one λ for all), and its gradient 2·W(I − Q_r Q_rᵀ)/σ_1² shrinks only the components
that truncation will drop, each layer at a rate set by its own scale. The stop-
gradient matters: differentiated through σ_1², the network lowers the ratio by
inflating σ_1 and keeps the tail. On the digits MLP of ``bench/stable_rank.py``
(hidden layers truncated to rank 4, mean of 3 seeds) test accuracy after truncation
was 0.42 without penalty, 0.55 with the penalty differentiated through σ_1² and 0.90
with the stop-gradient (dense: 0.98 / 0.97 / 0.92; rank-4 models trained factorized
reach ≈ 0.90); at rank 6: 0.82 without, 0.95 with. σ_1 and the top-r subspace Q_r
come from warm-started subspace (power) iteration with stop-gradient on the vectors,
as in spectral normalization; by the envelope theorem the gradient is exact at
convergence. (We could not check every detail of the paper's own normalization;
this is the variant documented and measured here.)
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch
from torch import nn

from ncz.format import UsageError

from .svd import matrix_shape

__all__ = ["stable_rank_penalty"]


_FACTORIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
_STATES: weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def _orthonormalize(z: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of Z's columns (float64) through the k×k Gram matrix, twice (CholeskyQR2-style).

    Only k×k LAPACK calls: on a busy machine a threaded QR or SVD of a tall,
    skinny matrix costs milliseconds of thread synchronization; a k×k eigh does
    not. A rank-deficient Z falls back to QR.
    """
    for _ in range(2):
        lam, vec = torch.linalg.eigh(z.T @ z)
        if not bool(lam[0] > lam[-1] * 1e-12) or not bool(lam[-1] > 0):
            return torch.linalg.qr(z)[0]
        z = z @ (vec / lam.sqrt())
    return z


def _subspace(w: torch.Tensor, k: int, state: torch.Tensor | None, iterations: int) -> torch.Tensor:
    """Orthonormal n×k basis (float64) of W's top-k right singular subspace, Ritz-ordered (no gradient).

    Subspace iteration Q ← orth(Wᵀ·orth(W·Q)), warm-started from ``state``, then
    Rayleigh–Ritz so that column j carries σ_j (decreasing).
    """
    w = w.double()
    n = w.shape[1]
    if state is None or state.shape != (n, k) or state.device != w.device:
        generator = torch.Generator().manual_seed(n * 131 + k)
        state = _orthonormalize(torch.randn(n, k, generator=generator, dtype=torch.float64).to(w.device))
        iterations = max(iterations, 30)
    q = state
    for _ in range(iterations):
        q = _orthonormalize(w.T @ _orthonormalize(w @ q))
    b = w @ q
    _, vec = torch.linalg.eigh(b.T @ b)
    return q @ vec.flip(1)


def _weights(model: nn.Module):
    """(state-dict name, weight) of every matrix :func:`plan_lowrank` would factorize: Linear,
    ConvNd and Embedding weights, and an RNN's ``weight_ih_l*`` / ``weight_hh_l*`` (an LSTM keeps its
    matrices as parameters of one module, not as Linear layers)."""
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, _FACTORIZABLE):
            yield prefix + "weight", module.weight
        elif isinstance(module, nn.RNNBase):
            for name, weight in module._parameters.items():
                if name.startswith("weight_") and weight is not None:
                    yield prefix + name, weight


def stable_rank_penalty(model: nn.Module, ranks: Mapping[str, int] | float | None = None, *,
                        iterations: int = 1, method: str = "power", detach_sigma: bool = True) -> torch.Tensor:
    """BSR's modified stable rank, averaged over the model's factorizable layers (a differentiable loss term).

    For each ``nn.Linear`` / ``nn.ConvNd`` / ``nn.Embedding`` weight and RNN matrix W (matrix view out × in·k…)
    with target rank r:  srank_r(W) = (‖W‖_F² − Σ_{i≤r} σ_i²) / σ_1²  (see the
    module docstring). Add ``λ · stable_rank_penalty(model, ranks)`` to the
    training loss (λ ≈ 1 worked on the digits MLP); ranks from
    :func:`select_ranks` make the weights concentrate their energy where
    truncation will keep it. ``detach_sigma`` (default True) stops the gradient
    through the σ_1² normalizer; False is the naive variant, kept for the
    ablation in ``bench/stable_rank.py``.

    ``ranks``: a mapping from weight names (``"fc1.weight"``, as in the
    state dict) to target ranks (layers absent or with a rank ≥ min(m, n) are
    not penalized); a float in (0, 1] (target = that fraction of min(m, n),
    at least 1); or None (r = 0: the plain stable rank of every layer).

    ``method="power"`` (default): σ_1 and the top-r subspace by subspace
    iteration on WᵀW, ``iterations`` steps per call warm-started from the
    previous call (kept per model), vectors detached — two skinny matmuls per
    layer. ``method="svd"``: exact singular values (torch.linalg.svdvals), for
    small layers or checking.
    """
    if method not in ("power", "svd"):
        raise UsageError(f"method must be 'power' or 'svd', got {method!r}")
    if not isinstance(iterations, int) or iterations < 0:
        raise UsageError(f"iterations must be an int ≥ 0, got {iterations!r}")
    if isinstance(ranks, (int, float)) and not isinstance(ranks, bool) and not 0 < ranks <= 1:
        raise UsageError(f"a fractional target rank must be in (0, 1], got {ranks!r}")
    states = _STATES.setdefault(model, {})
    terms = []
    for name, weight in _weights(model):
        m, n = matrix_shape(weight.shape)
        full = min(m, n)
        if isinstance(ranks, Mapping):
            if name not in ranks:
                continue
            target = int(ranks[name])
        elif ranks is None:
            target = 0
        else:
            target = max(1, round(float(ranks) * full))
        if target >= full:
            continue
        w = weight.reshape(m, n)
        if method == "svd":
            s2 = torch.linalg.svdvals(w.float()) ** 2
            scale = s2[0].detach() if detach_sigma else s2[0]
            terms.append(s2[target:].sum() / scale.clamp_min(1e-30))
            continue
        k = max(target, 1)
        with torch.no_grad():
            basis = _subspace(w.detach(), k, states.get(name), iterations)
            states[name] = basis
        projected = w.float() @ basis.float()  # m×k, differentiable in W only
        total = w.float().pow(2).sum()
        head = projected[:, :target].pow(2).sum()
        sigma1_sq = projected[:, 0].pow(2).sum().clamp_min(1e-30)
        if detach_sigma:
            sigma1_sq = sigma1_sq.detach()
        terms.append((total - head).clamp_min(0) / sigma1_sq)
    if not terms:
        return torch.zeros((), requires_grad=False)
    return torch.stack(terms).mean()
