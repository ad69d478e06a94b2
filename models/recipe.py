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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ncz.format import InputError, UsageError

from . import registry

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10; tomli is the same parser (pyproject requires it there)
    import tomli as tomllib

__all__ = ["Rule", "Recipe", "PRESETS", "TENSOR_CLASSES", "tiered"]

_RULE_KEYS = {"pattern", "representation", "ndim", "min_numel"}
# encoder options whose type and range a recipe file must get right (checked on load, not mid-pack)
_POSITIVE_NUMBERS = {"rel_error", "calibrated_rel_error", "bits", "factor_rel_error", "ratio", "codebook_rel_error"}
_BOOLEANS = {"rdoq", "fast_decode"}
_POSITIVE_INTS = {"group_size", "rank", "centroids", "subspaces", "stages", "iterations", "zstd_level", "dim"}


def _check_option(where: str, key: str, value: Any) -> None:
    if key in _POSITIVE_NUMBERS:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise UsageError(f"{where}: {key} must be a number > 0, got {value!r}")
    elif key in _BOOLEANS:
        if not isinstance(value, bool):
            raise UsageError(f"{where}: {key} must be true or false, got {value!r}")
    elif key in _POSITIVE_INTS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{where}: {key} must be an integer >= 1, got {value!r}")


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
        for rule in self.rules:
            if rule.representation not in registry.names():
                raise UsageError(f"recipe {self.name!r}: unknown representation {rule.representation!r}"
                                 f" (known: {registry.names()})")

    def choose(self, name: str, tensor: torch.Tensor) -> Rule:
        for rule in self.rules:
            if rule.matches(name, tensor):
                return rule
        return Rule("*", "lossless")

    @classmethod
    def from_dict(cls, data: dict[str, Any], name: str = "recipe") -> Recipe:
        rules = []
        raw_rules = data.get("rule", [])
        if not isinstance(raw_rules, list) or not raw_rules:
            raise UsageError(f"recipe {name!r}: needs at least one [[rule]]")
        for index, raw in enumerate(raw_rules):
            if not isinstance(raw, dict) or "pattern" not in raw or "representation" not in raw:
                raise UsageError(f"recipe {name!r}: rule {index} needs 'pattern' and 'representation'")
            where = f"recipe {name!r}: rule {index}"
            ndim = raw.get("ndim")
            if isinstance(ndim, int):
                ndim = (ndim,)
            if ndim is not None and (not isinstance(ndim, (list, tuple))
                                     or not all(isinstance(d, int) and not isinstance(d, bool) for d in ndim)):
                raise UsageError(f"{where}: ndim must be an integer or a list of integers, got {ndim!r}")
            min_numel = raw.get("min_numel", 0)
            if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
                raise UsageError(f"{where}: min_numel must be an integer >= 0, got {min_numel!r}")
            options = {k: v for k, v in raw.items() if k not in _RULE_KEYS}
            for key, value in options.items():
                _check_option(where, key, value)
            rules.append(Rule(str(raw["pattern"]), str(raw["representation"]), options,
                              tuple(ndim) if ndim is not None else None, min_numel))
        return cls(str(data.get("name", name)), tuple(rules))

    @classmethod
    def from_toml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not a readable TOML recipe ({exc})") from exc
        return cls.from_dict(data, path.stem)

    def with_fast_decode(self) -> Recipe:
        """This recipe with ``fast_decode`` on in every ``quantized`` rule: indices stored as int8/int16
        under zstd (~1 % larger, unpacked several times faster; FORMAT.md §5.4, format 1.2)."""
        rules = tuple(Rule(r.pattern, r.representation, {**r.options, "fast_decode": True}, r.ndim, r.min_numel)
                      if r.representation == "quantized" else r for r in self.rules)
        return Recipe(f"{self.name}+fast-decode", rules)

    @classmethod
    def preset(cls, name: str) -> Recipe:
        if name not in PRESETS:
            raise UsageError(f"unknown preset {name!r} (known: {sorted(PRESETS)})")
        return cls.from_dict(PRESETS[name], name)


# --- presets -------------------------------------------------------------------------
#
# Tensor classes by name, first match wins. The globs cover the usual spellings
# (BERT/RoBERTa, GPT-2, LLaMA/Mistral, OPT/BART, DistilBERT); anything else that is
# a large 2-D/3-D/4-D float tensor is "other". Small tensors (biases, norms,
# < 4096 values) stay exact: they are a rounding error of the size and outputs
# are sensitive to them.
#
# Granularity: token-embedding rows are quantized with one step for the whole
# table (the same absolute error on every row beat per-row steps by 25 % in
# output-cosine drop at equal bits on MiniLM: rare tokens have small rows);
# linear layers use per-row × per-column steps ("rowcol"): columns reading
# outlier input features have small weights, and their own step cut the
# attention-value drop 4x and the FFN-input drop 1.4x at equal bits.
TENSOR_CLASSES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("token_embedding", ("*word_embeddings*", "*embed_tokens*", "*tok_embeddings*", "*token_embedding*",
                         "*wte.weight", "*shared.weight"), "tensor"),
    ("position_embedding", ("*position_embeddings*", "*embed_positions*", "*wpe.weight"), "channel"),
    ("attention_qk", ("*query*", "*key*", "*q_proj*", "*k_proj*", "*q_lin*", "*k_lin*"), "rowcol"),
    ("attention_v", ("*value*", "*v_proj*", "*v_lin*"), "rowcol"),
    ("attention_out", ("*attention.output.dense*", "*o_proj*", "*out_proj*", "*out_lin*", "*attn.c_proj*"), "rowcol"),
    ("ffn_in", ("*intermediate.dense*", "*fc1*", "*up_proj*", "*gate_proj*", "*c_fc*", "*lin1*"), "rowcol"),
    ("ffn_out", ("*output.dense*", "*fc2*", "*down_proj*", "*mlp.c_proj*", "*lin2*"), "rowcol"),
    ("other", ("*",), "rowcol"),
)


