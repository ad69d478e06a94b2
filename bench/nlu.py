"""An on-device intent classifier (all-MiniLM-L6-v2 + mean pooling + linear head), compressed whole.

Issue 16 §1/§4. One command per dataset: fine-tune, report the uncompressed test accuracy, then
put the same trained weights through every format side by side and evaluate each on the test set:

- ``safetensors fp32``, ``safetensors + zstd -19`` (lossless: the fp32 accuracy);
- ``gguf Q8_0`` / ``gguf Q4_0`` (the ``gguf`` package's quantizers on every 2-D tensor whose rows
  split into 32-blocks, 1-D tensors F32 as llama.cpp keeps them; dequantized to evaluate);
- ``nncodec qp …`` (NNCodec 2.x, DeepCABAC with dependent quantization, bench/models.py's import);
- ``ncz lossless / q8 / q4 / small`` (presets, post-training, data-free);
- ``ncz PQ embeddings (post-training)``: the 30522×384 word embedding product-quantized by k-means,
  the rest lossless — what compressing the embeddings alone costs;
- ``ncz post-training (task-aware recipe)``: the same PQ and the transformer at ``--bits`` per
  weight (q/k at ``--qk-bits``), rounded after training — the archive layout of the next row;
- ``ncz task-aware``: the headline (Sathyendra et al., COLING 2020: "signal from the downstream
  task is important"): PQ codes and codebooks of the word embedding trained with the intent loss
  (``ncz.models.finetune_codebooks``, straight-through) *jointly* with quantization-aware training
  of every linear layer (``ncz.models.QuantAware``: the forward rounds with the packer's own steps);
- ``ncz low-rank (BSR) ×R, factors B bits + PQ embeddings (post-training)``: the other way to the
  task-aware row's size without training: every encoder linear layer factorized with ranks chosen
  jointly by beam search for a compression ratio R (``ncz.models.plan_lowrank``), the factors at B
  bits per entry, the word embedding PQ-coded and the rest as the task-aware recipe (``--lowrank R B``);
- ``ncz pack_for_metric (q8 allocation, valid −D points)``: ``ncz.models.pack_for_metric`` sizes the
  archive by the task metric: the q8 preset's per-class allocation, one global scale searched for the
  smallest archive whose *validation* accuracy drops at most D points (``--max-drops``, default 0.5
  and 1); the archive it picks is then evaluated on the test set like every other row.

Data (``--data``): CLINC150's ``data_full.json`` (a file, or a folder holding it: the 150 in-scope
intents, test on the in-scope test set, out-of-scope queries left out), or a folder with
``train/`` and ``test/`` (optional ``valid/`` or ``dev/``), each with line-aligned ``seq.in`` and
``label`` files (SNIPS / ATIS). Classes are the training labels; a test label never seen in
training counts as an error (ATIS has a few).

Sizes are file bytes; bits per weight count every float parameter of the classifier. Times are
wall seconds on whatever the machine is doing (the load average is recorded). Trained state and
archives go to ``runs/nlu/<dataset>/`` (not in git): fine-tuning resumes from its checkpoint, and a
finished phase is not redone. Usage::

    nice -n 5 python bench/nlu.py --data ../shared/data/nlu/clinc150            # bench/results/nlu.json
    nice -n 5 python bench/nlu.py --data ../shared/data/nlu/snips --out bench/results/nlu_snips.json
    python bench/nlu.py --data ../shared/data/nlu/clinc150 --variants metric     # merged into nlu.json

``--variants`` measures only those groups (formats, task-aware, presets, metric) and merges their rows
into the existing ``--out`` (a row of the same name is replaced; the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib.util
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("formats", "task-aware", "lowrank", "presets", "metric")
RESULTS = REPO / "bench" / "results"
WORD_EMBEDDING = "bert.embeddings.word_embeddings"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nlu_report import TARGET_DROP_POINTS, TARGET_REDUCTION, markdown, plot, write_markdown  # noqa: E402
from nlu_task import (  # noqa: E402  (bench/ is on sys.path above)
    Bar,
    IntentClassifier,
    Tokenized,
    accuracy,
    distilled_loss,
    finetune,
    float_state,
    logits_of,
    minilm,
    read_dataset,
)

from ncz.models import (  # noqa: E402
    QuantAware,
    Recipe,
    finetune_codebooks,
    load_state_dict,
    pack,
    pack_for_metric,
    packable_state_dict,
    product_quantize,
)

# --------------------------------------------------------------------------- recipes


def rest_rules(args) -> list[dict[str, Any]]:
    """Everything but the word embedding (PQ, added by packable_state_dict) at the task-aware rates."""
    linear = {"representation": "quantized", "granularity": "rowcol", "ndim": [2], "min_numel": 4096}
    return [
        {"pattern": f"{WORD_EMBEDDING}.weight", "representation": "lossless"},
        {"pattern": "*position_embeddings*", "representation": "quantized", "granularity": "channel",
         "bits": args.position_bits},
        {"pattern": "classifier.weight", "representation": "quantized", "granularity": "channel",
         "bits": args.head_bits},
        {"pattern": "*.query.weight", **linear, "bits": args.qk_bits},
        {"pattern": "*.key.weight", **linear, "bits": args.qk_bits},
        {"pattern": "*", **linear, "bits": args.bits},
        # biases, norms, token types: small, and the outputs are sensitive to them
        {"pattern": "*", "ndim": [1, 2], "representation": "quantized", "granularity": "channel",
         "rel_error": 0.01},
        {"pattern": "*", "representation": "lossless"},
    ]


def rest_recipe(args) -> Recipe:
    return Recipe.from_dict({"rule": rest_rules(args)}, "task-aware")


def codebook_rule(books: torch.Tensor, args) -> dict[str, Any]:
    return {"pattern": f"{WORD_EMBEDDING}.weight", "representation": "codebook", "codebooks": books,
            "codebook": "quantized", "codebook_rel_error": args.codebook_error}


# --------------------------------------------------------------------------- variants


def signature(**values: Any) -> str:
    """A short hash of the settings a cached result depends on."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]


