"""Recipes: which representation each tensor gets.

A recipe is an ordered list of rules; the first rule whose glob ``pattern``
matches the tensor name (and whose optional ``ndim`` / ``min_numel`` filters
hold) decides. TOML form::

    name = "my-recipe"

    [[rule]]
    pattern = "*.word_embeddings.weight"
    representation = "quantized"
    rel_error = 0.02

    [[rule]]
    pattern = "*"
    min_numel = 4096
    ndim = [2, 4]
    representation = "quantized"
    bits = 4.0

    [[rule]]
    pattern = "*"
    representation = "lossless"

Every option other than the rule keys goes to the representation's encoder.
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ncz.format import InputError, UsageError

__all__ = ["Rule", "Recipe", "PRESETS"]

_RULE_KEYS = {"pattern", "representation", "ndim", "min_numel"}


@dataclass(frozen=True)
class Rule:
    pattern: str
    representation: str
    options: dict[str, Any] = field(default_factory=dict)
    ndim: tuple[int, ...] | None = None
    min_numel: int = 0

    def matches(self, name: str, tensor: torch.Tensor) -> bool:
        if not fnmatch.fnmatchcase(name, self.pattern):
            return False
        if self.ndim is not None and tensor.dim() not in self.ndim:
            return False
        if tensor.numel() < self.min_numel:
            return False
        return True


@dataclass(frozen=True)
class Recipe:
    name: str
    rules: tuple[Rule, ...]

    def __post_init__(self) -> None:
        from .archive import ENCODERS  # noqa: PLC0415 - the registry lives with pack()

        for rule in self.rules:
            if rule.representation not in ENCODERS:
                raise UsageError(f"recipe {self.name!r}: unknown representation {rule.representation!r}"
                                 f" (known: {sorted(ENCODERS)})")

    def choose(self, name: str, tensor: torch.Tensor) -> Rule:
        for rule in self.rules:
            if rule.matches(name, tensor):
                return rule
        return Rule("*", "lossless")

    @classmethod
    def from_dict(cls, data: dict[str, Any], name: str = "recipe") -> "Recipe":
        rules = []
        raw_rules = data.get("rule", [])
        if not isinstance(raw_rules, list) or not raw_rules:
            raise UsageError(f"recipe {name!r}: needs at least one [[rule]]")
        for index, raw in enumerate(raw_rules):
            if not isinstance(raw, dict) or "pattern" not in raw or "representation" not in raw:
                raise UsageError(f"recipe {name!r}: rule {index} needs 'pattern' and 'representation'")
            ndim = raw.get("ndim")
            if isinstance(ndim, int):
                ndim = (ndim,)
            rules.append(Rule(str(raw["pattern"]), str(raw["representation"]),
                              {k: v for k, v in raw.items() if k not in _RULE_KEYS},
                              tuple(ndim) if ndim is not None else None, int(raw.get("min_numel", 0))))
        return cls(str(data.get("name", name)), tuple(rules))

    @classmethod
    def from_toml(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not a readable TOML recipe ({exc})") from exc
        return cls.from_dict(data, path.stem)

    @classmethod
    def preset(cls, name: str) -> "Recipe":
        if name not in PRESETS:
            raise UsageError(f"unknown preset {name!r} (known: {sorted(PRESETS)})")
        return cls.from_dict(PRESETS[name], name)


# Presets. Small tensors (biases, norms) stay exact: they are a rounding error of
# the size and the outputs are sensitive to them. Embedding tables are quantized
# finer than the rest (their rows feed every layer); see bench/models.py.
PRESETS: dict[str, dict[str, Any]] = {
    "lossless": {"rule": [{"pattern": "*", "representation": "lossless"}]},
    "q8": {"rule": [
        {"pattern": "*", "ndim": [2, 3, 4], "min_numel": 4096, "representation": "quantized",
         "rel_error": 0.004, "granularity": "channel"},
        {"pattern": "*", "representation": "lossless"},
    ]},
    "q4": {"rule": [
        {"pattern": "*", "ndim": [2, 3, 4], "min_numel": 4096, "representation": "quantized",
         "rel_error": 0.03, "granularity": "channel"},
        {"pattern": "*", "representation": "lossless"},
    ]},
    "small": {"rule": [
        {"pattern": "*embed*", "ndim": [2], "min_numel": 4096, "representation": "quantized",
         "rel_error": 0.05, "granularity": "channel"},
        {"pattern": "*", "ndim": [2, 3, 4], "min_numel": 4096, "representation": "quantized",
         "rel_error": 0.06, "granularity": "channel"},
        {"pattern": "*", "representation": "lossless"},
    ]},
}
