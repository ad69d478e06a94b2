"""Benchmark AdaComp against plain DDP and PowerSGD on 2 CPU workers (gloo).

Two workloads, three gradient exchanges each:

* ``lstm``: word-level LSTM language model on Penn Treebank
  (``../shared/data/text/ptb``): 10k vocabulary, embedding/hidden 200, one
  layer, BPTT 35, 20 streams per worker, SGD lr 20 with gradient clipping 0.25
  (the classic Zaremba / PyTorch word_language_model recipe, shortened to a
  fixed number of steps). Metric: validation perplexity.
* ``cnn``: small 2-conv CNN on scikit-learn's 8x8 digits, SGD. Metric: test
  accuracy.

Exchanges: ``plain`` (DDP all-reduce), ``powersgd`` (torch's built-in
``powerSGD_hook``, rank ``--powersgd-rank``, error feedback and warm start on,
waited on per bucket -- see ``_serialized_powersgd_hook`` --
vanilla all-reduce for the first ``max(2, 10% of steps)`` steps as its docs
recommend; its library default of 1000 would exceed these runs) and
``adacomp`` (``ncz.models.adacomp`` with its default config).

Byte accounting (per worker, per step, by layer type): the payload each worker
contributes. Plain: 4 bytes per element. PowerSGD: 4 bytes per element of its
P and Q factors plus the tensors it leaves uncompressed (same rule as
``_should_compress``), dense during its warm-up. AdaComp: the encoded message
bytes (including the 4-byte frame per tensor and count per bucket), dense
during its warm-up. The padding that AdaComp's equal-size ``all_gather`` adds
is reported separately as ``gathered_bytes``.

``compression_rate`` counts compressed steps only (the scheme's rate);
``effective_compression_rate`` includes the warm-up steps.

Usage::

    python bench/adacomp.py            # full run (~10-15 min on 2 cores)
    python bench/adacomp.py --quick    # ~1-2 min smoke run
    python bench/adacomp.py --from-json bench/results/adacomp.json  # re-plot only

Writes ``bench/results/adacomp.json`` and ``bench/results/adacomp.png`` and
prints the JSON to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

REPO = Path(__file__).resolve().parents[1]
PTB = REPO.parent / "shared" / "data" / "text" / "ptb"
LAYER_TYPES = ("conv", "linear_lstm", "other")
WORLD = 2


# --------------------------------------------------------------------------
# data + models
# --------------------------------------------------------------------------


def load_ptb(max_train_tokens: int | None, max_valid_tokens: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Tokenize PTB with the usual ``<eos>`` per line; vocabulary from train."""

    def words(path: Path) -> list[str]:
        out: list[str] = []
        with path.open(encoding="utf-8") as f:
            for line in f:
                out.extend(line.split() + ["<eos>"])
        return out

    train_words = words(PTB / "ptb.train.txt")
    vocab = {w: i for i, w in enumerate(sorted(set(train_words)))}
    valid_words = words(PTB / "ptb.valid.txt")
    unk = vocab["<unk>"]
    train = torch.tensor([vocab[w] for w in train_words], dtype=torch.long)
    valid = torch.tensor([vocab.get(w, unk) for w in valid_words], dtype=torch.long)
    if max_train_tokens:
        train = train[:max_train_tokens]
    if max_valid_tokens:
        valid = valid[:max_valid_tokens]
    return train, valid, len(vocab)


def batchify(data: torch.Tensor, n_streams: int) -> torch.Tensor:
    rows = data.numel() // n_streams
    return data[: rows * n_streams].view(n_streams, rows).t().contiguous()  # (T, streams)


