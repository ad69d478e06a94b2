"""How many bits could *any* quantizer save at the presets' errors? The Shannon lower bound per tensor.

Issue 17 §2 asks for ≥ 10 % fewer bits than today's nearest rounding + one order-0 table per
tensor, at each preset's promise. RDOQ and context modelling were measured (docs/MODELS.md) and
paid < 0.5 %. This script measures the ceiling that no quantizer of the same weights at the same
error can pass, so the question "which quantizer next?" has a number behind it.

For each ``QUANTIZED`` tensor of an archive, with steps Δ and stored indices q
(:func:`ncz.models.quantized.read_quantized`):

- the normalized source ``X = W / Δ`` (per-row/column steps divide out, as the coder sees it) and
  its distortion ``D = mean((X − q)²)`` in units of the step (1/12 for nearest rounding at
  high rate);
- its differential entropy ``h(X)`` from a histogram of bin width σ/16 with the Miller–Madow
  correction (bias below 0.013 bits on Gaussian samples of 4,000 values and more, at any scale),
  pooled and conditioned on the row's RMS class (8 quantile groups; the lower of the two is
  used: pooling rows of different shape overstates h);
- the **Shannon lower bound** ``R_SLB = h(X) − ½·log₂(2πe·D)`` bits per weight: no code of the
  source X at mean squared error D takes fewer bits (Berger 1971), vector and trellis
  quantizers included. At high rate uniform scalar quantization with an ideal entropy coder is
  ``½·log₂(2πe/12) = 0.254`` bits above it (the 1.53 dB space-filling loss), whatever the source;
- the same bound at the *weight-domain* error only, ``h(X) + E[log₂ Δ] − ½·log₂(2πe·E[(W − Ŵ)²])``:
  a quantizer free to move error between rows and columns at the same tensor error (the presets
  keep it proportional to each step, which is what their cosine was measured at);
- the bits stored today: the index payload (``#q``, and ``#qx`` escapes) and its share of the archive.

The ceilings for the archive are Σ (index bits − bound) over the quantized tensors, everything
else (steps, tables, lossless tensors, the container) unchanged, as a share of the file. Finer
conditioning lowers h further (32 row classes: q8 and small's gaps +0.03 / +0.01 bits), partly
real structure (a table per row class would take it), partly the estimator's bias on fewer
values; the neighbours' context gain was measured at ≤ 0.18 % (docs/MODELS.md). With
calibration (GPTQ), W's error is shaped toward what the outputs ignore; the bounds are then in
the weight domain only and printed for reference.

    python bench/quantizer_bound.py [--presets q8 q4 small] [--calibrate 2000]

Writes ``bench/results/quantizer_bound.json`` (MiniLM, data-free and, with ``--calibrate N``,
calibrated on N CLINC150 training queries).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
BINS_PER_SD = 16
ROW_CLASSES = 8
ECSQ_GAP = 0.5 * math.log2(2 * math.pi * math.e / 12)  # 0.2546 bits: the high-rate loss of uniform scalar cells


def differential_entropy(x: np.ndarray, bins_per_sd: int = BINS_PER_SD) -> float:
    """h(X) in bits from a histogram of bin width σ/bins_per_sd (Miller–Madow corrected plug-in).

    A width tied to the spread keeps the number of occupied bins, and so the estimator's bias,
    the same for any scale: on Gaussian samples of 4,000–400,000 values and σ from 0.5 to 72 steps
    the error is below 0.013 bits, where a fixed 1/16 step fell 0.046 short at σ = 72 on 33,000."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    sd = float(x.std())
    width = sd / bins_per_sd if sd > 0 else 1.0
    cells = np.floor(x / width).astype(np.int64)
    _, counts = np.unique(cells, return_counts=True)
    p = counts / counts.sum()
    plug_in = float(-(p * np.log2(p)).sum())
    return plug_in + (counts.size - 1) / (2 * counts.sum() * math.log(2)) + math.log2(width)


