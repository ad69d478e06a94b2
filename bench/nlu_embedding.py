"""Extreme NLU compression: product-quantized embeddings on CLINC150 intent classification.

Reproduces the setting of Sathyendra et al., "Extreme Model Compression for
On-device Natural Language Understanding" (COLING 2020) at small scale: the
embedding table dominates an on-device intent model, so it is product-quantized
(``ncz.models.embedding``) and everything else scalar-quantized; task-aware
fine-tuning learns the codebooks with the intent loss. Target from that paper:
~97 % smaller at < 4 % accuracy loss.

Task: CLINC150 "full", the standard 150-way setup (train 15,000 / val 3,000 /
test 4,500; out-of-scope queries left out), from ``../shared/data/nlu/clinc150``.
Model: word-level vocabulary of every train word (+ ``<pad>``, ``<unk>``),
embedding 128, masked mean-pool, dropout 0.3, linear 150-way classifier
(fastText-style; a 1-D CNN and an MLP head were no better here). Trained with Adam.

Every compressed variant is measured end to end: the whole model is packed with
``ncz.models.pack`` into an ``.ncz`` archive, loaded into a freshly built model
with ``ncz.models.load_into`` (the embedding becomes a ``CodebookEmbedding``) and
evaluated on the test split. Variants:

- ``fp32``: the trained model, lossless archive;
- ``scalar``: embedding scalar-quantized at a bits-per-weight target (entropy
  coded indices), the same recipe for the rest — the baseline PQ must beat;
- ``pq-ptq``: embedding ``codebook`` (k-means PQ, post-training, no training);
- ``pq-st``: task-aware: ``finetune_codebooks(method="straight-through")``,
  codebooks + classifier trained with the intent loss from the PTQ init;
- ``pq-gumbel``: the same with annealed Gumbel-softmax assignments.

Rest of the model in every compressed variant: recipe ``quantized`` at
``rel_error`` ``--rest-error`` (per-channel steps, ANS-coded indices); codebooks
quantized at ``--codebook-error``. Sizes are archive bytes (headers and tables
included); reduction is against the fp32 parameter bytes (4 bytes/parameter).

Usage::

    nice python bench/nlu_embedding.py           # full run (a few minutes on 2 busy cores)
    python bench/nlu_embedding.py --quick        # smoke run (~1 min)

Writes ``bench/results/nlu_embedding.json`` and ``bench/results/nlu_embedding.png``
and prints the JSON.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "nlu" / "clinc150" / "data_full.json"
RESULTS = REPO / "bench" / "results"

from ncz.models import Recipe, load_into, pack  # noqa: E402
from ncz.models.embedding import finetune_codebooks, packable_state_dict, product_quantize  # noqa: E402

_WORD = re.compile(r"[a-z0-9']+")


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def load_data() -> dict[str, Any]:
    if not DATA.exists():
        sys.exit(f"needs {DATA} (the shared datasets next to the repo)")
    raw = json.loads(DATA.read_text(encoding="utf-8"))
    counts = collections.Counter(w for text, _ in raw["train"] for w in tokenize(text))
    vocab = {"<pad>": 0, "<unk>": 1}
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        vocab[word] = len(vocab)
    intents = sorted({intent for _, intent in raw["train"]})
    index = {name: i for i, name in enumerate(intents)}

    def encode(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [[vocab.get(w, 1) for w in tokenize(text)] or [1] for text, _ in raw[split]]
        x = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : len(r)] = torch.tensor(r)
        return x, torch.tensor([index[intent] for _, intent in raw[split]])

    return {"vocab": vocab, "classes": len(intents), "train": encode("train"), "val": encode("val"),
            "test": encode("test"), "singletons": sum(1 for c in counts.values() if c == 1)}


class IntentModel(nn.Module):
    """Embedding → masked mean-pool → dropout → linear."""

    def __init__(self, vocab: int, dim: int, classes: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, padding_idx=0)
        self.out = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids > 0).unsqueeze(-1).float()
        pooled = (self.embedding(ids) * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self.out(F.dropout(pooled, 0.3, self.training))


def batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int):
    """Endless shuffled mini-batches, trimmed to their longest utterance."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=generator)
        for start in range(0, len(perm) - size + 1, size):
            b = perm[start:start + size]
            xb = x[b]
            yield xb[:, : int((xb > 0).sum(1).max())], y[b]


def accuracy(model: nn.Module, split: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(split[0]).argmax(1) == split[1]).float().mean())


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def rest_rules(args) -> list[dict[str, Any]]:
    return [{"pattern": "*", "ndim": [1, 2], "representation": "quantized", "granularity": "channel",
             "rel_error": args.rest_error}]


