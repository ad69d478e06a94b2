"""Whole models: dictionary-code the groups of a state dict, for ``pack(..., pre_encoded=...)``."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ncz.format import UsageError

from ..representation import Encoded, Progress
from .budget import encode_dictionary_group

__all__ = ["plan_dictionary"]


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
