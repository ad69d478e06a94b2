"""Quantization-aware fine-tuning against a recipe: the forward pass sees the weights the archive will hold.

Post-training rounding at 1–2 bits per weight costs a task dearly; a model fine-tuned *through*
the rounding learns to live with it (straight-through estimator, Bengio et al. 2013; QAT,
Jacob et al., CVPR 2018; TernaryBERT, Zhang et al., EMNLP 2020). What matters for an archive is
that the training rounds the way the packer will: :class:`QuantAware` takes each module weight
whose recipe rule is ``quantized`` and replaces it, through a ``torch.nn.utils.parametrize``
parametrization, by ``round(W / S) · S`` with a straight-through gradient to the latent ``W``. The
steps ``S`` are ncz's own (:func:`~ncz.models.quantized.quantize_codes` with the rule's
``bits`` / ``rel_error``, ``granularity`` and ``group_size``), recomputed from the latent weights
every ``refresh_every`` calls of :meth:`QuantAware.step` (the bisection is cheap, but not per
batch). After :meth:`QuantAware.detach` the model holds the latent weights again and
``pack(model.state_dict(), recipe=rounding.packing_recipe)`` stores exactly what a refresh on them
computes, i.e. what the last forward used up to the few weights that crossed a rounding boundary
since. ``packing_recipe`` is the recipe with ``rdoq`` off in its quantized rules (a recipe may turn
it on): RDOQ would choose other indices than the rounding the model was trained through.

Calibrated rounding (GPTQ) is not modelled: train data-free, pack data-free.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ncz.format import UsageError

from .quantized import dequantize, quantize_codes
from .recipe import Recipe

__all__ = ["QuantAware"]


class _RoundToSteps(nn.Module):
    """``round(W / S) · S`` forward, identity backward (straight-through); identity until steps are set."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.empty(0), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.steps.numel() == 0:
            return weight
        rounded = torch.round(weight / self.steps) * self.steps
        return weight + (rounded - weight).detach()


def _view(shape: torch.Size) -> tuple[int, int]:
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (int(np.prod(shape)) // rows if rows else 0)


class _Target:
    """One parametrized weight, with the options its recipe rule quantizes it at."""

    def __init__(self, name: str, module: nn.Module, options: dict) -> None:
        self.name, self.module = name, module
        self.bits, self.rel_error = options.get("bits"), options.get("rel_error")
        if (self.bits is None) == (self.rel_error is None):
            raise UsageError(f"{name}: a quantized rule needs exactly one of bits or rel_error")
        self.group_size = int(options.get("group_size", 64))
        shape = module.weight.shape
        rows, cols = _view(shape)
        granularity = options.get("granularity", "channel")
        if granularity == "group" and cols % self.group_size:
            granularity = "channel"  # as encode_quantized: the row does not split into groups
        if granularity == "rowcol" and (len(shape) < 2 or cols < 2):
            granularity = "channel"
        self.granularity = granularity

    def refresh(self) -> None:
        rounding = self.module.parametrizations.weight[0]
        latent = self.module.parametrizations.weight.original.detach()
        rows, cols = _view(latent.shape)
        w2 = latent.float().cpu().numpy().reshape(rows, cols)
        result = quantize_codes(w2, rel_error=self.rel_error, bits=self.bits, granularity=self.granularity,
                                group_size=self.group_size)
        # the float32 step of every weight, exactly as the decoder multiplies it
        steps = dequantize(np.ones_like(result.q), result.steps, self.granularity, self.group_size)
        steps = np.where(steps > 0, steps, np.float32(1.0))  # an all-zero tensor has step 0: keep it as is
        rounding.steps = torch.from_numpy(np.ascontiguousarray(steps)).reshape(latent.shape).to(latent)


class QuantAware:
    """Fake-quantize every module weight that ``recipe`` stores as ``quantized``.

    ``model`` parameter names must be the names the archive will use (pack ``model.state_dict()``).
    Call :meth:`step` once per optimizer step (it refreshes the steps when due), :meth:`detach`
    when done. Weights under other rules (lossless, codebook, low-rank …) train in full precision.
    """

    def __init__(self, model: nn.Module, recipe: Recipe | str, *, refresh_every: int = 16) -> None:
        if refresh_every < 1:
            raise UsageError(f"refresh_every must be >= 1, got {refresh_every}")
        recipe = Recipe.preset(recipe) if isinstance(recipe, str) else recipe
        self.model, self.recipe, self.refresh_every = model, recipe, refresh_every
        self.packing_recipe = Recipe(recipe.name, tuple(
            replace(rule, options={**rule.options, "rdoq": False})
            if rule.representation == "quantized" and rule.options.get("rdoq") else rule for rule in recipe.rules))
        self.targets: list[_Target] = []
        self._calls = 0
        for module_name, module in list(model.named_modules()):
            weight = module._parameters.get("weight")
            if weight is None or not weight.is_floating_point() or parametrize.is_parametrized(module, "weight"):
                continue
            name = f"{module_name}.weight" if module_name else "weight"
            rule = recipe.choose(name, weight.detach())
            if rule.representation != "quantized":
                continue
            target = _Target(name, module, rule.options)
            parametrize.register_parametrization(module, "weight", _RoundToSteps())
            self.targets.append(target)
        self.refresh()

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    def refresh(self) -> None:
        """Recompute every step from the current latent weights."""
        with torch.no_grad():
            for target in self.targets:
                target.refresh()

    def step(self) -> None:
        """Count one optimizer step; refresh the steps every ``refresh_every`` of them."""
        self._calls += 1
        if self._calls % self.refresh_every == 0:
            self.refresh()

    def detach(self) -> nn.Module:
        """Remove the rounding: the model holds its latent weights (what ``pack`` takes). Returns the model."""
        for target in self.targets:
            if parametrize.is_parametrized(target.module, "weight"):
                parametrize.remove_parametrizations(target.module, "weight", leave_parametrized=False)
        self.targets = []
        return self.model