class Bench:
    """Measures variants of one trained state dict; every variant is a row of the result.

    Rows are cached in ``rows.json`` of the work folder under a key naming the variant and its
    settings (:meth:`reuse`), so a rerun after a crash or with other task-aware settings measures
    only what changed.
    """

    def __init__(self, fresh, test: Tokenized, state: dict[str, torch.Tensor], workdir: Path):
        self.fresh, self.test, self.state, self.workdir = fresh, test, state, workdir
        self.numel = sum(v.numel() for v in state.values() if v.is_floating_point())
        self.rows: list[dict[str, Any]] = []
        self.cache_file = workdir / "rows.json"
        self.key: str | None = None

    def _cache(self) -> dict[str, list[dict[str, Any]]]:
        # read afresh each time: another run on the same work folder may have added rows meanwhile
        return json.loads(self.cache_file.read_text()) if self.cache_file.exists() else {}

    def reuse(self, key: str) -> bool:
        """True (and the cached rows appended) when variant ``key`` was measured before."""
        self.key = key
        cached = self._cache().get(key)
        if not cached:
            return False
        for row in cached:
            self.rows.append({**row, "reused": True})
            print(f"  {row['name']:<44} (measured before, {self.cache_file.name})", file=sys.stderr)
        return True

    def evaluate(self, state: dict[str, torch.Tensor]) -> float:
        model = self.fresh()
        own = model.state_dict()
        model.load_state_dict({k: state[k].to(own[k].dtype) if k in state else own[k] for k in own})
        return round(accuracy(model, self.test), 3)

    def add(self, name: str, size: int, metric: float, pack_s: float, unpack_s: float, archive: Path | None,
            **extra: Any) -> dict[str, Any]:
        row = {"name": name, "bytes": size, "bits_per_weight": round(8 * size / self.numel, 4),
               "metric_name": "accuracy", "metric": metric, "pack_s": round(pack_s, 2), "unpack_s": round(unpack_s, 2),
               "archive": str(archive.relative_to(REPO)) if archive and archive.is_relative_to(REPO) else
               (str(archive) if archive else None), **extra}
        self.rows.append(row)
        if self.key is not None:
            cache = self._cache()
            cache.setdefault(self.key, []).append(row)
            self.cache_file.with_suffix(".tmp").write_text(json.dumps(cache, indent=1) + "\n")
            self.cache_file.with_suffix(".tmp").replace(self.cache_file)
        print(f"  {name:<44} {size:>11,} B  {row['bits_per_weight']:7.3f} bits/w  {row['metric_name']} {metric:6.2f}",
              file=sys.stderr, flush=True)
        return row

    def ncz(self, name: str, state: dict[str, torch.Tensor], recipe: Recipe, file: str, *,
            extra_pack_s: float = 0.0, lossless_metric: float | None = None, **extra: Any) -> dict[str, Any]:
        """Pack, load back, evaluate (a bit-exact round trip of a lossless recipe takes ``lossless_metric``)."""
        path = self.workdir / file
        t0 = time.perf_counter()
        report = pack(state, path, recipe=recipe, workers=1)
        pack_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = load_state_dict(path)
        unpack_s = time.perf_counter() - t0
        embedding = sum(t.stored_bytes for t in report.tensors if t.name.startswith(WORD_EMBEDDING))
        exact = lossless_metric is not None and loaded.keys() == state.keys() and \
            all(torch.equal(loaded[k], state[k]) for k in state)
        metric = lossless_metric if exact else self.evaluate(loaded)
        return self.add(name, report.file_bytes, metric, pack_s + extra_pack_s, unpack_s, path,
                        embedding_bytes=embedding, **({"lossless": True} if exact else {}), **extra)