class LSTMLM(nn.Module):
    def __init__(self, vocab: int, emb: int = 200, hidden: int = 200) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)  # dense gradient (sparse=False) for DDP
        self.lstm = nn.LSTM(emb, hidden, num_layers=1)
        self.dec = nn.Linear(hidden, vocab)
        for w in (self.emb.weight, self.dec.weight):
            nn.init.uniform_(w, -0.1, 0.1)
        nn.init.zeros_(self.dec.bias)

    def forward(self, x: torch.Tensor, h: tuple[torch.Tensor, torch.Tensor] | None):
        out, h = self.lstm(self.emb(x), h)
        return self.dec(out), h


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.f1 = nn.Linear(32 * 4 * 4, 64)
        self.f2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c1(x))
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.f2(F.relu(self.f1(x.flatten(1))))


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    n_test = 360
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def layer_type(p: torch.Tensor) -> str:
    return "conv" if p.ndim >= 3 else "linear_lstm" if p.ndim == 2 else "other"


def dense_bytes_by_type(model: nn.Module) -> dict[str, int]:
    out = {t: 0 for t in LAYER_TYPES}
    for p in model.parameters():
        out[layer_type(p)] += 4 * p.numel()
    return out


def powersgd_bytes_by_type(model: nn.Module, rank: int, min_compression_rate: float = 2.0) -> dict[str, int]:
    """Per-step payload of PowerSGD after warm-up (mirrors ``_should_compress``)."""
    out = {t: 0 for t in LAYER_TYPES}
    for p in model.parameters():
        n = p.shape[0]
        m = p.numel() // n
        r = min(n, m, rank)
        if (n + m) * r * min_compression_rate < n * m:
            out[layer_type(p)] += 4 * (n + m) * r
        else:
            out[layer_type(p)] += 4 * p.numel()
    return out


# --------------------------------------------------------------------------
# exchange set-up and byte accounting
# --------------------------------------------------------------------------


