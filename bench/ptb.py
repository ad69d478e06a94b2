"""A word-level 2-layer LSTM language model on Penn Treebank, compressed and measured side by side.

Issue 16 §2–§4. One command trains the model (seeded, resumable, progress bar), reports its test
perplexity, then puts the same trained weights through every format and evaluates each on the
test set: safetensors (+ zstd −19), GGUF Q8_0/Q4_0, NNCodec, ncz presets, dictionary codes
(DirNet), low-rank (BSR), each alone and with quantization, and ``pack_for_metric`` sized by
validation perplexity. The GGUF / NNCodec / safetensors rows and the row cache are bench/nlu.py's;
plot and RESULTS.md section are ``bench/ptb_report.py``'s.

Data: ``ptb.{train,valid,test}.txt`` (Mikolov's 10k-word PTB); every line ends with ``<eos>``,
the vocabulary is the training words by frequency. Sizes are real archive bytes; bits per weight
count every float parameter. Trained state and archives go to ``--work`` (default
``/tmp/ncz-ptb``, never in git): training resumes from its checkpoint. Usage::

    nice -n 10 python bench/ptb.py                      # bench/results/ptb.json, ptb.png
    nice -n 10 python bench/ptb.py --markdown docs/RESULTS.md
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nlu
import ptb_report

from ncz.models import (
    Recipe,
    load_state_dict,
    pack,
    pack_for_metric,
    plan_dictionary,
    plan_lowrank,
    stable_rank_penalty,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DATA = REPO.parent / "shared" / "data" / "text" / "ptb"
EOS = "<eos>"

# --------------------------------------------------------------------------- data


def read_words(path: Path) -> list[str]:
    """Whitespace tokens of every line, each line closed by ``<eos>`` (the usual PTB LM setup)."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        words += line.split() + [EOS]
    return words


@dataclass
class Corpus:
    vocab: list[str]
    splits: dict[str, torch.Tensor]  # token ids, 1-D int64

    @classmethod
    def read(cls, folder: Path, prefix: str = "ptb") -> Corpus:
        words = {s: read_words(folder / f"{prefix}.{s}.txt") for s in ("train", "valid", "test")}
        counts = Counter(words["train"])
        vocab = sorted(counts, key=lambda w: (-counts[w], w))  # by frequency, ties by spelling
        index = {w: i for i, w in enumerate(vocab)}
        unk = index.get("<unk>")
        splits = {}
        for split, ws in words.items():
            missing = [w for w in ws if w not in index]
            if missing and unk is None:
                raise SystemExit(f"{folder}: {split} has {len(missing)} words outside the training vocabulary")
            splits[split] = torch.tensor([index.get(w, unk) for w in ws], dtype=torch.long)
        return cls(vocab, splits)