def safetensors_variants(bench: Bench, fp32_metric: float) -> int:
    import zstandard
    from safetensors.torch import load_file, save_file

    path = bench.workdir / "model.safetensors"
    t0 = time.perf_counter()
    save_file(bench.state, str(path))
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_file(str(path))
    load_s = time.perf_counter() - t0
    bench.add("safetensors fp32", path.stat().st_size, fp32_metric, save_s, load_s, path, lossless=True)
    raw = path.read_bytes()
    t0 = time.perf_counter()
    packed = zstandard.ZstdCompressor(level=19, threads=0).compress(raw)
    zstd_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    zstandard.ZstdDecompressor().decompress(packed)
    unzstd_s = time.perf_counter() - t0
    bench.add("safetensors + zstd -19", len(packed), fp32_metric, save_s + zstd_s, load_s + unzstd_s, None,
              lossless=True)
    return path.stat().st_size


def gguf_variant(bench: Bench, kind: str) -> None:
    try:
        import gguf
    except ImportError as exc:
        bench.rows.append({"name": f"gguf {kind}", "error": f"gguf unavailable: {exc!r}"})
        return
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    path = bench.workdir / f"model-{kind}.gguf"
    t0 = time.perf_counter()
    writer = gguf.GGUFWriter(str(path), "bert")
    for name, tensor in bench.state.items():
        array = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
        if tensor.is_floating_point() and array.ndim == 2 and array.shape[-1] % block == 0:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    pack_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        shape = bench.state[t.name].shape
        state[t.name] = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(shape)
    unpack_s = time.perf_counter() - t0
    bench.add(f"gguf {kind}", path.stat().st_size, bench.evaluate(state), pack_s, unpack_s, path)


def nncodec_variants(bench: Bench, qps: list[int]) -> None:
    spec = importlib.util.spec_from_file_location("bench_models", REPO / "bench" / "models.py")
    try:
        helper = sys.modules.setdefault("bench_models", importlib.util.module_from_spec(spec))
        spec.loader.exec_module(helper)
        nnc, version = helper._import_nncodec()
    except Exception as exc:  # not installed / not importable offline: recorded, not fatal
        bench.rows.append({"name": "nncodec", "error": f"nncodec unavailable: {exc!r}"})
        return
    arrays = {k: (v.numpy().astype(np.int32) if not v.is_floating_point() else v.float().numpy())
              for k, v in bench.state.items()}
    for qp in qps:
        with tempfile.TemporaryDirectory() as results, contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            stream = nnc.encode(arrays, args={"qp": qp, "use_dq": True, "verbose": False, "results": results})
            pack_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            decoded = nnc.decode(stream, args={"verbose": False})
            unpack_s = time.perf_counter() - t0
        state = {k: torch.from_numpy(np.asarray(decoded[k], dtype=np.float32)).reshape(bench.state[k].shape)
                 for k in arrays if bench.state[k].is_floating_point()}
        bench.add(f"nncodec qp {qp}", len(stream), bench.evaluate(state), pack_s, unpack_s, None,
                  nncodec=version, settings={"qp": qp, "use_dq": True})


