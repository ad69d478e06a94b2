"""Size an archive by the metric a user cares about: :func:`pack_for_metric`.

A user wants "as small as possible while accuracy drops at most 0.5 points", not a
relative error per tensor. The presets already derive *how* the error is shared
between tensor classes (``rel_error`` per class, docs/MODELS.md *Presets*); this module
searches the one knob left, a global ``scale`` multiplying every ``rel_error`` (and
``calibrated_rel_error``) target of a base recipe, for the coarsest setting whose
metric stays within ``max_drop`` of the uncompressed model's.

Search, in u = log2(scale), where bits per weight fall about linearly::

    baseline (1 evaluation) ──► u = log2(start_scale) ──► bracket: step up while the bound
    holds, down while it fails, each step guessed from drop ≈ c·scale² (the presets'
    own model of drop against error) ──► interpolate log(drop) between the bracket ends
    (kept inside the middle 70 % so the bracket always shrinks) until it is narrower
    than ``tolerance`` or the evaluation budget is spent.

Archives with identical bytes (the writer is deterministic) are evaluated once. The
archive returned is always one that was evaluated, never an extrapolation.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ncz.format import UsageError

from .archive import PackReport, load_state_dict, pack
from .calibration import Calibration
from .checkpoint import TensorSource, open_checkpoint
from .recipe import Recipe

__all__ = ["MetricPoint", "MetricPackResult", "pack_for_metric"]

# options a scale multiplies; a target error ≥ ~0.5 leaves little of a tensor, so the
# scaled targets stop there (the coarsest scale puts every class at this cap)
_SCALED_OPTIONS = ("rel_error", "calibrated_rel_error")
_MAX_REL_ERROR = 0.5
_SLOWEST_STEP, _FASTEST_STEP = 1.0, 4.0  # log2 steps while bracketing: at least 2x, at most 16x in error
_INSIDE = 0.15
_SLACK = 1e-6  # interpolated points stay this share of the bracket away from its ends


@dataclass(frozen=True)
class MetricPoint:
    """One archive the search made. ``scale`` multiplies the base recipe's error targets
    (``None``: the lossless fallback). ``evaluated`` is False when the metric was not
    measured on this archive's own call: a byte-identical archive was measured already,
    or (lossless fallback) it decodes bit for bit to the input, whose metric is the baseline."""
    scale: float | None
    file_bytes: int
    bits_per_weight: float
    metric: float
    drop: float
    meets_bound: bool
    evaluated: bool = True


@dataclass(frozen=True)
class MetricPackResult:
    """What :func:`pack_for_metric` wrote and measured. ``curve`` lists every archive in
    the order made; :attr:`by_scale` sorts it. ``lossless_fallback`` is True when even the
    most precise scale broke the bound and the archive written is lossless."""
    path: Path
    report: PackReport
    chosen: MetricPoint
    baseline: float
    max_drop: float
    higher_is_better: bool
    relative: bool
    curve: tuple[MetricPoint, ...]
    evaluations: int  # calls of ``evaluate``, the baseline included
    lossless_fallback: bool

    @property
    def metric(self) -> float:
        return self.chosen.metric

    @property
    def drop(self) -> float:
        return self.chosen.drop

    @property
    def file_bytes(self) -> int:
        return self.chosen.file_bytes

    @property
    def bits_per_weight(self) -> float:
        return self.chosen.bits_per_weight

    @property
    def by_scale(self) -> tuple[MetricPoint, ...]:
        return tuple(sorted((p for p in self.curve if p.scale is not None), key=lambda p: p.scale or 0.0))


def scaled_recipe(base: Recipe, scale: float) -> Recipe:
    """``base`` with every ``rel_error`` / ``calibrated_rel_error`` target × ``scale``
    (capped at 0.5); other rules and options unchanged."""
    rules = []
    for rule in base.rules:
        options = dict(rule.options)
        for key in _SCALED_OPTIONS:
            if key in options:
                options[key] = min(float(options[key]) * scale, _MAX_REL_ERROR)
        rules.append(replace(rule, options=options))
    return Recipe(f"{base.name}*{scale:.6g}", tuple(rules))


def _error_targets(recipe: Recipe) -> list[float]:
    return [float(rule.options[key]) for rule in recipe.rules for key in _SCALED_OPTIONS if key in rule.options]


class _Search:
    """The state of one search: candidate archives in a scratch folder, the curve, caches."""

    def __init__(self, source: Any, evaluate_decoded: Callable[[Path], float], recipe: Recipe, scratch: Path,
                 baseline: float, max_drop: float, higher_is_better: bool, relative: bool,
                 pack_options: dict[str, Any]) -> None:
        self.source, self.evaluate_decoded, self.recipe, self.scratch = source, evaluate_decoded, recipe, scratch
        self.baseline, self.max_drop = baseline, max_drop
        self.higher_is_better, self.relative = higher_is_better, relative
        self.pack_options = pack_options
        # a drop of exactly max_drop must meet it although float32 metrics (82.8 - 82.5 = 0.3000021)
        # do not subtract exactly: allow 1e-6 of the baseline's magnitude
        self.slack = _SLACK * max(abs(baseline), 1.0) / (abs(baseline) if relative else 1.0)
        self.curve: list[MetricPoint] = []
        self.by_u: dict[float, MetricPoint] = {}
        self.metric_by_digest: dict[str, float] = {}
        self.paths: dict[int, tuple[Path, PackReport]] = {}  # id(point) → its archive, kept while it may win
        self.evaluations = 0

    def drop_of(self, metric: float) -> float:
        drop = self.baseline - metric if self.higher_is_better else metric - self.baseline
        return drop / abs(self.baseline) if self.relative else drop

    def point(self, u: float) -> MetricPoint:
        key = round(u, 9)
        if key in self.by_u:
            return self.by_u[key]
        scale = 2.0 ** u
        path = self.scratch / f"candidate-{len(self.curve)}.ncz"
        report = pack(self.source, path, recipe=scaled_recipe(self.recipe, scale), **self.pack_options)
        digest = _sha256(path)
        evaluated = digest not in self.metric_by_digest
        if evaluated:
            self.evaluations += 1
            self.metric_by_digest[digest] = self.evaluate_decoded(path)
        metric = self.metric_by_digest[digest]
        # a non-finite metric at a compressed setting means the model broke there (perplexity
        # overflowing, say): it fails the bound, like any large drop
        drop = self.drop_of(metric) if math.isfinite(metric) else math.inf
        point = MetricPoint(scale, report.file_bytes, report.bits_per_weight, metric, drop,
                            drop <= self.max_drop + self.slack, evaluated)
        self.curve.append(point)
        self.by_u[key] = point
        self.paths[id(point)] = (path, report)
        self._keep_only_best()
        return point

    def best(self) -> MetricPoint | None:
        meeting = [p for p in self.curve if p.meets_bound]
        return min(meeting, key=lambda p: (p.file_bytes, -(p.scale or 0.0))) if meeting else None

    def _keep_only_best(self) -> None:
        best = self.best()
        for point in self.curve:
            if point is not best and id(point) in self.paths:
                path, _ = self.paths.pop(id(point))
                path.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _power_law_step(point: MetricPoint, max_drop: float, upward: bool) -> float:
    """log2 step from ``point`` towards drop = max_drop under drop ∝ scale², bounded."""
    if 0 < point.drop < math.inf and max_drop > 0:
        step = 0.5 * math.log2(max_drop / point.drop)
    else:
        step = _FASTEST_STEP if upward else -_FASTEST_STEP
    step = min(max(abs(step), _SLOWEST_STEP), _FASTEST_STEP)
    return step if upward else -step


def _interpolate(lo: MetricPoint, hi: MetricPoint, u_lo: float, u_hi: float, max_drop: float) -> float:
    """Where log(drop) between the bracket ends reaches log(max_drop), kept inside the bracket."""
    width = u_hi - u_lo
    fraction = 0.5
    if 0 < lo.drop < hi.drop < math.inf and max_drop > 0:
        fraction = (math.log(max_drop) - math.log(lo.drop)) / (math.log(hi.drop) - math.log(lo.drop))
    fraction = min(max(fraction, _INSIDE), 1 - _INSIDE)
    return u_lo + fraction * width


def pack_for_metric(model_or_checkpoint: torch.nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike[str]
                    | TensorSource,
                    evaluate: Callable[[Any], float], max_drop: float, *, output: str | os.PathLike[str],
                    higher_is_better: bool = True, relative: bool = False, recipe: Recipe | str = "q8",
                    max_evaluations: int = 8, tolerance: float = 0.125, start_scale: float = 1.0,
                    min_scale: float = 1 / 16, calibration: Calibration | None = None, workers: int = 2,
                    metadata: Mapping[str, Any] | None = None) -> MetricPackResult:
    """Write to ``output`` the smallest archive found whose metric drops at most ``max_drop``
    from the uncompressed model's, and return it with the curve measured on the way.

    ``evaluate`` gets the decoded weights and returns a float: given an ``nn.Module`` it
    gets a copy of that module (made once; the caller's module is never modified) with the
    archive's weights loaded; given a state dict, checkpoint path or TensorSource it gets a
    state dict of dense tensors (original names and dtypes). It is called once on the
    uncompressed weights (the baseline), then once per distinct archive.

    The drop is ``baseline - metric`` (``higher_is_better``, e.g. accuracy) or
    ``metric - baseline`` (perplexity, loss), divided by ``|baseline|`` when ``relative``.
    The knob is a ``scale`` on every ``rel_error`` target of ``recipe`` (a preset name or a
    Recipe; the presets' per-class allocation is kept), searched in log space from
    ``start_scale`` between ``min_scale`` (most precise) and the scale that puts every target
    at 0.5, until the bracket is narrower than ``tolerance`` (log2 of scale, about as many
    bits per weight) or ``max_evaluations`` calls (baseline included) were made.

    A drop within 1e-6 × |baseline| of ``max_drop`` meets it (float32 rounding of the metric).
    Unreachable bound: when even ``min_scale`` breaks it, the archive written is lossless
    (it decodes bit for bit to the input, so its drop is 0) and ``lossless_fallback`` is True.
    A non-finite metric at a compressed setting counts as breaking the bound.

    Raises UsageError for a bad argument, a non-finite or non-numeric baseline, a recipe
    with no ``rel_error`` target, or when ``evaluate`` raises (chained, naming the setting).
    """
    if isinstance(recipe, str):
        recipe = Recipe.preset(recipe)
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop < math.inf:
        raise UsageError(f"max_drop must be a finite number >= 0, got {max_drop!r}")
    if isinstance(max_evaluations, bool) or not isinstance(max_evaluations, int) or max_evaluations < 2:
        raise UsageError(f"max_evaluations must be an integer >= 2 (the baseline and one archive), "
                         f"got {max_evaluations!r}")
    for label, value in (("tolerance", tolerance), ("start_scale", start_scale), ("min_scale", min_scale)):
        if not 0 < value < math.inf:
            raise UsageError(f"{label} must be a finite number > 0, got {value!r}")
    targets = _error_targets(recipe)
    if not targets:
        raise UsageError(f"recipe {recipe.name!r} has no rel_error target to scale (pack_for_metric needs one)")
    u_min = math.log2(min_scale)
    u_max = max(u_min, math.log2(_MAX_REL_ERROR / min(targets)))

    if isinstance(model_or_checkpoint, torch.nn.Module):
        module = model_or_checkpoint
        source: Any = {name: tensor.detach() for name, tensor in module.state_dict().items()}
        working_copy = copy.deepcopy(module)  # evaluated with each archive's weights; the caller's stays as it is

        def call(state: Mapping[str, torch.Tensor]) -> Any:
            working_copy.load_state_dict(dict(state), strict=True)
            return evaluate(working_copy)
        baseline_state: Mapping[str, torch.Tensor] = source
    else:
        if isinstance(model_or_checkpoint, Mapping):
            source = model_or_checkpoint
            baseline_state = model_or_checkpoint
        else:
            source = (model_or_checkpoint if isinstance(model_or_checkpoint, TensorSource)
                      else open_checkpoint(model_or_checkpoint))
            baseline_state = {name: source.load(name) for name in source.names}

        def call(state: Mapping[str, torch.Tensor]) -> Any:
            return evaluate(dict(state))

    def measured(state: Mapping[str, torch.Tensor], where: str) -> float:
        try:
            value = call(state)
        except Exception as exc:  # the user's code: name the setting it failed on, keep the cause
            raise UsageError(f"pack_for_metric: evaluate raised {type(exc).__name__} on {where}: {exc}") from exc
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"pack_for_metric: evaluate must return a float, got {type(value).__name__} on {where}")
        return float(value)

    baseline = measured(baseline_state, "the uncompressed weights")
    if not math.isfinite(baseline):
        raise UsageError(f"pack_for_metric: the uncompressed model's metric is {baseline}; a bound needs a finite one")
    if relative and baseline == 0:
        raise UsageError("pack_for_metric: relative=True needs a non-zero baseline metric")
    del baseline_state

    output = Path(output)
    pack_options = {"calibration": calibration, "workers": workers, "metadata": metadata}
    scratch = Path(tempfile.mkdtemp(prefix=".ncz-metric-", dir=output.parent))
    try:
        search = _Search(source, lambda path: measured(load_state_dict(path), f"the archive {path.name}"),
                         recipe, scratch, baseline, float(max_drop), higher_is_better, relative, pack_options)
        search.evaluations = 1
        _run(search, min(max(math.log2(start_scale), u_min), u_max), u_min, u_max, tolerance, max_evaluations)
        best = search.best()
        if best is not None:
            path, report = search.paths[id(best)]
            os.replace(path, output)
            return MetricPackResult(output, replace(report, path=output), best, baseline, float(max_drop),
                                    higher_is_better, relative, tuple(search.curve), search.evaluations, False)
        report = pack(source, output, recipe="lossless", **pack_options)
        lossless = MetricPoint(None, report.file_bytes, report.bits_per_weight, baseline, 0.0, True, evaluated=False)
        return MetricPackResult(output, report, lossless, baseline, float(max_drop), higher_is_better, relative,
                                (*search.curve, lossless), search.evaluations, True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(search: _Search, u: float, u_min: float, u_max: float, tolerance: float, max_evaluations: int) -> None:
    """Bracket, then narrow, the largest u whose archive meets the bound."""
    packs_left = 3 * max_evaluations  # identical archives cost no evaluation; this bounds the packing
    while search.evaluations < max_evaluations and packs_left > 0:
        packs_left -= 1
        search.point(u)
        # the bracket from everything measured: a noisy metric that meets the bound above a
        # failure is not trusted (lo stays below the most precise failure)
        failing = [k for k, p in search.by_u.items() if not p.meets_bound]
        hi = min(failing) if failing else None
        meeting = [k for k, p in search.by_u.items() if p.meets_bound and (hi is None or k < hi)]
        lo = max(meeting) if meeting else None
        if hi is None:  # everything so far meets: go coarser
            assert lo is not None
            if lo >= u_max:
                return
            u = min(u_max, lo + _power_law_step(search.by_u[lo], search.max_drop, upward=True))
        elif lo is None:  # everything so far breaks it: go more precise
            if hi <= u_min:
                return
            u = max(u_min, hi + _power_law_step(search.by_u[hi], search.max_drop, upward=False))
        else:
            if hi - lo <= tolerance:
                return
            u = _interpolate(search.by_u[lo], search.by_u[hi], lo, hi, search.max_drop)
