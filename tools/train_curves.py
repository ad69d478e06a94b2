"""Training curves of a codec run as a PNG, from its ``train_log.jsonl``.

    python -m ncz.tools.train_curves runs/ctx/train_log.jsonl -o runs/ctx/curves.png [--since STEP]

Three panels over the training step:

1. the training loss (λ·255²·MSE + bpp, mean of each logged window, and its running median) with
   the learning rate on a log axis beside it;
2. per quality level, the evaluation's rate-distortion objective λ·255²·MSE + bpp of the shipped
   (moving-average) weights, as a change in % from the first evaluation shown: the one number per
   level that falls when the model gets better at its own trade-off;
3. per level, the evaluation's (bpp, PSNR) at the first and the last evaluation shown, joined, so a
   level that trades rate for PSNR shows.

Levels are matched by their λ, not their index, so a run grown with ``--add-lambdas`` in the same
folder keeps comparing each trade-off with itself.

``train_codec`` rewrites ``<out>/curves.png`` after every evaluation when matplotlib is installed
(the ``bench`` extra). Reading is tolerant: lines that are not JSON objects (a run killed mid-write)
are skipped.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["read_log", "plot_curves", "main"]


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``train_log.jsonl`` (non-object or truncated lines skipped)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


def _objective(level: dict[str, Any]) -> float:
    """λ·255²·MSE + bpp of one evaluated level (MSE recovered from the 8-bit PSNR)."""
    mse = 10 ** (-level["psnr"] / 10)
    return level["lam"] * 255.0 ** 2 * mse + level["bpp"]


def _running_median(values: list[float], width: int) -> list[float]:
    out = []
    for i in range(len(values)):
        window = sorted(values[max(0, i - width + 1):i + 1])
        out.append(window[len(window) // 2])
    return out


def plot_curves(records: list[dict[str, Any]], output: str | Path, since: int = 0, title: str = "") -> Path:
    """Write the three-panel PNG of ``records`` (from :func:`read_log`) to ``output``; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records
             if r.get("event") == "train" and r["step"] >= since and math.isfinite(r.get("loss", math.nan))]
    evals = [r for r in records if r.get("event") == "eval" and r["step"] >= since and r.get("levels")]
    fig, (ax_loss, ax_obj, ax_rd) = plt.subplots(1, 3, figsize=(17, 4.8))
    if train:
        steps = [r["step"] for r in train]
        loss = [r["loss"] for r in train]
        window = train[-1].get("steps", "")
        ax_loss.plot(steps, loss, color="0.75", linewidth=0.6, label=f"loss ({window}-step mean)")
        ax_loss.plot(steps, _running_median(loss, 40), color="C0", label="running median (40 windows)")
        ordered = sorted(loss)
        ax_loss.set_ylim(ordered[int(0.01 * (len(loss) - 1))] * 0.95, ordered[int(0.99 * (len(loss) - 1))] * 1.05)
        ax_lr = ax_loss.twinx()
        ax_lr.plot(steps, [r.get("lr", math.nan) for r in train], color="C3", linewidth=1, label="learning rate")
        ax_lr.set_yscale("log")
        ax_lr.set_ylabel("learning rate", color="C3")
        handles = ax_loss.get_legend_handles_labels()
        more = ax_lr.get_legend_handles_labels()
        ax_lr.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left", fontsize=8)  # above both
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (λ·255²·MSE + bpp)")
    if evals:
        first: dict[float, float] = {}
        for r in evals:  # each λ's first evaluation (levels added later start where they appear)
            for lv in r["levels"]:
                first.setdefault(lv["lam"], _objective(lv))
        lams = sorted(first)
        cmap = plt.get_cmap("viridis")
        for i, lam in enumerate(lams):
            color = cmap(i / max(1, len(lams) - 1))
            pts = [(r["step"], _objective(lv)) for r in evals for lv in r["levels"] if lv["lam"] == lam]
            ax_obj.plot([s for s, _ in pts], [100 * (v / first[lam] - 1) for _, v in pts], marker=".",
                        color=color, label=f"λ {lam:.4g}")
            rd = [(lv["bpp"], lv["psnr"]) for r in (evals[0], evals[-1]) for lv in r["levels"] if lv["lam"] == lam]
            ax_rd.plot([b for b, _ in rd], [p for _, p in rd], color=color, linewidth=0.8)
            ax_rd.plot(*rd[0], marker="o", markersize=4, markerfacecolor="none", color=color)
            ax_rd.plot(*rd[-1], marker="o", markersize=4, color=color)
        ax_obj.axhline(0, color="0.6", linewidth=0.6)
        ax_obj.legend(fontsize=7, ncol=2)
        ax_rd.plot([], [], color="0.3", marker="o", markersize=4, markerfacecolor="none", linestyle="none",
                   label=f"step {evals[0]['step']:,}")
        ax_rd.plot([], [], color="0.3", marker="o", markersize=4, linestyle="none", label=f"step {evals[-1]['step']:,}")
        ax_rd.legend(fontsize=8, loc="lower right")
    ax_obj.set_xlabel("step")
    ax_obj.set_ylabel("eval objective λ·255²·MSE + bpp, % vs first shown")
    ax_rd.set_xlabel("eval bpp (estimated)")
    ax_rd.set_ylabel("eval PSNR (dB)")
    ax_rd.grid(alpha=0.3)
    fig.suptitle(title or "codec training")
    output = Path(output)
    tmp = output.with_name(output.name + ".tmp.png")
    try:
        fig.tight_layout()
        output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=110)
        tmp.replace(output)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return output


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ncz.tools.train_curves",
                                 description="Plot a codec training run's train_log.jsonl as a PNG.")
    ap.add_argument("log", type=Path, help="train_log.jsonl of a run")
    ap.add_argument("-o", "--output", type=Path, default=None, help="PNG (default: curves.png beside the log)")
    ap.add_argument("--since", type=int, default=0, help="first step shown")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    try:
        records = read_log(args.log)
    except OSError as exc:
        print(f"train_curves: {args.log}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if not records:
        print(f"train_curves: {args.log}: no training records", file=sys.stderr)
        return 1
    try:
        out = plot_curves(records, args.output or args.log.with_name("curves.png"), args.since, args.title)
    except ImportError:
        print("train_curves: needs matplotlib (pip install -e '.[bench]')", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