def task_aware(fine_tuned: nn.Module, train: Tokenized, books: torch.Tensor, args, saved: Path):
    """PQ word embedding + quantization-aware rest, trained jointly with the intent loss.

    Returns (state dict, recipe) ready for ``pack`` and the training record; cached in ``saved``.
    """
    from ncz.models import CodebookEmbedding

    model = copy.deepcopy(fine_tuned)
    if saved.exists():
        blob = torch.load(saved, weights_only=True)
        model.bert.embeddings.word_embeddings = CodebookEmbedding(blob["codebooks"], blob["codes"],
                                                                  padding_idx=blob["padding_idx"])
        model.load_state_dict(blob["model"])
        record = blob["record"]
    else:
        recipe = rest_recipe(args)
        teacher = None
        if args.distill > 0:
            teacher = logits_of(fine_tuned, train)
        fine_tuned.eval()  # the hidden-state teacher: no dropout
        rounding = QuantAware(model, recipe, refresh_every=args.refresh_every)
        bar = Bar(args.qat_steps, "task-aware")
        task_loss = distilled_loss(teacher, args.distill, args.distill_temperature, fine_tuned, args.distill_hidden)
        calls = [0]

        def loss_with_rounding(m: nn.Module, batch) -> torch.Tensor:
            if calls[0] == 0:
                rounding.refresh()  # after a resume: the steps of the restored latent weights
            calls[0] += 1
            rounding.step()  # new steps from the latent weights every refresh_every batches
            return task_loss(m, batch)

        t0 = time.time()
        torch.manual_seed(args.seed)
        finetune_codebooks(model, WORD_EMBEDDING, loss_with_rounding, train.stream(args.batch, args.seed + 1000),
                           steps=args.qat_steps, lr=args.pq_lr, rest_lr=args.qat_lr, codebooks=books,
                           method="straight-through", seed=args.seed, progress=bar,
                           lr_lambda=None if args.qat_schedule == "constant" else
                           lambda step: max(0.0, 1 - step / args.qat_steps),  # linear decay to 0
                           checkpoint=saved.with_suffix(".state.pt"), checkpoint_every=args.save_every)
        bar.close()
        saved.with_suffix(".state.pt").unlink(missing_ok=True)
        quantized = len(rounding.names)
        rounding.detach()
        record = {"steps": args.qat_steps, "batch": args.batch, "pq_lr": args.pq_lr, "rest_lr": args.qat_lr,
                  "lr_schedule": args.qat_schedule, "distill": args.distill, "distill_hidden": args.distill_hidden,
                  "distill_temperature": args.distill_temperature,
                  "refresh_every": args.refresh_every, "quantized_tensors": quantized,
                  "seconds": round(time.time() - t0, 1)}
        module = model.bert.embeddings.word_embeddings
        torch.save({"model": model.state_dict(), "codebooks": module.codebooks, "codes": module.codes,
                    "padding_idx": module.padding_idx, "record": record}, saved)
    state, recipe = packable_state_dict(model, rest_recipe(args), codebook="quantized",
                                        codebook_rel_error=args.codebook_error)
    return state, recipe, record