def index_entropy(q: np.ndarray) -> float:
    """Empirical order-0 entropy of the indices, bits per index."""
    _, counts = np.unique(q, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def conditional_entropy(x: np.ndarray, classes: int = ROW_CLASSES) -> float:
    """h(X | row class): rows grouped into ``classes`` quantiles of their RMS, h estimated per group.

    Pooling all rows into one histogram overstates h when rows differ in shape or scale (a
    mixture's entropy exceeds the mean of its parts'); conditioning on a coarse row statistic
    takes most of that out while every group keeps enough values for a histogram."""
    rms = np.sqrt(np.mean(x ** 2, axis=1))
    if x.shape[0] < classes * 4:
        return differential_entropy(x)
    edges = np.quantile(rms, np.linspace(0, 1, classes + 1)[1:-1])
    group = np.searchsorted(edges, rms)
    return float(sum(np.mean(group == g) * differential_entropy(x[group == g]) for g in np.unique(group)))


def tensor_bound(weights: np.ndarray, parts) -> dict[str, float]:
    """Normalized source, distortion and two Shannon lower bounds of one quantized tensor.

    ``slb_bits``: at the tensor's step-normalized error (each weight's error in units of its own
    step, as the presets place it). ``slb_weight_bits``: at its weight-domain mean squared error
    only, a quantizer free to move error between rows and columns (reverse water-filling at high
    rate): lower by ½·(log₂ E[Δ²] − E[log₂ Δ²]) when the error is uniform in step units."""
    rows, cols = parts.q.shape
    steps = parts.step_matrix().astype(np.float64)
    x = weights.reshape(rows, cols).astype(np.float64) / steps
    error = x - parts.q
    distortion = float(np.mean(error ** 2))
    weight_distortion = float(np.mean((error * steps) ** 2))
    h_pooled = differential_entropy(x)
    h = min(h_pooled, conditional_entropy(x))
    two_pi_e = 2 * math.pi * math.e
    slb = h - 0.5 * math.log2(two_pi_e * distortion) if distortion > 0 else math.inf
    slb_weight = (h + float(np.mean(np.log2(steps))) - 0.5 * math.log2(two_pi_e * weight_distortion)
                  if weight_distortion > 0 else math.inf)
    return {"numel": int(x.size), "distortion_steps2": distortion, "h_x_pooled": h_pooled, "h_x": h,
            "index_entropy": index_entropy(parts.q), "slb_bits": max(slb, 0.0),
            "slb_weight_bits": max(slb_weight, 0.0)}


def archive_bound(archive: Path, source: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Every quantized tensor's bounds and the archive's ceilings."""
    from ncz.format import Kind
    from ncz.format import open as open_archive
    from ncz.models.quantized import read_quantized

    tensors: dict[str, Any] = {}
    file_bits = 8 * archive.stat().st_size
    with open_archive(archive) as reader:
        for head in reader.sections:
            if head.kind != Kind.QUANTIZED:
                continue
            parts = read_quantized(head, reader)
            row = tensor_bound(source[head.name].float().numpy(), parts)
            index_bytes = sum(reader.info(f"{head.name}#{part}").stored_length for part in ("q", "qx")
                              if f"{head.name}#{part}" in reader)  # int8 layouts keep escapes in #qx
            index_bits = 8 * index_bytes / row["numel"]
            row.update(index_bits=index_bits, gap_bits=index_bits - row["slb_bits"],
                       gap_weight_bits=index_bits - row["slb_weight_bits"])
            tensors[head.name] = row
    numel = sum(t["numel"] for t in tensors.values())
    index_total = sum(t["index_bits"] * t["numel"] for t in tensors.values())
    gap_total = sum(t["gap_bits"] * t["numel"] for t in tensors.values())
    gap_weight_total = sum(t["gap_weight_bits"] * t["numel"] for t in tensors.values())
    return {"file_bits": file_bits, "quantized_weights": numel, "index_bits_share": index_total / file_bits,
            "mean_index_bits": index_total / numel, "mean_slb_bits": (index_total - gap_total) / numel,
            "mean_gap_bits": gap_total / numel, "ceiling_saving": gap_total / file_bits,
            "mean_slb_weight_bits": (index_total - gap_weight_total) / numel,
            "mean_gap_weight_bits": gap_weight_total / numel, "ceiling_saving_weight": gap_weight_total / file_bits,
            "tensors": tensors}


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["q8", "q4", "small"])
    ap.add_argument("--calibrate", type=int, default=0, metavar="N",
                    help="also pack with a calibration from N CLINC150 training queries (0: data-free only)")
    ap.add_argument("--json", type=Path, default=RESULTS / "quantizer_bound.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import models_presets  # bench/ is the script's own folder, first on sys.path
    from safetensors.torch import load_file

    models = models_presets._sibling("models")  # bench/models.py, under the unique name bench_models
    from ncz.models import Recipe, pack

    model, tokenizer, source_path = models.load_minilm()
    source = load_file(str(source_path))
    calibration = None
    if args.calibrate:
        from ncz.models import calibrate

        texts = models.calibration_sentences(args.calibrate)
        calibration = calibrate(model, [encoded for _, encoded in models.make_batches(tokenizer, texts)],
                                source=f"CLINC150 train, {len(texts)} queries")
    start = time.time()
    out: dict[str, Any] = {"command": "python bench/quantizer_bound.py " + " ".join(argv or sys.argv[1:]),
                           "model": "all-MiniLM-L6-v2", "bins_per_sd": BINS_PER_SD, "row_classes": ROW_CLASSES,
                           "ecsq_gap_bits": ECSQ_GAP,
                           "presets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets:
            for mode, cal in (("data_free", None), ("calibrated", calibration)):
                if mode == "calibrated" and cal is None:
                    continue
                path = Path(tmp) / f"{name}-{mode}.ncz"
                pack(source_path, path, recipe=Recipe.preset(name), calibration=cal)
                result = archive_bound(path, source)
                out["presets"].setdefault(name, {})[mode] = result
                print(f"{name} {mode}: {result['file_bits'] / result['quantized_weights']:.4f} file bits per "
                      f"quantized weight; indices {result['mean_index_bits']:.4f}, Shannon lower bound "
                      f"{result['mean_slb_bits']:.4f} at the step-normalized error (gap "
                      f"{result['mean_gap_bits']:.4f}: at most {100 * result['ceiling_saving']:.2f} % of the file), "
                      f"{result['mean_slb_weight_bits']:.4f} at the weight-domain error (at most "
                      f"{100 * result['ceiling_saving_weight']:.2f} %)", flush=True)
    out["seconds"] = round(time.time() - start, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_round(out), indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
