"""RDOQ (models/quantized/rdoq.py): never worse in D + λR than nearest rounding under the same
table, the error target still met (float32, bf16, calibrated embedding rows), fewer bits where it
is tried, the ordinary decoder reading it exactly, the same bytes every time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ncz.format as nf
from ncz.models import Recipe, load_state_dict, pack
from ncz.models.quantized import TensorCalibration, encode_quantized, quantize_calibrated, quantize_codes
from ncz.models.quantized.calibrated import row_importance
from ncz.models.quantized.rdoq import RDOQ_LAMBDA, RDOQ_MAX_BITS, CodeLengths, rdoq_round
from ncz.models.quantized.steps import dequantize


def _laplace(rows: int = 256, cols: int = 192, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(rows, cols, generator=g) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs()) * 0.02  # Laplacian, like trained weights


def _cost(x: np.ndarray, q: np.ndarray, lengths: CodeLengths) -> np.ndarray:
    return np.square(x.astype(np.float64) - q) + RDOQ_LAMBDA * lengths.of(q.astype(np.float64))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.2, 6.0))
def test_rdoq_never_costs_more_than_nearest_under_the_same_table(seed, scale):
    x = np.random.default_rng(seed).laplace(0, scale, 4000).astype(np.float32)
    nearest = np.rint(x)
    lengths = CodeLengths(*np.unique(nearest.astype(np.int64), return_counts=True))
    chosen = rdoq_round(x, lengths)
    assert chosen.dtype == x.dtype
    assert np.all(np.abs(chosen - x) < 1)  # always floor or ceil
    per_weight = _cost(x, chosen, lengths) - _cost(x, nearest, lengths)
    assert np.all(per_weight <= 0)
    assert per_weight.sum() <= 0


def test_rdoq_moves_indices_to_cheaper_ones_only_near_a_threshold():
    lengths = CodeLengths(np.array([-1, 0, 1]), np.array([10, 1000, 10]))
    x = np.array([0.45, 0.55, 0.9, 1.0, -0.6], np.float32)
    assert rdoq_round(x, lengths).tolist() == [0.0, 0.0, 1.0, 1.0, 0.0]


def _pack_one(tmp_path, w: torch.Tensor, target: float, rdoq: bool, granularity: str = "rowcol"):
    rule = {"pattern": "*", "representation": "quantized", "rel_error": target, "granularity": granularity}
    if rdoq:
        rule["rdoq"] = True
    path = tmp_path / f"{rdoq}-{target}.ncz"
    report = pack({"w": w}, path, recipe=Recipe.from_dict({"rule": [rule]}))
    return path, report


@pytest.mark.parametrize("granularity", ["tensor", "channel", "rowcol"])
def test_rdoq_meets_the_error_with_fewer_bits_and_decodes_exactly(tmp_path, granularity):
    w = _laplace()
    nearest_path, nearest = _pack_one(tmp_path, w, 0.3, rdoq=False, granularity=granularity)
    path, report = _pack_one(tmp_path, w, 0.3, rdoq=True, granularity=granularity)
    back = load_state_dict(path)["w"]
    err = float((back - w).norm() / w.norm())
    assert err <= 0.3 * 1.0001
    assert err == pytest.approx(report.tensors[0].rel_error, rel=1e-6)
    assert report.tensors[0].stored_bytes < nearest.tensors[0].stored_bytes
    # the ordinary decoder: the stored indices times the stored steps, nothing else
    with nf.open(path) as reader:
        params = reader.info("w").params
        assert "rdoq" not in params and params["granularity"] == granularity
    assert float((load_state_dict(nearest_path)["w"] - w).norm() / w.norm()) <= 0.3 * 1.0001


def test_rdoq_is_deterministic(tmp_path):
    w = _laplace(seed=3)
    first = encode_quantized("w", w, rel_error=0.25, granularity="rowcol", rdoq=True)
    second = encode_quantized("w", w.clone(), rel_error=0.25, granularity="rowcol", rdoq=True)
    assert [bytes(s.payload.stored) for s in first.sections] == [bytes(s.payload.stored) for s in second.sections]
    assert first.rel_error == second.rel_error


def test_rdoq_holds_the_error_after_the_cast_back_to_bf16(tmp_path):
    w = _laplace(seed=5).to(torch.bfloat16)
    path, report = _pack_one(tmp_path, w, 0.3, rdoq=True, granularity="channel")
    back = load_state_dict(path)["w"]
    assert back.dtype == torch.bfloat16
    err = float((back.double() - w.double()).norm() / w.double().norm())
    assert err <= 0.3 * 1.0001


def test_rdoq_is_not_tried_at_high_rates(tmp_path):
    w = _laplace(seed=7)
    plain = encode_quantized("w", w, rel_error=0.01, granularity="channel")
    assert plain.bits_per_weight > RDOQ_MAX_BITS
    tried = encode_quantized("w", w, rel_error=0.01, granularity="channel", rdoq=True)
    assert [bytes(s.payload.stored) for s in plain.sections] == [bytes(s.payload.stored) for s in tried.sections]


def test_rdoq_option_is_checked():
    with pytest.raises(nf.UsageError, match="rdoq"):
        Recipe.from_dict({"rule": [{"pattern": "*", "representation": "quantized", "rel_error": 0.1,
                                    "rdoq": "yes"}]})
    with pytest.raises(nf.UsageError, match="rdoq"):
        encode_quantized("w", _laplace(), rel_error=0.1, rdoq=1)


def test_tiered_recipes_ask_for_rdoq_only_when_told():
    from ncz.models.recipe import tiered

    with_rdoq = Recipe.from_dict(tiered({"ffn_in": 0.05}, rdoq=True))
    assert all(r.options.get("rdoq") is True for r in with_rdoq.rules if r.representation == "quantized")
    for name in ("q8", "q4", "small"):  # nearest rounding: RDOQ lost cosine at equal weight error (MODELS.md)
        quantized = [r for r in Recipe.preset(name).rules if r.representation == "quantized"]
        assert quantized and not any(r.options.get("rdoq") for r in quantized)


def test_calibrated_embedding_rows_keep_their_weighted_error_with_fewer_bits():
    w = _laplace(512, 64, seed=11).numpy()
    counts = np.random.default_rng(1).zipf(1.5, 512).astype(np.float64)
    calibration = TensorCalibration(row_counts=counts)
    reference = quantize_codes(w, rel_error=0.35, granularity="tensor")
    plain, _ = quantize_calibrated(w, reference, calibration, "tensor")
    rated, granularity = quantize_calibrated(w, reference, calibration, "tensor", rdoq=True)
    importance = row_importance(counts)[:, None]

    def weighted(result) -> float:
        return float(np.sum(importance * np.square(w - dequantize(result.q, result.steps, granularity),
                                                   dtype=np.float64)))

    target = float(np.sum(importance * np.square(w - dequantize(reference.q, reference.steps, "tensor"),
                                                 dtype=np.float64)))
    assert weighted(rated) <= target and weighted(plain) <= target

    def entropy(q: np.ndarray) -> float:
        p = np.unique(q, return_counts=True)[1] / q.size
        return float(-(p * np.log2(p)).sum())

    assert entropy(rated.q) < entropy(plain.q)


def test_quant_aware_packing_recipe_turns_rdoq_off_so_the_archive_holds_the_trained_rounding(tmp_path):
    from ncz.models import QuantAware

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 80))
    recipe = Recipe.from_dict({"rule": [
        {"pattern": "*.weight", "representation": "quantized", "rel_error": 0.3, "granularity": "channel",
         "rdoq": True},
        {"pattern": "*", "representation": "lossless"}]})
    rounding = QuantAware(model, recipe)
    seen = {name: model.get_submodule(name[:-7]).weight.detach().clone() for name in rounding.names}
    rounding.detach()
    assert all(not r.options.get("rdoq") for r in rounding.packing_recipe.rules)
    pack(model.state_dict(), tmp_path / "m.ncz", recipe=rounding.packing_recipe)
    stored = load_state_dict(tmp_path / "m.ncz")
    for name, weight in seen.items():
        assert torch.equal(stored[name], weight), name