def lowrank_variants(bench: Bench, state: dict[str, torch.Tensor], books: torch.Tensor, args, pq: str,
                     pq_shape: dict[str, Any], kmeans_s: float) -> None:
    """Post-training low-rank (BSR: ranks by beam search, ``plan_lowrank``) of every encoder linear layer,
    factors quantized to ``bits`` per entry, the word embedding PQ-coded and the rest as the task-aware
    recipe: the other way to reach the task-aware row's size, without training."""
    from ncz.models import plan_lowrank

    rest = Recipe.from_dict({"rule": [codebook_rule(books, args), *rest_rules(args)]}, "task-aware")
    for ratio, bits in args.lowrank:
        key = f"lowrank {signature(ratio=ratio, bits=bits, pq=pq, rest=rest_rules(args))}"  # not timings
        if bench.reuse(key):
            continue
        t0 = time.perf_counter()
        plan = plan_lowrank(state, ratio, exclude=("*embeddings*", "classifier.*"), bits=bits, fallback=rest)
        bench.ncz(f"ncz low-rank (BSR) ×{ratio:g}, factors {bits:g} bits + PQ embeddings (post-training)", state,
                  plan, f"lowrank-x{ratio:g}-b{bits:g}.ncz", extra_pack_s=time.perf_counter() - t0 + kmeans_s,
                  method="low-rank", **pq_shape)


def metric_variants(bench: Bench, model: nn.Module, valid: Tokenized, drops: list[float], recipe_name: str,
                    max_evaluations: int) -> None:
    """``pack_for_metric`` on validation accuracy, at most ``drop`` points lost, one row per drop.

    The search sees only the validation split; the archive it returns is evaluated on the test set
    (``bench.evaluate``) like every other row. ``pack_s`` is the whole search (its evaluations included).
    """
    recipe = Recipe.preset(recipe_name)
    for drop in drops:
        key = f"metric {signature(recipe=repr(recipe), drop=drop, max_evaluations=max_evaluations)}"
        if bench.reuse(key):
            continue
        path = bench.workdir / f"metric-{key[7:]}.ncz"
        t0 = time.perf_counter()
        result = pack_for_metric(model, lambda m: accuracy(m, valid), drop, output=path, recipe=recipe,
                                 max_evaluations=max_evaluations, workers=1)
        search_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = load_state_dict(path)
        unpack_s = time.perf_counter() - t0
        bench.add(f"ncz pack_for_metric ({recipe_name} allocation, valid −{drop:g} points)", result.file_bytes,
                  bench.evaluate(loaded), search_s, unpack_s, path, method="pack_for_metric", max_drop_points=drop,
                  valid_metric=round(result.metric, 3), valid_baseline=round(result.baseline, 3),
                  evaluations=result.evaluations, lossless_fallback=result.lossless_fallback,
                  curve=[{"scale": p.scale, "bytes": p.file_bytes, "bits_per_weight": round(p.bits_per_weight, 4),
                          "valid_accuracy": round(p.metric, 3), "drop_points": round(p.drop, 3),
                          "met": p.meets_bound} for p in result.curve])


def metric_settings(args, command: str | None) -> dict[str, Any]:
    return {"recipe": args.metric_recipe, "max_drops_points": args.max_drops, "max_evaluations": args.max_evaluations,
            "searched_on": "valid", "command": command}


def headline(rows: list[dict[str, Any]], fp32: float, record: dict[str, Any]) -> dict[str, Any]:
    """The issue's target, judged on the task-aware row against the fp32 safetensors file."""
    fp32_bytes = next(r["bytes"] for r in rows if r["name"] == "safetensors fp32")
    row = next(r for r in rows if r["name"] == "ncz task-aware (PQ + QAT)")
    met = row["bytes"] <= (1 - TARGET_REDUCTION) * fp32_bytes and fp32 - row["metric"] <= TARGET_DROP_POINTS
    return {"task_aware": record,
            "target": f">= {100 * TARGET_REDUCTION:.1f} % smaller than fp32 safetensors at <= "
                      f"{TARGET_DROP_POINTS:g} point accuracy loss",
            "target_met": bool(met), "task_aware_reduction_pct": round(100 * (1 - row["bytes"] / fp32_bytes), 3),
            "task_aware_drop_points": round(fp32 - row["metric"], 3)}


