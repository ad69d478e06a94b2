"""bench/quantizer_bound.py, the Shannon-lower-bound ceiling of docs/MODELS.md (issue 17 §2).

The tool's two claims are checked on sources whose answers are known in closed form: its entropy
estimate recovers a Gaussian's ½·log₂(2πeσ²), and uniform scalar quantization at high rate lands
the textbook ½·log₂(2πe/12) = 0.254 bits above the bound, read back through a real archive.
"""

from __future__ import annotations

import math

import numpy as np
import torch

import ncz.format as nf
from ncz.models import Recipe, pack
from ncz.models.quantized import decode_quantized, read_quantized
from tests.conftest import load_bench

bound = load_bench("quantizer_bound")


def test_differential_entropy_recovers_closed_forms():
    rng = np.random.default_rng(0)
    for sigma in (0.5, 3.0, 20.0):
        x = rng.normal(0.0, sigma, 400_000)
        assert abs(bound.differential_entropy(x) - 0.5 * math.log2(2 * math.pi * math.e * sigma ** 2)) < 0.01
    x = rng.uniform(0.0, 8.0, 400_000)  # h = log2(8) = 3
    assert abs(bound.differential_entropy(x) - 3.0) < 0.01


def test_uniform_quantization_sits_the_space_filling_gap_above_the_bound(tmp_path):
    torch.manual_seed(0)
    weights = torch.randn(512, 512) * 0.02
    recipe = Recipe.from_dict({"rule": [{"pattern": "*", "representation": "quantized", "rel_error": 0.004,
                                         "granularity": "tensor"}]}, "fine")
    pack({"w": weights}, tmp_path / "w.ncz", recipe=recipe)
    with nf.open(tmp_path / "w.ncz") as reader:
        parts = read_quantized(reader.info("w"), reader)
        rows = bound.tensor_bound(weights.numpy(), parts)
        decoded = decode_quantized(reader.info("w"), reader).numpy()
        assert np.array_equal(parts.q.astype(np.float32) * parts.step_matrix(), decoded)  # the parts decode reads
    assert abs(rows["distortion_steps2"] - 1 / 12) < 0.002  # nearest rounding at high rate
    assert abs(rows["index_entropy"] - rows["slb_bits"] - bound.ECSQ_GAP) < 0.02
    result = bound.archive_bound(tmp_path / "w.ncz", {"w": weights})
    assert result["quantized_weights"] == weights.numel()
    assert 0.02 < result["ceiling_saving"] < 0.04  # 8.2 index bits per weight at this error: the gap is ~3 %


def test_row_and_column_steps_are_divided_out(tmp_path):
    """rowcol steps (MiniLM's linear layers): X = W / step is the same source whatever the row and
    column scales, so the bound and the gap match the plain case; the weight-domain bound is lower
    by ½·(log₂ E[Δ²] − E[log₂ Δ²]), what moving error between rows could take."""
    torch.manual_seed(1)
    rows, cols = torch.logspace(-1, 1, 256)[:, None], torch.logspace(-0.5, 0.5, 384)[None, :]
    weights = torch.randn(256, 384) * rows * cols * 0.02
    recipe = Recipe.from_dict({"rule": [{"pattern": "*", "representation": "quantized", "rel_error": 0.004,
                                         "granularity": "rowcol"}]}, "rowcol")
    pack({"w": weights}, tmp_path / "w.ncz", recipe=recipe)
    with nf.open(tmp_path / "w.ncz") as reader:
        parts = read_quantized(reader.info("w"), reader)
        assert parts.granularity == "rowcol"
        decoded = decode_quantized(reader.info("w"), reader).numpy()
        assert np.array_equal(parts.q.astype(np.float32) * parts.step_matrix(), decoded)
        row = bound.tensor_bound(weights.numpy(), parts)
    assert abs(row["index_entropy"] - row["slb_bits"] - bound.ECSQ_GAP) < 0.03
    steps = parts.step_matrix().astype(np.float64)
    spread = 0.5 * (np.log2(np.mean(steps ** 2)) - np.mean(np.log2(steps ** 2)))
    assert spread > 0.3  # scales spanning 100x across rows
    assert abs((row["slb_bits"] - row["slb_weight_bits"]) - spread) < 0.02