def measure(name: str, state: dict, recipe: Recipe, data, fresh, fp32_bytes: int, workdir: Path,
            extra: dict[str, Any], started: float, fp32_weight: torch.Tensor) -> dict[str, Any]:
    """Pack, load into a fresh model, evaluate. ``seconds``: since ``started``
    (k-means / fine-tuning included), to the end of the evaluation.

    ``embedding_rel_error``: what pack reports (against the table it was given:
    for task-aware variants the fine-tuned PQ table, so only codebook rounding);
    ``embedding_rel_error_vs_fp32``: the loaded table against the fp32 model's.
    """
    path = workdir / f"{name}.ncz"
    report = pack(state, path, recipe=recipe, workers=1)
    model = fresh()
    loaded = load_into(model, path)
    emb_module = model.embedding
    table = emb_module.dense() if hasattr(emb_module, "dense") else emb_module.weight
    vs_fp32 = float((table.detach() - fp32_weight).norm() / fp32_weight.norm())
    size = path.stat().st_size
    emb = sum(t.stored_bytes for t in report.tensors if t.name.startswith("embedding."))
    emb_fp32 = fp32_weight.numel() * 4
    return {"variant": name, **extra, "archive_bytes": size, "reduction_pct": round(100 * (1 - size / fp32_bytes), 3),
            "embedding_bytes": emb, "embedding_reduction_pct": round(100 * (1 - emb / emb_fp32), 3),
            "rest_bytes": size - emb,
            "embedding_rel_error": round(next(t.rel_error for t in report.tensors if t.name == "embedding.weight"), 4),
            "embedding_rel_error_vs_fp32": round(vs_fp32, 4),
            "runtime_parameter_bytes": loaded.parameter_bytes_after, "swapped": loaded.factorized,
            "val_acc": round(accuracy(model, data["val"]), 4), "test_acc": round(accuracy(model, data["test"]), 4),
            "seconds": round(time.time() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=500, help="task-aware fine-tuning steps per variant")
    parser.add_argument("--ft-lr", type=float, default=3e-3)
    parser.add_argument("--rest-error", type=float, default=0.03)
    parser.add_argument("--codebook-error", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on shared cores)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "nlu_embedding.json")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.steps = 2, 60
    os.nice(5)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.time()
    data = load_data()
    vocab, classes = len(data["vocab"]), data["classes"]

    def fresh() -> IntentModel:
        return IntentModel(vocab, args.dim, classes)

    model = fresh()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    stream = batches(*data["train"], args.batch, seed=0)
    steps_per_epoch = len(data["train"][0]) // args.batch
    curve = []
    for _ in range(args.epochs):
        model.train()
        for _ in range(steps_per_epoch):
            loss = loss_fn(model, next(stream))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        curve.append(round(accuracy(model, data["val"]), 4))
    train_seconds = time.time() - started
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    weight = model.embedding.weight.detach().clone()

    configs = [(4, 256, 1), (8, 256, 1), (4, 256, 2), (16, 256, 1)]
    gumbel_configs = [(8, 256, 1)]
    scalar_bits = [0.25, 0.5, 1.0]
    if args.quick:
        configs, gumbel_configs, scalar_bits = [(8, 256, 1)], [(8, 256, 1)], [0.5]

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.time()
        rows.append(measure("fp32", model.state_dict(), Recipe.preset("lossless"), data, fresh, fp32_bytes, work,
                            {"method": "fp32"}, t0, weight))
        for bits in scalar_bits:
            t0 = time.time()
            recipe = Recipe.from_dict({"rule": [{"pattern": "embedding.weight", "representation": "quantized",
                                                 "granularity": "channel", "bits": bits}, *rest_rules(args)]})
            rows.append(measure(f"scalar-{bits}b", model.state_dict(), recipe, data, fresh, fp32_bytes, work,
                                {"method": "scalar", "bits": bits}, t0, weight))
        for m, k, s in configs + [c for c in gumbel_configs if c not in configs]:
            tag = f"M{m}K{k}" + (f"x{s}" if s > 1 else "")
            shape = {"M": m, "K": k, "stages": s, "code_bits_per_row": m * s * (k.bit_length() - 1)}
            t0 = time.time()
            books, _ = product_quantize(weight, subspaces=m, centroids=k, stages=s, seed=0)
            kmeans_seconds = time.time() - t0
            if (m, k, s) in configs:
                recipe = Recipe.from_dict({"rule": [
                    {"pattern": "embedding.weight", "representation": "codebook", "codebooks": books,
                     "codebook": "quantized", "codebook_rel_error": args.codebook_error}, *rest_rules(args)]})
                rows.append(measure(f"pq-ptq-{tag}", model.state_dict(), recipe, data, fresh, fp32_bytes, work,
                                    {"method": "pq-ptq", **shape}, t0, weight))
            methods = (["straight-through"] if (m, k, s) in configs else []) + \
                (["gumbel"] if (m, k, s) in gumbel_configs else [])
            for method in methods:
                t0 = time.time()
                tuned = finetune_codebooks(copy.deepcopy(model), "embedding", loss_fn,
                                           batches(*data["train"], args.batch, seed=1), steps=args.steps,
                                           lr=args.ft_lr, method=method, codebooks=books, seed=0)
                state, recipe = packable_state_dict(tuned, Recipe.from_dict({"rule": rest_rules(args)}),
                                                    codebook="quantized", codebook_rel_error=args.codebook_error)
                label = "pq-st" if method == "straight-through" else "pq-gumbel"
                rows.append(measure(f"{label}-{tag}", state, recipe, data, fresh, fp32_bytes, work,
                                    {"method": label, **shape, "steps": args.steps},
                                    t0 - kmeans_seconds, weight))

    base = rows[0]["test_acc"]
    for row in rows:
        row["acc_drop_pts"] = round(100 * (base - row["test_acc"]), 2)
        row["acc_drop_rel_pct"] = round(100 * (base - row["test_acc"]) / base, 2)
    target = [r for r in rows if r["method"] != "fp32" and r["reduction_pct"] >= 97.0 and r["acc_drop_rel_pct"] < 4.0]
    best = max(target, key=lambda r: r["test_acc"]) if target else None
    result = {
        "task": "CLINC150 full, 150 in-scope intents (test 4,500)",
        "model": f"embedding {vocab}x{args.dim} (padding_idx 0) + mean-pool + dropout 0.3 + linear {classes}",
        "vocab": vocab, "singleton_words": data["singletons"], "fp32_parameter_bytes": fp32_bytes,
        "train": {"epochs": args.epochs, "lr": args.lr, "batch": args.batch, "val_acc_per_epoch": curve,
                  "seconds": round(train_seconds, 1)},
        "finetune": {"steps": args.steps, "lr": args.ft_lr, "batch": args.batch, "commitment": 0.25, "train_rest": True,
                     "gumbel": {"tau": [1.0, 0.05], "hard_fraction": 0.5}},
        "recipe": {"embedding": "codebook (codebooks quantized at rel_error "
                                f"{args.codebook_error})", "rest": f"quantized rel_error {args.rest_error}"},
        "target": "≥ 97 % smaller than fp32 at < 4 % relative accuracy loss (Sathyendra et al. 2020)",
        "best_meeting_target": best["variant"] if best else None,
        "threads": args.threads, "quick": args.quick, "total_seconds": round(time.time() - started, 1),
        "results": rows,
    }
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plot(rows, fp32_bytes, out.with_suffix(".png"))
    print(json.dumps(result, indent=1))