def batchify(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """(steps, batch) columns of consecutive text; the tail that does not fill a column is dropped."""
    steps = ids.numel() // batch
    return ids[: steps * batch].view(batch, steps).t().contiguous()


# --------------------------------------------------------------------------- model


class LSTMLM(nn.Module):
    """Embedding → 2-layer LSTM → softmax over the vocabulary, input and output embeddings tied
    (Press & Wolf 2017; Inan et al. 2017): fewer weights and a lower perplexity."""

    def __init__(self, vocab: int, size: int, layers: int = 2, dropout: float = 0.4):
        super().__init__()
        self.embedding = nn.Embedding(vocab, size)
        self.lstm = nn.LSTM(size, size, layers, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.decoder_bias = nn.Parameter(torch.zeros(vocab))
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)

    def forward(self, x: torch.Tensor, hidden=None):
        out, hidden = self.lstm(self.drop(self.embedding(x)), hidden)
        return F.linear(self.drop(out), self.embedding.weight, self.decoder_bias), hidden


@dataclass
class TrainConfig:
    size: int = 256
    layers: int = 2
    dropout: float = 0.3
    batch: int = 32
    bptt: int = 35
    epochs: int = 4  # ~4 min an epoch at 1 idle thread; this shared machine took 15
    lr: float = 2e-3
    clip: float = 0.5
    decay: float = 0.5  # lr × decay at each epoch from decay_from on, and whenever validation gets worse
    decay_from: int = 3
    seed: int = 0
    save_every: int = 100  # batches between checkpoints


@torch.inference_mode()
def perplexity(model: LSTMLM, ids: torch.Tensor, batch: int = 10, bptt: int = 35) -> float:
    """exp(mean negative log-likelihood) over every predicted token, hidden state carried along."""
    model.eval()
    data = batchify(ids, batch)
    total, count, hidden = 0.0, 0, None
    for s in range(0, data.shape[0] - 1, bptt):
        x, y = data[s:s + bptt], data[s + 1:s + 1 + bptt]
        x = x[: y.shape[0]]
        logits, hidden = model(x, hidden)
        total += float(F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        count += y.numel()
    return math.exp(total / count)


def new_model(vocab: int, cfg: TrainConfig) -> LSTMLM:
    torch.manual_seed(cfg.seed)
    return LSTMLM(vocab, cfg.size, cfg.layers, cfg.dropout)


def _progress(total: int, initial: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, mininterval=10, file=sys.stderr, dynamic_ncols=True)


def train(corpus: Corpus, cfg: TrainConfig, work: Path, *, stop_after: int | None = None,
          progress: bool = True) -> tuple[LSTMLM, dict[str, Any]]:
    """Train (or resume) the model; returns the best-on-validation weights and the training record.

    The checkpoint ``work/train.pt`` holds model, optimizer, lr, position in the epoch, the carried
    hidden state and the RNG, so a resumed run continues exactly where the interrupted one stopped.
    ``stop_after`` (batches in all) checkpoints and returns early, as a kill would (tests). A resumed
    run may ask for fewer (or more) epochs than the checkpoint's; the best weights of the epochs run
    so far are returned.
    """
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "train.pt"
    model = new_model(len(corpus.vocab), cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    data = batchify(corpus.splits["train"], cfg.batch)
    starts = list(range(0, data.shape[0] - 1, cfg.bptt))
    state: dict[str, Any] = {"epoch": 0, "index": 0, "done": 0, "lr": cfg.lr, "hidden": None, "history": [],
                             "best": None, "best_valid": math.inf, "seconds": 0.0, "rng": torch.get_rng_state(),
                             "loss_sum": 0.0, "loss_count": 0,
                             "config": asdict(cfg)}
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        # the epoch count may change on resume (a shorter run stops at its last epoch); nothing else
        if {**saved["config"], "epochs": cfg.epochs} != asdict(cfg):
            raise SystemExit(f"{checkpoint}: trained with {saved['config']}, not {asdict(cfg)}; use another --work")
        saved["config"] = asdict(cfg)
        model.load_state_dict(saved.pop("model"))
        optimizer.load_state_dict(saved.pop("optimizer"))
        state = {"loss_sum": 0.0, "loss_count": 0, **saved}  # checkpoints written before these were kept
        torch.set_rng_state(state["rng"])
    else:
        torch.manual_seed(cfg.seed + 1)

    def save() -> None:
        state["rng"] = torch.get_rng_state()
        torch.save({**state, "model": model.state_dict(), "optimizer": optimizer.state_dict()},
                   checkpoint.with_suffix(".tmp"))
        checkpoint.with_suffix(".tmp").replace(checkpoint)

    total = cfg.epochs * len(starts)
    bar = _progress(total, state["done"], "train") if progress else None
    started = time.time() - state["seconds"]
    while state["epoch"] < cfg.epochs:
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = state["lr"]
        while state["index"] < len(starts):
            s = starts[state["index"]]
            x, y = data[s:s + cfg.bptt], data[s + 1:s + 1 + cfg.bptt]
            x = x[: y.shape[0]]
            hidden = state["hidden"]
            logits, hidden = model(x, hidden)
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            optimizer.step()
            state["hidden"] = tuple(h.detach() for h in hidden)  # truncated BPTT
            state["index"] += 1
            state["done"] += 1
            state["loss_sum"] += loss.item()
            state["loss_count"] += 1
            if bar is not None:
                bar.update(1)
                if state["loss_count"] % 20 == 0:
                    bar.set_postfix_str(f"ep {state['epoch'] + 1} "
                                        f"ppl {math.exp(state['loss_sum'] / state['loss_count']):.1f} "
                                        f"lr {state['lr']:.2g}", refresh=False)
            if state["done"] % cfg.save_every == 0 or state["done"] == stop_after:
                state["seconds"] = time.time() - started
                save()
            if state["done"] == stop_after:
                if bar is not None:
                    bar.close()
                return model, state
        valid = perplexity(model, corpus.splits["valid"])
        state["history"].append({"epoch": state["epoch"] + 1, "lr": state["lr"], "valid_ppl": round(valid, 3),
                                 "train_ppl": round(math.exp(state["loss_sum"] / max(1, state["loss_count"])), 3),
                                 "seconds": round(time.time() - started, 1)})
        if bar is not None:
            bar.write(f"epoch {state['epoch'] + 1}: valid perplexity {valid:.2f} (lr {state['lr']:.2g})")
        worse = valid >= state["best_valid"]
        if not worse:
            state["best_valid"] = valid
            state["best"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if worse or state["epoch"] + 1 >= cfg.decay_from:
            state["lr"] *= cfg.decay
        state["epoch"] += 1
        state["index"], state["hidden"], state["loss_sum"], state["loss_count"] = 0, None, 0.0, 0
        state["seconds"] = time.time() - started
        save()
    if bar is not None:
        bar.close()
    if state["best"] is not None:
        model.load_state_dict(state["best"])
    return model, state


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def evaluator(corpus: Corpus, cfg: TrainConfig, split: str) -> Callable[[dict[str, torch.Tensor]], float]:
    """Perplexity on ``split`` of a state dict (dense tensors, the trained model's names)."""
    model = new_model(len(corpus.vocab), cfg)

    def evaluate(state: dict[str, torch.Tensor]) -> float:
        own = model.state_dict()
        model.load_state_dict({k: state[k].to(own[k].dtype) if k in state else own[k] for k in own})
        return perplexity(model, corpus.splits[split])

    return evaluate


# --------------------------------------------------------------------------- compression

EMBEDDING = "embedding.weight"
LSTM = "lstm.weight_*"
CLASSES = {"embedding": EMBEDDING, "lstm": LSTM}


class PTBBench(nlu.Bench):
    """bench/nlu.py's variant table (row cache, safetensors / GGUF / NNCodec rows) with perplexity as the metric."""

    def __init__(self, score: Callable[[dict[str, torch.Tensor]], float], state: dict[str, torch.Tensor],
                 workdir: Path):
        super().__init__(None, None, state, workdir)
        self.score = score

    def evaluate(self, state: dict[str, torch.Tensor]) -> float:
        return round(self.score(state), 3)

    def add(self, name: str, size: int, metric: float, pack_s: float, unpack_s: float, archive: Path | None,
            **extra: Any) -> dict[str, Any]:
        return super().add(name, size, metric, pack_s, unpack_s, archive, metric_name="perplexity", **extra)

    def ncz(self, name: str, state: dict[str, torch.Tensor], recipe: Recipe, file: str, *,
            pre_encoded: dict | None = None, extra_pack_s: float = 0.0, lossless_metric: float | None = None,
            **extra: Any) -> dict[str, Any]:
        """Pack, load back, evaluate (a bit-exact round trip takes ``lossless_metric``)."""
        path = self.workdir / file
        t0 = time.perf_counter()
        report = pack(state, path, recipe=recipe, workers=1, pre_encoded=pre_encoded)
        pack_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = load_state_dict(path)
        unpack_s = time.perf_counter() - t0
        exact = lossless_metric is not None and loaded.keys() == state.keys() and \
            all(torch.equal(loaded[k], state[k]) for k in state)
        metric = lossless_metric if exact else self.evaluate(loaded)
        parts = {f"{c}_bytes": sum(t.stored_bytes for t in report.tensors if fnmatch.fnmatchcase(t.name, p))
                 for c, p in CLASSES.items()}
        kinds = sorted({f"{t.name}:{t.representation}" for t in report.tensors if t.numel >= 4096})
        return self.add(name, report.file_bytes, metric, pack_s + extra_pack_s, unpack_s, path, **parts,
                        representations=kinds, **({"lossless": True} if exact else {}), **extra)


def _class_rule(cls: str, error: float) -> dict[str, Any]:
    if cls == "embedding":  # tied: input and softmax; one step for the table (as the presets' token embeddings)
        return {"pattern": EMBEDDING, "representation": "quantized", "granularity": "tensor", "rel_error": error}
    return {"pattern": LSTM, "ndim": [2], "representation": "quantized", "granularity": "rowcol", "rel_error": error}


def quant_recipe(errors: dict[str, float], name: str = "ptb") -> Recipe:
    """Each class of CLASSES quantized at its error, biases with one step each, the rest lossless."""
    return Recipe.from_dict({"rule": [
        *(_class_rule(c, e) for c, e in errors.items()),
        {"pattern": "*", "ndim": [1], "min_numel": 1024, "representation": "quantized", "granularity": "tensor",
         "rel_error": 0.01},
        {"pattern": "*", "representation": "lossless"}]}, name)


def derive_errors(state: dict[str, torch.Tensor], score: Callable, work: Path, probes=(0.05, 0.1),
                  target_drop: float = 0.01) -> dict[str, Any]:
    """Per-class errors as the presets derive theirs (recipe.py): each class quantized alone at the probe
    errors, relative perplexity rise fitted as s·e², then eᵢ ∝ √(nᵢ/sᵢ) with Σ sᵢeᵢ² = ``target_drop``
    (every class pays the same rise per bit). Measured on *validation* perplexity; cached in ``work``."""
    cache = work / f"derivation-{nlu.signature(probes=list(probes), target=target_drop)}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    base = score(state)
    fits, counts, rows = {}, {}, []
    for cls, pattern in CLASSES.items():
        counts[cls] = sum(v.numel() for k, v in state.items() if fnmatch.fnmatchcase(k, pattern))
        slopes = []
        for e in probes:
            recipe = Recipe.from_dict({"rule": [_class_rule(cls, e), {"pattern": "*", "representation": "lossless"}]})
            path = work / "probe.ncz"
            pack(state, path, recipe=recipe, workers=1)
            drop = score(load_state_dict(path)) / base - 1
            rows.append({"class": cls, "rel_error": e, "valid_rise": round(drop, 6)})
            slopes.append(max(drop, 1e-6) / e**2)
        fits[cls] = float(sum(slopes) / len(slopes))
    scale = math.sqrt(target_drop / sum(counts.values()))
    errors = {c: round(min(0.5, scale * math.sqrt(counts[c] / fits[c])), 5) for c in CLASSES}
    out = {"valid_ppl": base, "probes": rows, "slopes": fits, "counts": counts, "target_rise": target_drop,
           "errors": errors}
    cache.write_text(json.dumps(out, indent=1) + "\n")
    return out


def finetune(model: LSTMLM, corpus: Corpus, cfg: TrainConfig, steps: int, lr: float, *,
             penalty: Callable[[], torch.Tensor] | None = None, frozen: tuple[str, ...] = (),
             desc: str = "fine-tune") -> float:
    """A short fine-tune from the start of the training text (same batching); ``frozen``: parameter globs
    kept as they are, ``penalty``: added to the loss. Returns the seconds taken."""
    torch.manual_seed(cfg.seed + 2)
    params = [p for n, p in model.named_parameters() if not any(fnmatch.fnmatchcase(n, f) for f in frozen)]
    for p in model.parameters():
        p.requires_grad_(any(q is p for q in params))
    optimizer = torch.optim.Adam(params, lr=lr)
    data = batchify(corpus.splits["train"], cfg.batch)
    starts = list(range(0, data.shape[0] - 1, cfg.bptt))
    bar = _progress(steps, 0, desc)
    t0, hidden = time.time(), None
    model.train()
    for step in range(steps):
        s = starts[step % len(starts)]
        x, y = data[s:s + cfg.bptt], data[s + 1:s + 1 + cfg.bptt]
        logits, hidden = model(x[: y.shape[0]], hidden if step % len(starts) else None)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
        total = loss + penalty() if penalty is not None else loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_(params, cfg.clip)
        optimizer.step()
        for group in optimizer.param_groups:  # linear decay to 0
            group["lr"] = lr * (1 - (step + 1) / steps)
        hidden = tuple(h.detach() for h in hidden)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"loss {loss.item():.3f} total {total.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()
    for p in model.parameters():
        p.requires_grad_(True)
    return time.time() - t0


def lowrank_ranks(recipe: Recipe) -> dict[str, int]:
    """{tensor: rank} of a plan_lowrank recipe (its exact-name rules)."""
    return {r.pattern: int(r.options["rank"]) for r in recipe.rules if r.representation == "lowrank"}


def run(args: argparse.Namespace, corpus: Corpus, cfg: TrainConfig, model: LSTMLM, record: dict[str, Any],
        test_ppl: float) -> dict[str, Any]:
    """Every variant of the trained weights (groups: formats, presets, quant, lowrank, dictionary, metric,
    finetune); rows are cached in ``--work``/rows.json, so a rerun measures only what is new."""
    started = time.time()
    work = Path(args.work)
    state = float_state(model)
    score_test, score_valid = evaluator(corpus, cfg, "test"), evaluator(corpus, cfg, "valid")
    bench = PTBBench(score_test, state, work)
    groups = set(GROUPS if args.variants is None else args.variants)  # --variants alone: none
    base = round(test_ppl, 3)
    if not bench.reuse("safetensors"):
        nlu.safetensors_variants(bench, base)
    derived = derive_errors(state, score_valid, work)
    errors = derived["errors"]
    if "formats" in groups:
        for kind in ("Q8_0", "Q4_0"):
            if not bench.reuse(f"gguf {kind}"):
                nlu.gguf_variant(bench, kind)
        if args.nncodec_qps and not bench.reuse(f"nncodec {args.nncodec_qps}"):
            nlu.nncodec_variants(bench, args.nncodec_qps)
    if "presets" in groups:
        for preset in ("lossless", "q8", "q4", "small"):
            if not bench.reuse(f"ncz {preset}"):
                bench.ncz(f"ncz {preset}", state, Recipe.preset(preset), f"{preset}.ncz", lossless_metric=base)
    quant_at = {s: {c: min(0.5, e * s) for c, e in errors.items()} for s in args.quant_scales}
    if "quant" in groups:
        for s in args.quant_scales:
            key = f"quant {nlu.signature(errors=quant_at[s])}"
            if not bench.reuse(key):
                bench.ncz(f"ncz quantized, PTB recipe ×{s:g}", state, quant_recipe(quant_at[s]), f"quant-x{s:g}.ncz",
                          method="quantization", errors=quant_at[s])
        # the LSTM alone coarser, the embedding as in the "+ quantization" rows: the LSTM-level comparison
        for s in args.lstm_scales:
            errs = {"embedding": quant_at[1.0]["embedding"], "lstm": min(0.5, errors["lstm"] * s)}
            if not bench.reuse(f"quant {nlu.signature(errors=errs)}"):
                bench.ncz(f"ncz quantized, PTB recipe ×1, LSTM ×{s:g}", state, quant_recipe(errs),
                          f"quant-lstm-x{s:g}.ncz", method="quantization", errors=errs)
    rest = quant_recipe(quant_at[1.0])  # what "+ quantization" rows use for the tensors the method leaves
    if "lowrank" in groups:
        for ratio in args.lowrank_ratios:
            for label, fallback, factor, exclude in (
                    ("alone", None, 0.01, ()),
                    ("+ quantization", rest, errors["lstm"], ()),
                    ("LSTM only + quantization", rest, errors["lstm"], (EMBEDDING,))):
                key = f"lowrank {nlu.signature(ratio=ratio, label=label, errors=errors)}"
                if bench.reuse(key):
                    continue
                t0 = time.perf_counter()
                plan = plan_lowrank(state, ratio, exclude=exclude, factor_rel_error=factor, fallback=fallback)
                bench.ncz(f"ncz low-rank (BSR) ×{ratio:g} {label}", state, plan, f"lowrank-x{ratio:g}-{key[8:]}.ncz",
                          extra_pack_s=time.perf_counter() - t0, method="low-rank", ranks=lowrank_ranks(plan))
    dictionaries: dict[float, tuple[dict, float]] = {}  # bits -> (encodings of the LSTM, seconds)

    def dictionary(bits: float) -> tuple[dict, float]:
        """The LSTM's four gates of both layers on one dictionary (atoms of length hidden), at ``bits``."""
        if bits not in dictionaries:
            t0 = time.perf_counter()
            encoded = plan_dictionary(state, {LSTM: {"dim": cfg.size}}, bits=bits,
                                      iterations=args.dictionary_iterations, atoms=args.dictionary_atoms)
            dictionaries[bits] = encoded, time.perf_counter() - t0
        return dictionaries[bits]

    if "dictionary" in groups:
        for bits in args.dictionary_bits:
            for label, recipe in (("alone", Recipe.preset("lossless")), ("+ quantization", rest)):
                key = f"dictionary {nlu.signature(bits=bits, label=label, errors=errors, atoms=args.dictionary_atoms)}"
                if bench.reuse(key):
                    continue
                encoded, seconds = dictionary(bits)
                bench.ncz(f"ncz dictionary (DirNet) LSTM {bits:g} bits {label}", state, recipe,
                          f"dictionary-{bits:g}-{key[11:]}.ncz", pre_encoded=encoded, method="dictionary",
                          extra_pack_s=seconds)
    if "metric" in groups:
        for label, recipe in (("PTB recipe", quant_recipe(errors)), ("q8 allocation", Recipe.preset("q8"))):
            key = f"metric {nlu.signature(label=label, errors=errors, drop=args.max_rise)}"
            if bench.reuse(key):
                continue
            path = work / f"metric-{key[7:]}.ncz"
            t0 = time.perf_counter()
            result = pack_for_metric(state, score_valid, args.max_rise, output=path, higher_is_better=False,
                                     relative=True, recipe=recipe, workers=1)
            search_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            loaded = load_state_dict(path)
            unpack_s = time.perf_counter() - t0
            bench.add(f"ncz pack_for_metric ({label}, valid +{100 * args.max_rise:g} %)", result.file_bytes,
                      bench.evaluate(loaded), search_s, unpack_s, path, method="pack_for_metric",
                      valid_metric=round(result.metric, 3), valid_baseline=round(result.baseline, 3),
                      evaluations=result.evaluations, lossless_fallback=result.lossless_fallback,
                      curve=[{"scale": p.scale, "bytes": p.file_bytes, "bits_per_weight": round(p.bits_per_weight, 4),
                              "valid_ppl": round(p.metric, 3), "rise": round(p.drop, 5), "met": p.meets_bound}
                             for p in result.curve])
    if "finetune" in groups:
        finetuned_variants(bench, args, corpus, cfg, state, errors, rest, dictionary)
    return {
        "model": f"word-level LSTM LM: embedding {cfg.size} (tied with the softmax), {cfg.layers}×LSTM({cfg.size}), "
                 f"dropout {cfg.dropout}, vocabulary {len(corpus.vocab)}",
        "parameters": bench.numel, "vocabulary": len(corpus.vocab), "config": asdict(cfg),
        "tokens": {k: int(v.numel()) for k, v in corpus.splits.items()},
        "training": {"history": record["history"], "seconds": round(record["seconds"], 1), "threads": args.threads},
        "valid_ppl": round(record["best_valid"], 3), "test_ppl": base, "metric_name": "perplexity",
        "target": {"smaller": ptb_report.TARGET_RATIO, "rise": ptb_report.TARGET_RISE},
        "derivation": derived, "load_average": list(os.getloadavg()), "total_s": round(time.time() - started, 1),
        "command": " ".join(["python", "bench/ptb.py", *sys.argv[1:]]), "variants": bench.rows,
    }


def finetuned_variants(bench: PTBBench, args, corpus: Corpus, cfg: TrainConfig, state: dict[str, torch.Tensor],
                       errors: dict[str, float], rest: Recipe, dictionary: Callable) -> None:
    """BSR: fine-tune with the stable-rank penalty at the planned ranks, then pack the same plan.
    DirNet: LSTM frozen at its dictionary reconstruction, the rest fine-tuned to match it, then packed."""
    work = Path(args.work)
    for ratio in args.finetune_ratios:
        plan = plan_lowrank(state, ratio, factor_rel_error=errors["lstm"], fallback=rest)
        ranks = lowrank_ranks(plan)
        key = f"bsr-ft {nlu.signature(ratio=ratio, errors=errors, steps=args.finetune_steps, lam=args.penalty)}"
        if bench.reuse(key):
            continue
        model = new_model(len(corpus.vocab), cfg)
        model.load_state_dict(state)
        seconds = finetune(model, corpus, cfg, args.finetune_steps, args.finetune_lr, desc=f"BSR ×{ratio:g}",
                           penalty=lambda m=model, r=ranks: args.penalty * stable_rank_penalty(m, r))
        tuned = float_state(model)
        bench.ncz(f"ncz low-rank (BSR) ×{ratio:g} + quantization, stable-rank fine-tuned", tuned, plan,
                  f"bsr-ft-x{ratio:g}-{key[7:]}.ncz", method="low-rank", ranks=ranks, finetune_s=round(seconds, 1),
                  finetune_steps=args.finetune_steps, penalty=args.penalty)
    for bits in args.finetune_dictionary_bits:
        settings = nlu.signature(bits=bits, errors=errors, steps=args.finetune_steps, atoms=args.dictionary_atoms)
        key = f"dirnet-ft {settings}"
        if bench.reuse(key):
            continue
        encoded, _ = dictionary(bits)
        probe = work / "dictionary-probe.ncz"
        pack({k: state[k] for k in encoded}, probe, pre_encoded=encoded, workers=1)
        decoded = load_state_dict(probe)
        model = new_model(len(corpus.vocab), cfg)
        model.load_state_dict({**state, **decoded})
        seconds = finetune(model, corpus, cfg, args.finetune_steps, args.finetune_lr, frozen=(LSTM,),
                           desc=f"DirNet {bits:g} bits")
        tuned = float_state(model)
        bench.ncz(f"ncz dictionary (DirNet) LSTM {bits:g} bits + quantization, rest fine-tuned", tuned, rest,
                  f"dirnet-ft-{bits:g}-{key[10:]}.ncz", pre_encoded=encoded, method="dictionary",
                  finetune_s=round(seconds, 1), finetune_steps=args.finetune_steps)


GROUPS = ("formats", "presets", "quant", "lowrank", "dictionary", "metric", "finetune")

# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DATA), help="folder with ptb.{train,valid,test}.txt")
    p.add_argument("--work", default="/tmp/ncz-ptb", help="checkpoints and archives (resumable; not in git)")
    p.add_argument("--out", default=str(RESULTS / "ptb.json"))
    p.add_argument("--markdown", default=None, help="write the PTB section into this page (docs/RESULTS.md)")
    p.add_argument("--from-json", default=None, help="re-render plot and --markdown from this result, run nothing")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-only", action="store_true", help="train (or resume), report perplexity, stop")
    p.add_argument("--resume", action="store_true",
                   help="require --work's checkpoint (training always continues from one when it exists)")
    for field, default in asdict(TrainConfig()).items():
        p.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    p.add_argument("--variants", nargs="*", default=None, choices=GROUPS,
                   help="only these groups of variants (none: training, derivation, safetensors)")
    p.add_argument("--nncodec-qps", type=int, nargs="*", default=[-14, -16, -18, -22, -30, -38])
    p.add_argument("--quant-scales", type=float, nargs="*", default=[0.5, 1.0, 1.5, 2.0, 3.0],
                   help="multiples of the derived per-class errors (1: +1 %% validation perplexity by the fit)")
    p.add_argument("--lstm-scales", type=float, nargs="*", default=[2.0, 3.0],
                   help="quantization rows with only the LSTM's errors scaled (the embedding at ×1)")
    p.add_argument("--lowrank-ratios", type=float, nargs="*", default=[1.5, 2.0, 3.0])
    p.add_argument("--dictionary-bits", type=float, nargs="*", default=[1.0, 2.0])
    p.add_argument("--dictionary-atoms", type=int, nargs="*", default=[256],
                   help="candidate dictionary sizes K (the library's default, dim/4 … 2·dim, costs 4× the time: "
                        "at 1.5 bits one K takes minutes on this LSTM)")
    p.add_argument("--dictionary-iterations", type=int, default=10, help="OMP/MOD sweeps per candidate")
    p.add_argument("--max-rise", type=float, default=0.02, help="pack_for_metric: relative perplexity rise allowed")
    p.add_argument("--finetune-ratios", type=float, nargs="*", default=[1.5, 2.0])
    p.add_argument("--finetune-dictionary-bits", type=float, nargs="*", default=[2.0])
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--penalty", type=float, default=1.0, help="λ of the stable-rank penalty")
    args = p.parse_args(argv)
    if 1.0 not in args.quant_scales:
        args.quant_scales.append(1.0)  # the "+ quantization" rows use scale 1
    return args


def config_of(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f: getattr(args, f) for f in asdict(TrainConfig())})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    if args.resume and not (work / "train.pt").exists():
        raise SystemExit(f"--resume: no checkpoint {work / 'train.pt'}")
    if args.from_json is not None:
        out = Path(args.from_json)
        result = json.loads(out.read_text(encoding="utf-8"))
    else:
        cfg = config_of(args)
        corpus = Corpus.read(Path(args.data))
        model, record = train(corpus, cfg, work)
        test = perplexity(model, corpus.splits["test"])
        print(json.dumps({"valid_ppl": record["best_valid"], "test_ppl": test, "history": record["history"],
                          "train_s": record["seconds"]}), flush=True)
        if args.train_only:
            return {"valid_ppl": record["best_valid"], "test_ppl": test}
        result = run(args, corpus, cfg, model, record, test)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    ptb_report.plot(result, out.with_suffix(".png"))
    if args.markdown:
        ptb_report.write_markdown(Path(args.markdown), ptb_report.markdown(result, out))
    return result


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
