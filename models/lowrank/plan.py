"""Whole models: :func:`plan_lowrank` runs :func:`~.selection.select_ranks` over a state
dict and returns a :class:`~ncz.models.Recipe` with one exact-name rule per factorized
tensor, for ``pack(..., recipe=plan)``.

This module sits above the recipe (it builds one), so the ``lowrank`` package does not
import it: the registry imports the representation without pulling in recipes.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ncz.format import UsageError

from ..recipe import Recipe
from .selection import Progress, check_ratio, select_ranks
from .svd import matrix_shape

__all__ = ["plan_lowrank"]


def _glob_escape(name: str) -> str:
    """An fnmatch pattern matching exactly ``name``."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def _rule_dicts(fallback: Recipe | str | Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    if fallback is None:
        return [{"pattern": "*", "representation": "lossless"}]
    if isinstance(fallback, str):
        fallback = Recipe.preset(fallback)
    if isinstance(fallback, Recipe):
        rules = []
        for rule in fallback.rules:
            entry: dict[str, Any] = {"pattern": rule.pattern, "representation": rule.representation, **rule.options}
            if rule.ndim is not None:
                entry["ndim"] = list(rule.ndim)
            if rule.min_numel:
                entry["min_numel"] = rule.min_numel
            rules.append(entry)
        return rules
    return [dict(rule) for rule in fallback]


def plan_lowrank(state_dict: Mapping[str, torch.Tensor], ratio: float, *, min_numel: int = 4096,
                 exclude: Sequence[str] = (), factor_rel_error: float | None = 0.01, bits: float | None = None,
                 beam_width: int = 4, steps: int | None = None,
                 proxy: str | Callable[[dict[str, int]], float] = "relative",
                 sensitivity: Mapping[str, float] | None = None,
                 fallback: Recipe | str | Sequence[Mapping[str, Any]] | None = None,
                 progress: Progress | None = None) -> Recipe:
    """A recipe that packs ``state_dict`` with jointly selected ranks (:func:`select_ranks`).

    Candidates: floating-point, finite tensors of ≥ 2 dimensions with at least
    ``min_numel`` elements whose name matches none of the ``exclude`` globs.
    ``ratio`` applies to the candidates' parameter count (biases, norms and
    small tensors are left to ``fallback``, default lossless; pass e.g. ``"q8"``
    to quantize them and the layers kept dense). Each factorized tensor gets
    an exact-name rule ``{"representation": "lowrank", "rank": r, ...}``, with
    its factors quantized to ``factor_rel_error`` (or ``bits`` per factor entry).
    """
    weights = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() < 2:
            continue
        if tensor.numel() < min_numel or any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            continue
        if not bool(torch.isfinite(tensor).all()):
            continue
        weights[name] = tensor
    if bits is not None:  # bits wins over the default factor_rel_error
        options: dict[str, Any] = {"bits": float(bits)}
    elif factor_rel_error is not None:
        options = {"factor_rel_error": float(factor_rel_error)}
    else:
        raise UsageError("give factor_rel_error or bits for the factors")
    rules: list[dict[str, Any]] = []
    if weights:
        ranks = select_ranks(weights, ratio, beam_width=beam_width, steps=steps, proxy=proxy,
                             sensitivity=sensitivity, progress=progress)
        for name, rank in ranks.items():
            m, n = matrix_shape(weights[name].shape)
            if rank < min(m, n):
                rules.append({"pattern": _glob_escape(name), "representation": "lowrank", "rank": int(rank), **options})
    rules.extend(_rule_dicts(fallback))
    return Recipe.from_dict({"name": f"lowrank-x{check_ratio(ratio):g}", "rule": rules})