def tiered(rel_errors: dict[str, float], calibrated: dict[str, float] | None = None,
           rdoq: bool = False) -> dict[str, Any]:
    """A recipe dict quantizing each tensor class of :data:`TENSOR_CLASSES` at its
    ``rel_errors[class]`` (classes left out fall through to later rules), the rest lossless.
    ``calibrated[class]`` is the class's ``calibrated_rel_error``: the target used instead
    when the archive is packed with calibration statistics. ``rdoq``: indices chosen for
    error + λ·bits where that lowers the rate at the same error (``quantized/rdoq.py``)."""
    calibrated = calibrated or {}
    unknown = (set(rel_errors) | set(calibrated)) - {name for name, _, _ in TENSOR_CLASSES}
    if unknown:
        raise UsageError(f"unknown tensor classes {sorted(unknown)}")
    rules: list[dict[str, Any]] = []
    for name, patterns, granularity in TENSOR_CLASSES:
        if name not in rel_errors:
            continue
        for pattern in patterns:
            rule = {"pattern": pattern, "ndim": [2, 3, 4], "min_numel": 4096, "representation": "quantized",
                    "rel_error": float(rel_errors[name]), "granularity": granularity}
            if rdoq:
                rule["rdoq"] = True
            if name in calibrated:
                rule["calibrated_rel_error"] = float(calibrated[name])
            rules.append(rule)
    rules.append({"pattern": "*", "representation": "lossless"})
    return {"rule": rules}


# Per-class relative errors (‖W − Ŵ‖/‖W‖), derived on all-MiniLM-L6-v2 with bench/models_presets.py
# on five kinds of English text (bench/text_sets.py: CLINC150, SNIPS, ATIS, PTB, tiny-shakespeare).
# Each class alone is quantized at probe errors and the cosine drop of the sentence embeddings is
# measured on every set (drop ≈ sₛ·e^p per set, additive across classes); the bits Σ nᵢ·bitsᵢ(eᵢ)
# are minimized with the drop ≤ D on *every* set, D = 1 − the promised cosine (q8 0.999, q4 0.995,
# small 0.98) divided by a measured margin: derived without one set, the held-out set's test text
# came out up to 1.32 / 1.28 / 1.27× worse than the worst of the others (tiny-shakespeare, the most
# sensitive text). Then all errors are scaled by one factor until the worst set's measured drop is
# within 3 % below D / margin. bench/results/models_derivation.json has every probe and fit;
# bench/results/models_presets.json the promise as measured on each set's held-out test text.
# ``calibrated``: the same with each set's probes packed with a calibration from 2,000 sentences of
# that set's own training text (bench/results/models_derivation_calibrated.json; margins 1.16 / 1.20
# / 1.24 from the fits). The allocation derived on CLINC150 alone let the token embedding go to 0.39
# (small): on SNIPS, whose test utterances carry names the training text rarely has (11 % of their
# tokens unseen in the calibration), that table alone cost 0.015 of cosine.
PRESETS: dict[str, dict[str, Any]] = {
    "lossless": {"rule": [{"pattern": "*", "representation": "lossless"}]},
    "q8": tiered({"token_embedding": 0.0489, "position_embedding": 0.0133, "attention_qk": 0.0174,
                  "attention_v": 0.00857, "attention_out": 0.0086, "ffn_in": 0.00908,
                  "ffn_out": 0.0117, "other": 0.00857},
                 calibrated={"token_embedding": 0.0605, "position_embedding": 0.035, "attention_qk": 0.0176,
                             "attention_v": 0.00934, "attention_out": 0.00878,
                             "ffn_in": 0.00982, "ffn_out": 0.0113, "other": 0.00878}),
    "q4": tiered({"token_embedding": 0.111, "position_embedding": 0.0312, "attention_qk": 0.0413,
                  "attention_v": 0.0203, "attention_out": 0.0196, "ffn_in": 0.0211, "ffn_out": 0.0273,
                  "other": 0.0196},
                 calibrated={"token_embedding": 0.137, "position_embedding": 0.0809, "attention_qk": 0.0408,
                             "attention_v": 0.0214, "attention_out": 0.0201,
                             "ffn_in": 0.0225, "ffn_out": 0.0261, "other": 0.0201}),
    "small": tiered({"token_embedding": 0.221, "position_embedding": 0.0636, "attention_qk": 0.0849,
                     "attention_v": 0.0416, "attention_out": 0.039, "ffn_in": 0.0428,
                     "ffn_out": 0.0554, "other": 0.039},
                    calibrated={"token_embedding": 0.266, "position_embedding": 0.159, "attention_qk": 0.0806,
                                "attention_v": 0.0416, "attention_out": 0.0393,
                                "ffn_in": 0.0439, "ffn_out": 0.0515, "other": 0.0393}),
}
