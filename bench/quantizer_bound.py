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
- its differential entropy ``h(X)`` from a histogram of bin width 1/16 step with the
  Miller–Madow correction (the plain plug-in estimate falls short by up to 0.06 bits on a
  384×384 tensor at 1/64; corrected, bins of 1/8 and 1/16 agree within 0.003 bits);
- the **Shannon lower bound** ``R_SLB = h(X) − ½·log₂(2πe·D)`` bits per weight: no code of the
  i.i.d. source X at mean squared error D takes fewer bits (Berger 1971), vector and trellis
  quantizers included. At high rate uniform scalar quantization with an ideal entropy coder is
  ``½·log₂(2πe/12) = 0.254`` bits above it (the 1.53 dB space-filling loss), whatever the source;
- the bits stored today: the index payload (``#q``) and its share of the archive.

The ceiling for the archive is Σ (index bits − R_SLB) over the quantized tensors, everything
else (steps, tables, lossless tensors, the container) unchanged, as a share of the file. The
source is treated as i.i.d. within a tensor: its indices' context gain was measured at ≤ 0.18 %
(docs/MODELS.md), so memory adds nothing the bound misses. With calibration (GPTQ), W's error is
shaped toward what the outputs ignore; the bound is then measured in the weight domain only and
printed for reference (the same 0.254-bit argument holds in GPTQ's whitened coordinates).

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
BINS_PER_STEP = 16
ECSQ_GAP = 0.5 * math.log2(2 * math.pi * math.e / 12)  # 0.2546 bits: the high-rate loss of uniform scalar cells


def differential_entropy(x: np.ndarray, bins_per_unit: int = BINS_PER_STEP) -> float:
    """h(X) in bits from a histogram of bin width 1/bins_per_unit (Miller–Madow corrected plug-in)."""
    cells = np.floor(x.astype(np.float64) * bins_per_unit).astype(np.int64)
    _, counts = np.unique(cells, return_counts=True)
    p = counts / counts.sum()
    plug_in = float(-(p * np.log2(p)).sum())
    return plug_in + (counts.size - 1) / (2 * counts.sum() * math.log(2)) - math.log2(bins_per_unit)


def index_entropy(q: np.ndarray) -> float:
    """Empirical order-0 entropy of the indices, bits per index."""
    _, counts = np.unique(q, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def tensor_bound(weights: np.ndarray, parts) -> dict[str, float]:
    """Normalized source, distortion and the Shannon lower bound of one quantized tensor."""
    rows, cols = parts.q.shape
    x = weights.reshape(rows, cols).astype(np.float64) / parts.step_matrix().astype(np.float64)
    distortion = float(np.mean((x - parts.q) ** 2))
    h = differential_entropy(x)
    slb = h - 0.5 * math.log2(2 * math.pi * math.e * distortion) if distortion > 0 else math.inf
    return {"numel": int(x.size), "distortion_steps2": distortion, "h_x": h, "index_entropy": index_entropy(parts.q),
            "slb_bits": max(slb, 0.0)}


def archive_bound(archive: Path, source: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Every quantized tensor's bound and the archive's ceiling."""
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
            index_bits = 8 * reader.info(f"{head.name}#q").stored_length / row["numel"]
            row.update(index_bits=index_bits, gap_bits=index_bits - row["slb_bits"])
            tensors[head.name] = row
    numel = sum(t["numel"] for t in tensors.values())
    index_total = sum(t["index_bits"] * t["numel"] for t in tensors.values())
    gap_total = sum(t["gap_bits"] * t["numel"] for t in tensors.values())
    return {"file_bits": file_bits, "quantized_weights": numel, "index_bits_share": index_total / file_bits,
            "mean_index_bits": index_total / numel, "mean_slb_bits": (index_total - gap_total) / numel,
            "mean_gap_bits": gap_total / numel, "ceiling_saving": gap_total / file_bits, "tensors": tensors}


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
    from safetensors.torch import load_file

    import models  # bench/models.py: bench/ is the script's own folder, first on sys.path
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
                           "model": "all-MiniLM-L6-v2", "bins_per_step": BINS_PER_STEP, "ecsq_gap_bits": ECSQ_GAP,
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
                print(f"{name} {mode}: {result['file_bits'] / result['quantized_weights'] / 1:.4f} file bits per "
                      f"quantized weight; indices {result['mean_index_bits']:.4f}, Shannon lower bound "
                      f"{result['mean_slb_bits']:.4f}, gap {result['mean_gap_bits']:.4f} bits per weight: "
                      f"no quantizer at these errors saves more than {100 * result['ceiling_saving']:.2f} % "
                      f"of the file", flush=True)
    out["seconds"] = round(time.time() - start, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_round(out), indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