def _serialized_powersgd_hook(state, bucket):  # no annotations: DDP checks them literally
    """``powerSGD_hook``, waited on before returning.

    PowerSGD issues its second all-reduce (the Q factors) from a future
    callback on a gloo thread, which can interleave with the next bucket's
    first all-reduce differently on each rank; with gloo that is a collective
    mismatch (observed here as ``Received data size doesn't match expected
    size`` on the multi-bucket LSTM). Waiting serializes the buckets, exactly
    like the (blocking) AdaComp hook, so wall times stay comparable.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

    result = psgd.powerSGD_hook(state, bucket).wait()
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(result)
    return fut


class Exchange:
    """Registers one gradient-exchange method on a DDP model and counts its bytes."""

    def __init__(self, method: str, ddp: DDP, steps: int, powersgd_rank: int) -> None:
        self.method = method
        self.module = ddp.module
        self.dense = dense_bytes_by_type(self.module)
        self.per_step: list[dict[str, int]] = []
        self.state: Any = None
        self.warmup = 0
        if method == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

            self.warmup = max(2, steps // 10)
            self.state = psgd.PowerSGDState(
                process_group=None,
                matrix_approximation_rank=powersgd_rank,
                start_powerSGD_iter=self.warmup,
                use_error_feedback=True,
                warm_start=True,
            )
            self.compressed = powersgd_bytes_by_type(self.module, powersgd_rank)
            ddp.register_comm_hook(self.state, _serialized_powersgd_hook)
        elif method == "adacomp":
            from ncz.models.adacomp import AdaCompConfig, register_adacomp

            self.state = register_adacomp(ddp, AdaCompConfig())
            self.warmup = self.state.config.warmup_steps
        elif method != "plain":
            raise ValueError(method)

    def after_step(self, step: int) -> None:
        if self.method == "adacomp":
            rec = self.state.history[-1]
            assert rec.step == step, (rec.step, step)
            self.per_step.append({t: b.wire_bytes for t, b in rec.by_type.items()})
        elif self.method == "powersgd" and step >= self.warmup:
            self.per_step.append(dict(self.compressed))
        else:
            self.per_step.append(dict(self.dense))

    def summary(self) -> dict[str, Any]:
        steps = len(self.per_step)
        comp = self.per_step[self.warmup :]
        rate, eff = {}, {}
        for t in LAYER_TYPES:
            if self.dense[t] == 0:
                rate[t] = eff[t] = None
                continue
            sent_c = sum(s[t] for s in comp)
            sent_all = sum(s[t] for s in self.per_step)
            rate[t] = self.dense[t] * len(comp) / sent_c if sent_c else None
            eff[t] = self.dense[t] * steps / sent_all if sent_all else None
        dense_total = sum(self.dense.values())
        comp_total = sum(sum(s.values()) for s in comp)
        all_total = sum(sum(s.values()) for s in self.per_step)
        rate["total"] = dense_total * len(comp) / comp_total if comp_total else None
        eff["total"] = dense_total * steps / all_total if all_total else None
        out: dict[str, Any] = {
            "compression_rate": rate,
            "effective_compression_rate": eff,
            "bytes_sent": all_total,
            "bytes_sent_by_type": {t: sum(s[t] for s in self.per_step) for t in LAYER_TYPES},
            "dense_bytes_per_step": self.dense,
            "warmup_steps": self.warmup,
        }
        if self.method == "adacomp":
            out["gathered_bytes"] = self.state.gathered_bytes + self.state.warmup_bytes
            out["residue_resets"] = self.state.residue_resets
            out["elements_sent"] = {t: b.sent for t, b in self.state.totals.items()}
        if self.method == "powersgd":
            # cross-check of the analytic count against PowerSGD's own counters
            _, before, after = self.state.compression_stats()
            out["powersgd_numel_after_compression"] = after
            out["powersgd_numel_before_compression"] = before
        return out


# --------------------------------------------------------------------------
# training loops (run inside each worker)
# --------------------------------------------------------------------------


def run_lstm(rank: int, method: str, args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = LSTMLM(data["vocab"])
    ddp = DDP(model, find_unused_parameters=False)
    ex = Exchange(method, ddp, args.lstm_steps, args.powersgd_rank)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lstm_lr)
    train = data["train"][:, rank * args.lstm_batch : (rank + 1) * args.lstm_batch]
    bptt = args.bptt
    n_chunks = (train.shape[0] - 1) // bptt
    h = None
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(args.lstm_steps):
        c = step % n_chunks
        if c == 0:
            h = None
        x = train[c * bptt : (c + 1) * bptt]
        y = train[c * bptt + 1 : (c + 1) * bptt + 1]
        if h is not None:
            h = (h[0].detach(), h[1].detach())
        out, h = ddp(x, h)
        loss = F.cross_entropy(out.view(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=False)
        loss.backward()
        ex.after_step(step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.lstm_clip)
        opt.step()
        losses.append(loss.item())
    wall = time.perf_counter() - t0

    # validation perplexity: each rank evaluates half of the validation streams
    t1 = time.perf_counter()
    valid = data["valid"]
    cols = valid.shape[1] // WORLD
    v = valid[:, rank * cols : (rank + 1) * cols]
    nll = torch.zeros(2, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        h = None
        for i in range(0, v.shape[0] - 1, bptt):
            x = v[i : min(i + bptt, v.shape[0] - 1)]
            y = v[i + 1 : i + 1 + x.shape[0]]
            out, h = model(x, h)
            nll[0] += F.cross_entropy(out.view(-1, out.shape[-1]), y.reshape(-1), reduction="sum").double()
            nll[1] += y.numel()
    dist.all_reduce(nll)
    ppl = math.exp(float(nll[0] / nll[1]))
    return {"losses": losses, "final_metric": ppl, "metric_name": "val_perplexity", "wall_s": wall,
            "eval_s": time.perf_counter() - t1, "exchange": ex}


def run_cnn(rank: int, method: str, args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = SmallCNN()
    ddp = DDP(model)
    ex = Exchange(method, ddp, args.cnn_steps, args.powersgd_rank)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.cnn_lr, momentum=0.0)
    xtr, ytr = data["xtr"][rank::WORLD], data["ytr"][rank::WORLD]
    gen = torch.Generator().manual_seed(args.seed * 100 + rank)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(args.cnn_steps):
        i = torch.randint(0, xtr.shape[0], (args.cnn_batch,), generator=gen)
        loss = F.cross_entropy(ddp(xtr[i]), ytr[i])
        opt.zero_grad(set_to_none=False)
        loss.backward()
        ex.after_step(step)
        opt.step()
        losses.append(loss.item())
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    model.eval()
    with torch.no_grad():
        acc = (model(data["xte"]).argmax(1) == data["yte"]).float().mean().item()
    return {"losses": losses, "final_metric": acc, "metric_name": "test_accuracy", "wall_s": wall,
            "eval_s": time.perf_counter() - t1, "exchange": ex}


def worker(rank: int, model_name: str, methods: list[str], args: argparse.Namespace, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        if model_name == "lstm":
            train, valid, vocab = load_ptb(args.lstm_train_tokens, args.lstm_valid_tokens)
            data = {
                "train": batchify(train, WORLD * args.lstm_batch),
                "valid": batchify(valid, WORLD * args.eval_streams),
                "vocab": vocab,
            }
            fn = run_lstm
        else:
            xtr, ytr, xte, yte = load_digits_split()
            data = {"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte}
            fn = run_cnn
        runs = []
        for method in methods:
            dist.barrier()
            r = fn(rank, method, args, data)
            ex: Exchange = r.pop("exchange")
            # average the per-rank training loss curves
            lt = torch.tensor(r["losses"], dtype=torch.float64)
            dist.all_reduce(lt)
            wall = torch.tensor([r["wall_s"]], dtype=torch.float64)
            dist.all_reduce(wall, op=dist.ReduceOp.MAX)
            runs.append({
                "method": method,
                "model": model_name,
                **ex.summary(),
                "final_metric": r["final_metric"],
                "metric_name": r["metric_name"],
                "wall_s": float(wall),
                "eval_s": r["eval_s"],
                "steps": len(r["losses"]),
                "loss_curve": (lt / WORLD).tolist(),
                "bytes_per_step": ex.per_step,
            })
        if rank == 0:
            Path(out).write_text(json.dumps(runs))
        dist.barrier()  # leave together: tearing gloo down while the peer still runs can abort it
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------


def smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in runs}, key=lambda m: ["lstm", "cnn"].index(m))
    fig, axes = plt.subplots(2, len(models), figsize=(6.5 * len(models), 9.5), squeeze=False)
    styles = {"conv": "-", "linear_lstm": "--", "other": ":"}
    colors = {"plain": "tab:gray", "powersgd": "tab:blue", "adacomp": "tab:red"}
    for j, m in enumerate(models):
        ax = axes[0][j]
        for r in (r for r in runs if r["model"] == m):
            k = max(1, len(r["loss_curve"]) // 40)
            ax.plot(smooth(r["loss_curve"], k), color=colors[r["method"]],
                    label=f"{r['method']} ({r['metric_name']}={r['final_metric']:.4g})")
        ax.set_title(f"{m}: training loss (moving avg)")
        ax.set_xlabel("step")
        ax.legend(loc="upper right")
        ax = axes[1][j]
        for r in (r for r in runs if r["model"] == m):
            for t in LAYER_TYPES:
                ys = [s[t] for s in r["bytes_per_step"]]
                if any(ys):
                    ax.plot(ys, styles[t], color=colors[r["method"]], label=f"{r['method']} / {t}")
        ax.set_yscale("log")
        ax.set_title(f"{m}: bytes sent per step per worker, by layer type")
        ax.set_xlabel("step")
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model: metric degradation vs plain DDP, bytes vs PowerSGD, issue targets.

    ``degradation`` is relative and positive when worse than plain DDP
    (perplexity: (m - plain) / plain; accuracy: (plain - m) / plain).
    """
    out: dict[str, Any] = {}
    for model in sorted({r["model"] for r in runs}):
        by = {r["method"]: r for r in runs if r["model"] == model}
        entry: dict[str, Any] = {}
        plain = by.get("plain")
        for method, r in by.items():
            e: dict[str, Any] = {"final_metric": r["final_metric"], "bytes_sent": r["bytes_sent"]}
            if plain is not None:
                pm, m = plain["final_metric"], r["final_metric"]
                e["degradation_vs_plain"] = (m - pm) / pm if r["metric_name"] == "val_perplexity" else (pm - m) / pm
            if "powersgd" in by and method != "powersgd":
                e["bytes_ratio_vs_powersgd"] = r["bytes_sent"] / by["powersgd"]["bytes_sent"]
            entry[method] = e
        if "adacomp" in by:
            rate = by["adacomp"]["compression_rate"]
            targets: dict[str, Any] = {}
            if rate.get("linear_lstm") is not None:
                targets["linear_lstm_rate_ge_200"] = rate["linear_lstm"] >= 200
            if rate.get("conv") is not None:
                targets["conv_rate_ge_40"] = rate["conv"] >= 40
            if "degradation_vs_plain" in entry["adacomp"]:
                targets["metric_within_1pct_of_plain"] = entry["adacomp"]["degradation_vs_plain"] <= 0.01
            if "powersgd" in by:
                targets["fewer_bytes_than_powersgd"] = by["adacomp"]["bytes_sent"] < by["powersgd"]["bytes_sent"]
                targets["metric_at_least_powersgd"] = (
                    entry["adacomp"].get("degradation_vs_plain", 0) <= entry["powersgd"].get("degradation_vs_plain", 0)
                )
            entry["adacomp_targets"] = targets
        out[model] = entry
    return out


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adacomp.json").write_text(json.dumps(result, indent=1))
    try:
        plot(result["runs"], out_dir / "adacomp.png")
    except ImportError:
        print("matplotlib missing (pip install matplotlib); no plot written", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short smoke run (~1-2 min)")
    p.add_argument("--models", default="lstm,cnn")
    p.add_argument("--methods", default="plain,powersgd,adacomp")
    p.add_argument("--lstm-steps", type=int, default=None)
    p.add_argument("--cnn-steps", type=int, default=None)
    p.add_argument("--lstm-train-tokens", type=int, default=None, help="prefix of the training corpus")
    p.add_argument("--lstm-valid-tokens", type=int, default=None, help="prefix of the validation corpus")
    p.add_argument("--lstm-batch", type=int, default=20, help="streams per worker")
    p.add_argument("--eval-streams", type=int, default=10, help="validation streams per worker")
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--lstm-lr", type=float, default=20.0)
    p.add_argument("--lstm-clip", type=float, default=0.25)
    p.add_argument("--cnn-lr", type=float, default=0.1)
    p.add_argument("--cnn-batch", type=int, default=32)
    p.add_argument("--powersgd-rank", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--from-json", type=Path, default=None,
                   help="re-summarize and re-plot an existing result JSON without training")
    args = p.parse_args(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        result["summary"] = summarize(result["runs"])
        write_outputs(result, args.out_dir)
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
        return 0
    if args.lstm_steps is None:
        args.lstm_steps = 50 if args.quick else 600
    if args.cnn_steps is None:
        args.cnn_steps = 200 if args.quick else 600
    if args.quick:
        args.lstm_train_tokens = args.lstm_train_tokens or 200_000
        args.lstm_valid_tokens = args.lstm_valid_tokens or 20_000

    methods = args.methods.split(",")
    all_runs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for model_name in args.models.split(","):
        if model_name == "cnn":
            try:
                import sklearn  # noqa: F401
            except ImportError:
                print("scikit-learn missing (pip install scikit-learn); skipping cnn", file=sys.stderr)
                continue
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "runs.json")
            mp.spawn(worker, args=(model_name, methods, args, free_port(), out), nprocs=WORLD, join=True)
            all_runs.extend(json.loads(Path(out).read_text()))

    result = {
        "benchmark": "adacomp",
        "world_size": WORLD,
        "backend": "gloo",
        "device": "cpu",
        "torch": torch.__version__,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "total_wall_s": time.perf_counter() - t0,
        "summary": summarize(all_runs),
        "runs": all_runs,
    }
    write_outputs(result, args.out_dir)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