def plot(rows: list[dict[str, Any]], fp32_bytes: int, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the JSON is the result; the plot is a convenience
        print("matplotlib missing: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"fp32": ("k", "*"), "scalar": ("tab:gray", "s"), "pq-ptq": ("tab:orange", "o"),
              "pq-st": ("tab:blue", "o"), "pq-gumbel": ("tab:green", "^")}
    labels = {"fp32": "fp32 (lossless archive)", "scalar": "scalar-quantized embedding",
              "pq-ptq": "PQ post-training", "pq-st": "PQ task-aware (straight-through)",
              "pq-gumbel": "PQ task-aware (Gumbel)"}
    floor = 64.0  # accuracies below are drawn on the floor with their value written out
    for method, (color, marker) in styles.items():
        pts = sorted((r["archive_bytes"] / 1024, 100 * r["test_acc"], r["variant"])
                     for r in rows if r["method"] == method)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [max(p[1], floor) for p in pts], marker=marker, color=color, label=labels[method],
                linestyle="-" if method in ("pq-ptq", "pq-st", "scalar") else "none")
        for x, y, name in pts:
            if y < floor:
                ax.annotate(f"↓ {y:.1f} %", (x, floor), textcoords="offset points", xytext=(5, 2), fontsize=7,
                            color=color)
            if method in ("pq-st", "pq-ptq"):
                ax.annotate(name.split("-")[-1], (x, max(y, floor)), textcoords="offset points",
                            xytext=(-14, 7) if method == "pq-st" else (4, -11), fontsize=7, color=color)
    base = next(100 * r["test_acc"] for r in rows if r["method"] == "fp32")
    ax.axhline(base * 0.96, color="tab:red", linestyle=":", linewidth=1, label="fp32 accuracy − 4 % (relative)")
    ax.axvline(0.03 * fp32_bytes / 1024, color="tab:purple", linestyle=":", linewidth=1, label="97 % smaller than fp32")
    ax.set_xscale("log")
    ax.set_ylim(floor - 1, 93)
    ax.set_xlabel("model archive size (KiB, log scale)")
    ax.set_ylabel("CLINC150 test accuracy (%)")
    ax.set_title("Intent classification: accuracy vs compressed model size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
