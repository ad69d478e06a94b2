"""Seconds per step of bench/nlu.py's two training phases, to size a whole run without running it.

Times 20 fine-tuning steps (AdamW on the whole classifier) and ~24 task-aware QAT steps (PQ
embedding, QuantAware rounding of the task-aware recipe, hidden-state distillation) on CLINC150
batches of 32, after a short warm-up, at ``--threads`` torch threads. Run it on idle cores: the
numbers are wall seconds. Usage::

    OMP_WAIT_POLICY=PASSIVE python bench/nlu_step_time.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nlu
import nlu_task

from ncz.models import QuantAware, finetune_codebooks, product_quantize


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/nlu/clinc150")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = nlu.parse_args(["--data", args.data, "--threads", str(args.threads)])
    data = nlu_task.read_dataset(settings.data)
    bert, tokenizer = nlu_task.minilm()
    train = nlu_task.Tokenized(tokenizer, *data.splits["train"], settings.max_length)
    model = nlu_task.IntentClassifier(copy.deepcopy(bert), len(data.labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    batches = train.epoch(settings.batch, settings.seed)
    model.train()
    for i in range(25):  # 5 warm-up steps, then 20 timed
        if i == 5:
            start = time.perf_counter()
        loss = nlu_task.loss_fn(model, train.batch(batches[i]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    finetune_s = (time.perf_counter() - start) / 20
    teacher, student = copy.deepcopy(model).eval(), copy.deepcopy(model)
    rounding = QuantAware(student, nlu.rest_recipe(settings), refresh_every=settings.refresh_every)
    books, _ = product_quantize(model.bert.embeddings.word_embeddings.weight.detach(), subspaces=settings.subspaces,
                                centroids=settings.centroids, iterations=2)
    task_loss = nlu_task.distilled_loss(None, 0.0, settings.distill_temperature, teacher, settings.distill_hidden)
    stamps: list[float] = []

    def loss_fn(m, batch):
        rounding.step()
        stamps.append(time.perf_counter())
        return task_loss(m, batch)

    finetune_codebooks(student, nlu.WORD_EMBEDDING, loss_fn, train.stream(settings.batch, settings.seed + 1000),
                       steps=30, lr=settings.pq_lr, rest_lr=settings.qat_lr, codebooks=books)
    qat_s = (stamps[-1] - stamps[5]) / (len(stamps) - 6)
    result = {"threads": args.threads, "finetune_s_per_step": round(finetune_s, 3), "qat_s_per_step": round(qat_s, 3)}
    print(result)
    return result


if __name__ == "__main__":
    main()