def merge(previous: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """``previous`` (a full run's JSON) with ``result``'s rows: same name replaced in place, new ones appended."""
    rows = {row["name"]: row for row in result["variants"]}
    variants = [rows.pop(row["name"], row) for row in previous["variants"]]
    merged = {**previous, "variants": variants + list(rows.values())}
    if "pack_for_metric" in result:
        merged["pack_for_metric"] = result["pack_for_metric"]
    return merged


# --------------------------------------------------------------------------- main


def run(args, encoder_factory=minilm) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    started = time.time()
    groups = set(GROUPS if args.variants is None else args.variants)
    out = Path(args.out)
    if groups != set(GROUPS) and not out.exists():
        raise SystemExit(f"--variants {' '.join(sorted(groups))}: merges into {out}, which a full run writes first")
    data = read_dataset(args.data)
    tuned = signature(epochs=args.epochs, batch=args.batch, lr=args.lr, head_lr=args.head_lr, seed=args.seed,
                      max_length=args.max_length)
    workdir = Path(args.runs) / data.name / f"finetune-{tuned}"
    workdir.mkdir(parents=True, exist_ok=True)
    bert, tokenizer = encoder_factory()
    tokenized = {s: Tokenized(tokenizer, *data.splits[s], args.max_length) for s in data.splits}
    train, test = tokenized["train"], tokenized["test"]

    def fresh() -> IntentClassifier:
        return IntentClassifier(copy.deepcopy(bert), len(data.labels))

    torch.manual_seed(args.seed)
    model = fresh()
    training = finetune(model, train, args, workdir / "finetune.pt")
    fp32 = accuracy(model, test)
    print(f"uncompressed test accuracy: {fp32:.2f} % ({data.name}, {len(test)} test queries)", file=sys.stderr)
    valid = round(accuracy(model, tokenized["valid"]), 3) if "valid" in tokenized else None
    state = float_state(model)
    bench = Bench(fresh, test, state, workdir)
    if "metric" in groups and "valid" not in tokenized:
        raise SystemExit(f"{data.name}: no validation split, and pack_for_metric must not search on the test set")
    if "formats" in groups and not bench.reuse("safetensors"):
        safetensors_variants(bench, round(fp32, 3))

    # the headline first (it takes longest), then the post-training rows and the other formats
    pq = signature(subspaces=args.subspaces, centroids=args.centroids, iterations=args.kmeans_iterations,
                   codebook_error=args.codebook_error)
    quant = signature(pq=pq, bits=args.bits, qk_bits=args.qk_bits, position_bits=args.position_bits,
                      head_bits=args.head_bits)
    aware = signature(quant=quant, steps=args.qat_steps, qat_lr=args.qat_lr, pq_lr=args.pq_lr,
                      refresh_every=args.refresh_every, batch=args.batch, distill=args.distill,
                      temperature=args.distill_temperature, schedule=args.qat_schedule,
                      **({"hidden": args.distill_hidden} if args.distill_hidden else {}))  # old keys stay valid
    if groups & {"task-aware", "lowrank"}:
        books_file = workdir / f"kmeans-{pq}.pt"
        if books_file.exists():
            books, kmeans_s = torch.load(books_file, weights_only=True)
        else:
            t0 = time.time()
            books, _ = product_quantize(state[f"{WORD_EMBEDDING}.weight"], subspaces=args.subspaces,
                                        centroids=args.centroids, iterations=args.kmeans_iterations, seed=args.seed)
            kmeans_s = time.time() - t0
            torch.save((books, kmeans_s), books_file)
        pq_shape = {"subspaces": args.subspaces, "centroids": args.centroids, "kmeans_s": round(kmeans_s, 1)}
    if "task-aware" in groups:
        ta_state, ta_recipe, record = task_aware(model, train, books, args, workdir / f"task-aware-{aware}.pt")
        if not bench.reuse(f"task-aware {aware}"):
            bench.ncz("ncz task-aware (PQ + QAT)", ta_state, ta_recipe, f"task-aware-{aware}.ncz", **pq_shape,
                      train_s=record["seconds"])
        task_record = {**record, "bits": args.bits, "qk_bits": args.qk_bits, "position_bits": args.position_bits,
                       "head_bits": args.head_bits, "codebook_rel_error": args.codebook_error, **pq_shape}
        row = bench.rows[-1]
        print(f"task-aware: {row['bytes']:,} bytes, accuracy {row['metric']:.2f} % ({row['metric'] - fp32:+.2f} "
              "points)", file=sys.stderr)
        ptq = Recipe.from_dict({"rule": [codebook_rule(books, args), *rest_rules(args)]})
        if not bench.reuse(f"ptq {quant}"):
            bench.ncz("ncz post-training (task-aware recipe)", state, ptq, f"ptq-{quant}.ncz", extra_pack_s=kmeans_s,
                      **pq_shape)
        emb_only = Recipe.from_dict({"rule": [codebook_rule(books, args),
                                              {"pattern": "*", "representation": "lossless"}]})
        if not bench.reuse(f"pq {pq}"):
            bench.ncz("ncz PQ embeddings (post-training), rest lossless", state, emb_only, f"pq-ptq-{pq}.ncz",
                      extra_pack_s=kmeans_s, **pq_shape)
    if "lowrank" in groups:
        lowrank_variants(bench, state, books, args, pq, pq_shape, kmeans_s)
    if "presets" in groups:
        for preset in args.presets:
            if not bench.reuse(f"ncz {preset}"):
                bench.ncz(f"ncz {preset}", state, Recipe.preset(preset), f"{preset}.ncz",
                          lossless_metric=round(fp32, 3))
    if "metric" in groups:
        metric_variants(bench, model, tokenized["valid"], args.max_drops, args.metric_recipe, args.max_evaluations)
    if "formats" in groups:
        if not args.no_gguf:
            for kind in ("Q8_0", "Q4_0"):
                if not bench.reuse(f"gguf {kind}"):
                    gguf_variant(bench, kind)
        if args.nncodec_qps and not bench.reuse(f"nncodec {args.nncodec_qps}"):
            nncodec_variants(bench, args.nncodec_qps)
    command = " ".join(["python", "bench/nlu.py", *sys.argv[1:]]) if args.record_command else None
    if groups != set(GROUPS):  # a subset: its rows merged into the full run's JSON
        previous = json.loads(out.read_text(encoding="utf-8"))
        if abs(previous["uncompressed_accuracy"] - round(fp32, 3)) > 1e-9:
            raise SystemExit(f"{out} was measured on another model (accuracy {previous['uncompressed_accuracy']} "
                             f"!= {fp32:.3f}); not merged")
        result = merge(previous, {"variants": bench.rows})
        if "task-aware" in groups:  # the headline numbers follow the new task-aware row
            result.update(headline(result["variants"], fp32, {**task_record, "command": command}))
        result["merged"] = [*previous.get("merged", []),
                            {"variants": sorted(groups), "command": command, "total_s": round(time.time() - started, 1),
                             "load_average": list(os.getloadavg())}]
        if "metric" in groups:
            result["pack_for_metric"] = metric_settings(args, command)
        out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        plot(result, out.with_suffix(".png"))
        return result
    result = {
        "dataset": data.name, "layout": data.layout, "classes": len(data.labels),
        "sizes": {s: len(t) for s, t in tokenized.items()},
        "unseen_test_labels": sum(1 for y in data.splits["test"][1] if y < 0),
        "model": "all-MiniLM-L6-v2 (BertModel, 6 layers, 384) + masked mean pooling + dropout 0.1 + linear head",
        "parameters": bench.numel, "max_length": args.max_length, "seed": args.seed, "threads": args.threads,
        "uncompressed_accuracy": round(fp32, 3), "valid_accuracy": valid, "finetune": training,
        **headline(bench.rows, fp32, task_record),
        "load_average": list(os.getloadavg()), "total_s": round(time.time() - started, 1),
        "command": command, "pack_for_metric": metric_settings(args, command),
        "variants": bench.rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plot(result, out.with_suffix(".png"))
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="CLINC150 data_full.json (or its folder), or a train/ test/ folder")
    p.add_argument("--from-json", nargs="*", default=None,
                   help="re-render the plots (and --markdown) from these results, run nothing")
    p.add_argument("--markdown", default=None, help="write the NLU section into this page (e.g. docs/RESULTS.md)")
    p.add_argument("--out", default=str(RESULTS / "nlu.json"))
    p.add_argument("--runs", default=str(REPO / "runs" / "nlu"), help="trained state and archives (resumable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--head-lr", type=float, default=2e-3)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--presets", nargs="*", default=["lossless", "q8", "q4", "small"])
    p.add_argument("--nncodec-qps", type=int, nargs="*", default=[-22, -30, -38])
    p.add_argument("--no-gguf", action="store_true")
    p.add_argument("--subspaces", type=int, default=8, help="PQ subspaces of the word embedding")
    p.add_argument("--centroids", type=int, default=256)
    p.add_argument("--kmeans-iterations", type=int, default=10)
    p.add_argument("--codebook-error", type=float, default=0.05)
    p.add_argument("--bits", type=float, default=1.45, help="task-aware: bits per weight of the linear layers")
    p.add_argument("--qk-bits", type=float, default=1.1, help="task-aware: of the attention query/key")
    p.add_argument("--position-bits", type=float, default=2.0)
    p.add_argument("--head-bits", type=float, default=4.0)
    p.add_argument("--qat-steps", type=int, default=2000)
    p.add_argument("--lowrank", type=float, nargs=2, action="append", metavar=("RATIO", "BITS"),
                   default=None, help="post-training BSR rows: compression ratio of the encoder's linear layers "
                                      "and bits per factor entry (repeatable; default ×2 at 2, ×3 at 3, ×1.5 at 4)")
    p.add_argument("--qat-lr", type=float, default=1.5e-4, help="task-aware: peak lr of the rest (linear decay)")
    p.add_argument("--qat-schedule", choices=["linear", "constant"], default="linear",
                   help="task-aware: lr decays linearly to 0, or stays constant")
    p.add_argument("--distill", type=float, default=0.5, help="task-aware: weight of the KL to the fp32 logits")
    p.add_argument("--distill-temperature", type=float, default=2.0)
    p.add_argument("--distill-hidden", type=float, default=1.0,
                   help="task-aware: weight of the hidden states' relative squared error to the fp32 model's")
    p.add_argument("--pq-lr", type=float, default=5e-4)
    p.add_argument("--refresh-every", type=int, default=16)
    p.add_argument("--variants", nargs="*", default=None, choices=GROUPS,
                   help="only these groups, merged into the existing --out (default: all, --out rewritten)")
    p.add_argument("--max-drops", type=float, nargs="*", default=[0.5, 1.0],
                   help="pack_for_metric: validation accuracy points allowed to be lost, one row each")
    p.add_argument("--metric-recipe", default="q8", help="pack_for_metric: the preset whose allocation is scaled")
    p.add_argument("--max-evaluations", type=int, default=8, help="pack_for_metric: evaluations, baseline included")
    p.add_argument("--record-command", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    if args.lowrank is None:
        args.lowrank = [[2.0, 2.0], [3.0, 3.0], [1.5, 4.0]]
    if args.from_json is None and not args.data:
        p.error("--data is required (or --from-json with --markdown)")
    return args


def main() -> None:
    args = parse_args()
    if args.from_json is not None:
        paths = [Path(j) for j in args.from_json]
        for path in paths:  # re-rendered from the JSON alone
            plot(json.loads(path.read_text(encoding="utf-8")), path.with_suffix(".png"))
    else:
        result = run(args)
        print(json.dumps({k: v for k, v in result.items() if k != "variants"}, indent=1))
        for row in result["variants"]:
            print(json.dumps(row))
        paths = [Path(args.out)]
    if args.markdown:
        results = [(path.resolve().relative_to(REPO) if path.resolve().is_relative_to(REPO) else path,
                    json.loads(path.read_text(encoding="utf-8"))) for path in paths]
        write_markdown(Path(args.markdown), markdown(results))


if __name__ == "__main__":
    main()
