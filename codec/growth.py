"""A trained codec's state grown without a new run: more λ levels, a checkerboard context.

Both return a new training state (what :meth:`~ncz.codec.train.Trainer.state_dict` writes, or a
weights snapshot) whose model computes the same function at first, so training continues from it
(``train_codec --add-lambdas`` / ``--checkerboard``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from .architectures import CHECKERBOARD_ARCH, HYPERPRIOR_ARCH, build_codec
from .networks import CodecConfig

__all__ = ["add_levels", "add_checkerboard_context"]

_GAIN_TABLES = ("gains.log_gain", "gains.log_inv_gain")


def add_levels(state: dict, lambdas: Sequence[float]) -> dict:
    """A training checkpoint with extra λ levels, every other tensor unchanged.

    Why: a variable-rate model's rate range is set by its λ list; reaching a
    lower (or higher) rate later should not cost a new run. Only the gain
    tables (one row per level) grow. A new row is the per-channel *linear
    extrapolation in log λ* of the two nearest trained rows (interpolation
    when it falls between them): at high rate the optimal gain scales as
    ``λ^(1/2)`` and the trained rows follow that law closely, so the new
    level starts near its final place and needs only a short fine-tune.
    Adam's first moment of a new row starts at 0 and its second moment is
    copied from the nearest trained row, so the first updates are not
    oversized. ``state`` is what :meth:`~ncz.codec.train.Trainer.state_dict` returns (or a
    weights snapshot without ``optimizer``); it is not modified.
    """
    old = CodecConfig.from_dict(state["model_config"])
    added = sorted({float(v) for v in lambdas} - set(old.lambdas))
    if any(not (math.isfinite(v) and v > 0) for v in added):
        raise ValueError(f"λ values must be positive and finite, got {added}")
    if not added:
        return state
    new = replace(old, lambdas=tuple(sorted(old.lambdas + tuple(added))))
    log_old = np.log(np.asarray(old.lambdas, dtype=np.float64))
    L = len(log_old)
    sources = []  # per new level: ("copy", i) or ("blend", i, j, t)
    for lam in new.lambdas:
        if lam in old.lambdas:
            sources.append(("copy", old.lambdas.index(lam)))
            continue
        i = int(np.clip(np.searchsorted(log_old, math.log(lam)) - 1, 0, L - 2))
        t = (math.log(lam) - log_old[i]) / (log_old[i + 1] - log_old[i])
        sources.append(("blend", i, i + 1, t))

    def blend(table: torch.Tensor, i: int, j: int, t: float) -> torch.Tensor:
        return (1 - t) * table[i] + t * table[j]

    def nearest(table: torch.Tensor, i: int, j: int, t: float) -> torch.Tensor:
        return table[j if t > 0.5 else i]

    def zero(table: torch.Tensor, i: int, j: int, t: float) -> torch.Tensor:
        return torch.zeros_like(table[i])

    def grow(table: torch.Tensor, new_row) -> torch.Tensor:
        """Trained rows copied; a new level's row is ``new_row(table, i, j, t)``."""
        return torch.stack([table[src[1]] if src[0] == "copy" else new_row(table, *src[1:]) for src in sources])

    out = dict(state)
    out["model_config"] = new.to_dict()
    for key in ("model", "ema"):  # the moving average grows the same rows
        if state.get(key) is not None:
            weights = dict(state[key])
            for name in _GAIN_TABLES:
                weights[name] = grow(weights[name], blend)
            out[key] = weights
    if "optimizer" in state:
        names = [n for n, _ in build_codec(old).named_parameters()]
        opt = dict(state["optimizer"])
        opt_state = dict(opt["state"])
        for name in _GAIN_TABLES:
            idx = names.index(name)
            if idx in opt_state:
                moments = dict(opt_state[idx])
                moments["exp_avg"] = grow(moments["exp_avg"], zero)
                moments["exp_avg_sq"] = grow(moments["exp_avg_sq"], nearest)
                opt_state[idx] = moments
        opt["state"] = opt_state
        out["optimizer"] = opt
    return out


def add_checkerboard_context(state: dict, seed: int = 0) -> dict:
    """A hyperprior training state turned into a checkerboard-context one, same function at first.

    Why: the context model (:mod:`ncz.codec.context`) is a residual on the
    hyperprior's parameters whose last layer starts at zero, so a trained
    hyperprior continues as a checkerboard model without a step back. The
    new tensors are freshly initialised (seeded); the moving average gets the
    same ones. The optimizer state is dropped (its parameter list changed):
    the trainer starts a fresh Adam, as after ``--init-from``.
    """
    old = CodecConfig.from_dict(state["model_config"])
    if old.arch == CHECKERBOARD_ARCH:
        return state
    if old.arch != HYPERPRIOR_ARCH:
        raise ValueError(f"cannot add a checkerboard context to architecture {old.arch!r}")
    new = replace(old, arch=CHECKERBOARD_ARCH)
    torch.manual_seed(seed)
    fresh = {k: v for k, v in build_codec(new).state_dict().items() if k.startswith("context_model.")}
    out = {k: v for k, v in state.items() if k != "optimizer"}
    out["model_config"] = new.to_dict()
    out["model"] = {**state["model"], **fresh}
    if state.get("ema") is not None:
        out["ema"] = {**state["ema"], **fresh}
    return out
