"""bench/models.py's measurement of the index coding (issue 17 §2): RDOQ and context modelling.

Loaded by bench/models.py (``--rdoq``, and every full run); not a script of its own.

* **RDOQ**: each lossy preset packed from the same checkpoint with nearest rounding (as the
  presets ship) and with ``rdoq = true`` in its quantized rules, data-free and calibrated
  (CLINC150 training queries, as the full run): bits per weight (whole file), cosine on the same
  test sentences. Both meet the same per-tensor weight error, but not necessarily the same
  cosine, so where RDOQ changes the archive it is also packed at errors × 0.9 and the bits it
  needs for nearest rounding's cosine are interpolated (as NNCodec's are in bench/models.py).
* **Context modelling** (whether DeepCABAC's context-adaptive coding would pay on top of RDOQ):
  the quantized tensors' indices as the preset's archive with RDOQ stores them, their empirical
  order-0 entropy (what one fitted table per tensor costs, tables aside) against the empirical
  entropy conditioned on a small context known to the decoder: the magnitude class of the
  previous index in the row, of the index above (same column, previous row), and of their
  sum. Conditional empirical entropies are a lower bound on what per-context tables could
  reach (their tables cost extra), so a small gap means context coding cannot pay.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

LOSSY = ("q8", "q4", "small")
MAGNITUDE_EDGES = (1, 2, 3, 5, 8, 13)  # |q| classes: 0, 1, 2, 3–4, 5–7, 8–12, ≥ 13
SUM_EDGES = (1, 2, 4, 6, 10, 16, 26)  # classes of |previous| + |above|
RDOQ_FINER = 0.9  # RDOQ at the preset's errors × this too: two points around the nearest-rounding cosine


def preset_recipe(name: str, rdoq: bool, factor: float = 1.0):
    """The preset ``name`` with ``rdoq`` set in its quantized rules and every (calibrated) relative
    error times ``factor`` (the allocation keeps its ratios)."""
    from ncz.models import PRESETS, Recipe

    rules = []
    for rule in PRESETS[name]["rule"]:
        rule = dict(rule)
        if rule["representation"] == "quantized":
            rule["rdoq"] = rdoq
            for key in ("rel_error", "calibrated_rel_error"):
                if key in rule:
                    rule[key] = rule[key] * factor
        rules.append(rule)
    return Recipe.from_dict({"rule": rules}, f"{name}{'-rdoq' if rdoq else ''}x{factor:g}")


def rdoq_comparison(run_preset: Callable[..., dict[str, Any]], interpolate_bits, source: Path, numel: int,
                    dense_bytes: int, evaluate, tmp: Path, calibration, log) -> dict[str, Any]:
    """Bits and cosine of each lossy preset with nearest rounding and with RDOQ, data-free and calibrated;
    where RDOQ changes the archive, also RDOQ at errors × RDOQ_FINER and the bits RDOQ needs for the
    nearest-rounding cosine (linear in (bits, log(1 − cosine)) between those two points)."""
    modes = [("data_free", None)] + ([("calibrated", calibration)] if calibration is not None else [])
    out: dict[str, Any] = {"lambda": "ln 2 / 6 per step^2", "tried_below_bits_per_index": 3.0,
                           "finer_factor": RDOQ_FINER, "presets": {}}

    def measure(label: str, recipe, cal) -> dict[str, Any]:
        r = run_preset(label, recipe, source, numel, dense_bytes, evaluate, tmp, timing=False, calibration=cal)
        return {"bits_per_weight": r["bits_per_weight"], "bytes": r["bytes"], "cosine": r["cosine"],
                "token_embedding_bits": r["bits_per_class"].get("token_embedding", {}).get("bits_per_weight")}

    for name in LOSSY:
        entry: dict[str, Any] = {}
        for mode, cal in modes:
            nearest = measure(f"{name}-{mode}-nearest", preset_recipe(name, False), cal)
            rdoq = measure(f"{name}-{mode}-rdoq", preset_recipe(name, True), cal)
            got: dict[str, Any] = {"nearest": nearest, "rdoq": rdoq,
                                   "bits_change_percent": 100 * (rdoq["bits_per_weight"] / nearest["bits_per_weight"]
                                                                 - 1)}
            if rdoq["bytes"] != nearest["bytes"]:
                finer = measure(f"{name}-{mode}-rdoq-finer", preset_recipe(name, True, RDOQ_FINER), cal)
                at = interpolate_bits([(rdoq["bits_per_weight"], rdoq["cosine"]),
                                       (finer["bits_per_weight"], finer["cosine"])], nearest["cosine"])
                got["rdoq_finer"] = finer
                got["rdoq_bits_at_nearest_cosine"] = at
                got["bits_change_percent_at_equal_cosine"] = None if at is None else \
                    100 * (at / nearest["bits_per_weight"] - 1)
            entry[mode] = got
            equal = got.get("bits_change_percent_at_equal_cosine")
            log(f"{name} {mode}: nearest {nearest['bits_per_weight']:.4f} bits/weight at cosine "
                f"{nearest['cosine']:.6f}, RDOQ {rdoq['bits_per_weight']:.4f} at {rdoq['cosine']:.6f} "
                f"({got['bits_change_percent']:+.2f} %; at equal cosine "
                f"{'unchanged' if 'rdoq_finer' not in got else 'n/a' if equal is None else f'{equal:+.2f} %'})")
        out["presets"][name] = entry
    return out


def embedding_direction(source: Path, tmp: Path, log) -> dict[str, Any]:
    """Why equal weight error is not equal cosine: the token embedding (the one tensor RDOQ changes
    at these presets) packed alone, data-free, with nearest rounding and with RDOQ; for each, the
    relative error, the least-squares scale of Ŵ onto W (<W,Ŵ>/<Ŵ,Ŵ>: below 1 when rounding inflates
    the rows) and the mean cosine of each row to its original (what the LayerNorm after it sees)."""
    from safetensors import safe_open

    from ncz.models import load_state_dict, pack

    with safe_open(str(source), framework="pt") as handle:
        name = next(k for k in handle.keys() if "word_embeddings" in k)
        w = handle.get_tensor(name).double()
    out: dict[str, Any] = {"tensor": name}
    for preset in LOSSY:
        entry = {}
        for rdoq in (False, True):
            path = tmp / f"embedding-{preset}-{rdoq}.ncz"
            pack({name: w.float()}, path, recipe=preset_recipe(preset, rdoq))
            back = load_state_dict(path)[name].double()
            path.unlink()
            rows = (w * back).sum(1) / (w.norm(dim=1) * back.norm(dim=1)).clamp(min=1e-30)
            entry["rdoq" if rdoq else "nearest"] = {
                "rel_error": float((w - back).norm() / w.norm()),
                "least_squares_scale": float((w * back).sum() / (back * back).sum()),
                "mean_row_cosine": float(rows.mean())}
        out[preset] = entry
        log(f"{preset} token embedding: row cosine nearest {entry['nearest']['mean_row_cosine']:.5f} "
            f"(LS scale {entry['nearest']['least_squares_scale']:.4f}), RDOQ {entry['rdoq']['mean_row_cosine']:.5f} "
            f"(LS scale {entry['rdoq']['least_squares_scale']:.4f}) at rel error "
            f"{entry['nearest']['rel_error']:.4f} / {entry['rdoq']['rel_error']:.4f}")
    return out


def _entropy(values: np.ndarray) -> float:
    counts = np.unique(values, return_counts=True)[1].astype(np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _conditional_entropy(values: np.ndarray, context: np.ndarray) -> float:
    total = 0.0
    for c in np.unique(context):
        mask = context == c
        total += int(mask.sum()) * _entropy(values[mask])
    return total / values.size


def stored_indices(path: Path) -> dict[str, np.ndarray]:
    """The (rows, cols) index arrays of every ``QUANTIZED`` tensor of the archive at ``path``."""
    import ncz.format as nf
    from ncz.format.entropy import read_symbols
    from ncz.models.quantized import unpair_symbols

    out = {}
    with nf.open(path) as reader:
        for head in reader.sections:
            if head.kind != nf.Kind.QUANTIZED:
                continue
            shape = head.params["shape"]
            rows = shape[0] if len(shape) >= 2 else 1
            count = math.prod(shape)
            q = read_symbols(reader, f"{head.name}#q")
            if "pair" in head.params:
                q = unpair_symbols(q, head.params["pair"], count, head.name)
            out[head.name] = q.astype(np.int64).reshape(rows, count // rows)
    return out


def context_gain(source: Path, tmp: Path, log) -> dict[str, Any]:
    """Order-0 against context-conditioned empirical entropy of each lossy preset's stored indices."""
    from ncz.models import pack

    out: dict[str, Any] = {"contexts": {"previous": f"|previous index in the row| in classes {MAGNITUDE_EDGES}",
                                        "above": f"|index above| in classes {MAGNITUDE_EDGES}",
                                        "previous_plus_above": f"|previous| + |above| in classes {SUM_EDGES}"},
                           "presets": {}}
    for name in LOSSY:
        path = tmp / f"{name}-context.ncz"
        pack(source, path, recipe=preset_recipe(name, True))
        sums = {"order0": 0.0, "previous": 0.0, "above": 0.0, "previous_plus_above": 0.0}
        weights = 0
        for q in stored_indices(path).values():
            flat = q.reshape(-1)
            previous = np.concatenate(([0], flat[:-1]))
            previous[:: q.shape[1]] = 0  # the first index of a row has no previous one in its row
            above = np.concatenate((np.zeros(q.shape[1], np.int64), flat[:-q.shape[1]]))
            sums["order0"] += flat.size * _entropy(flat)
            sums["previous"] += flat.size * _conditional_entropy(flat, np.searchsorted(
                MAGNITUDE_EDGES, np.abs(previous), side="right"))
            sums["above"] += flat.size * _conditional_entropy(flat, np.searchsorted(
                MAGNITUDE_EDGES, np.abs(above), side="right"))
            sums["previous_plus_above"] += flat.size * _conditional_entropy(flat, np.searchsorted(
                SUM_EDGES, np.abs(previous) + np.abs(above), side="right"))
            weights += flat.size
        path.unlink()
        bits = {k: v / weights for k, v in sums.items()}
        best = min(bits[k] for k in ("previous", "above", "previous_plus_above"))
        out["presets"][name] = {"quantized_weights": weights, "bits_per_index": bits,
                                "best_context_gain_percent": 100 * (1 - best / bits["order0"])}
        log(f"{name} context: order-0 {bits['order0']:.4f} bits/index, best context {best:.4f} "
            f"({out['presets'][name]['best_context_gain_percent']:.2f} % less, tables not counted)")
    return out
