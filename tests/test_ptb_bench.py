"""bench/ptb.py: corpus and vocabulary, resumable training, and every compression group on a tiny LSTM.

A synthetic corpus is written in the test (no ../shared needed); the real PTB counts are checked
only where ../shared/data/text/ptb exists.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from conftest import shared_data

from ncz.models import describe, load_state_dict

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_ptb", REPO / "bench" / "ptb.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_ptb"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _corpus(root: Path, words: int = 60, lines: tuple[int, int, int] = (300, 30, 30)) -> Path:
    """Lines walking a fixed word cycle (learnable), PTB style: leading space, ``<unk>`` for rare words."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(words)] + ["<unk>"]
    root.mkdir(parents=True, exist_ok=True)
    for split, count in zip(("train", "valid", "test"), lines):
        rows = []
        for _ in range(count):
            k = rng.randrange(words)
            rows.append(" " + " ".join(vocab[(k + 3 * j) % len(vocab)] for j in range(rng.randint(3, 8))) + " ")
        (root / f"ptb.{split}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def test_corpus_vocabulary_and_batches(tmp_path):
    ptb = _bench()
    root = tmp_path / "c"
    root.mkdir()
    (root / "ptb.train.txt").write_text(" b a b \n c <unk> b a \n", encoding="utf-8")
    (root / "ptb.valid.txt").write_text(" a b \n", encoding="utf-8")
    (root / "ptb.test.txt").write_text(" zz a \n", encoding="utf-8")  # zz: never in training → <unk>
    corpus = ptb.Corpus.read(root)
    # by frequency, ties by spelling; every line closed by <eos>
    assert corpus.vocab == ["b", "<eos>", "a", "<unk>", "c"]
    words = [corpus.vocab[i] for i in corpus.splits["train"]]
    assert words == ["b", "a", "b", "<eos>", "c", "<unk>", "b", "a", "<eos>"]
    assert [corpus.vocab[i] for i in corpus.splits["test"]] == ["<unk>", "a", "<eos>"]
    columns = ptb.batchify(torch.arange(11), 2)
    assert columns.shape == (5, 2) and columns[:, 0].tolist() == [0, 1, 2, 3, 4] and columns[0, 1] == 5
    (root / "ptb.train.txt").write_text(" a b \n", encoding="utf-8")  # no <unk> to map zz to
    with pytest.raises(SystemExit, match="outside the training vocabulary"):
        ptb.Corpus.read(root)


def test_real_ptb_counts():
    ptb = _bench()
    corpus = ptb.Corpus.read(shared_data("text", "ptb"))
    assert len(corpus.vocab) == 10000
    assert {k: v.numel() for k, v in corpus.splits.items()} == {"train": 929589, "valid": 73760, "test": 82430}


def _config(ptb, **changes):
    return ptb.TrainConfig(**{"size": 8, "batch": 3, "bptt": 5, "epochs": 2, "decay_from": 1, "save_every": 1000,
                              **changes})


def test_resume_gives_the_uninterrupted_state(tmp_path):
    ptb = _bench()
    corpus = ptb.Corpus.read(_corpus(tmp_path / "c", lines=(40, 6, 6)))
    cfg = _config(ptb)
    straight, record = ptb.train(corpus, cfg, tmp_path / "straight", progress=False)
    batches = record["done"] // cfg.epochs
    # killed mid-epoch (carried hidden state, dropout RNG), then once more after the first epoch
    for stop in (batches // 2, batches + 3):
        ptb.train(corpus, cfg, tmp_path / "resumed", stop_after=stop, progress=False)
    resumed, again = ptb.train(corpus, cfg, tmp_path / "resumed", progress=False)
    assert again["done"] == record["done"]
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in again["history"]] == \
        [{k: v for k, v in h.items() if k != "seconds"} for h in record["history"]]
    saved = torch.load(tmp_path / "resumed" / "train.pt", weights_only=False)
    assert saved["lr"] == cfg.lr * cfg.decay**2  # decayed after each epoch from decay_from on
    # fewer epochs on resume: nothing more is trained, the best weights so far come back
    shorter, again = ptb.train(corpus, _config(ptb, epochs=1), tmp_path / "straight", progress=False)
    assert again["done"] == record["done"] and all(torch.equal(v, straight.state_dict()[k])
                                                   for k, v in shorter.state_dict().items())
    with pytest.raises(SystemExit, match="use another --work"):
        ptb.train(corpus, _config(ptb, size=12), tmp_path / "resumed", progress=False)


def test_every_group_writes_archives_that_round_trip(tmp_path):
    """Train a tiny model through main(), run every compression group, check each archive decodes to
    the model's tensors and holds the representation its row names; then the page section."""
    ptb = _bench()
    data = _corpus(tmp_path / "c")
    work = tmp_path / "work"
    out = tmp_path / "ptb.json"
    page = tmp_path / "RESULTS.md"
    page.write_text("# results\n\n<!-- nlu: generated by bench/nlu.py -->\nkept\n<!-- /nlu -->\n", encoding="utf-8")
    argv = ["--data", str(data), "--work", str(work), "--out", str(out), "--markdown", str(page),
            "--size", "32", "--epochs", "1", "--batch", "4", "--nncodec-qps", "--quant-scales", "1", "2",
            "--lowrank-ratios", "2", "--dictionary-bits", "3", "--dictionary-atoms", "16", "--finetune-steps", "4",
            "--finetune-ratios", "2", "--finetune-dictionary-bits", "3"]
    result = ptb.main(argv)
    rows = {r["name"]: r for r in result["variants"]}
    shapes = {k: tuple(v.shape) for k, v in torch.load(work / "train.pt", weights_only=False)["best"].items()}
    assert rows["safetensors fp32"]["metric"] == result["test_ppl"] == rows["ncz lossless"]["metric"]
    kinds = {"low-rank": "low_rank", "dictionary": "dictionary", "quantization": "quantized"}
    archives = [r for r in result["variants"] if (r.get("archive") or "").endswith(".ncz")]
    assert len(archives) >= 12
    for row in archives:
        state = load_state_dict(row["archive"])
        assert {k: tuple(v.shape) for k, v in state.items()} == shapes, row["name"]
        assert row["bytes"] == Path(row["archive"]).stat().st_size and row["metric_name"] == "perplexity"
        if "method" in row and row["method"] in kinds:
            used = {t.representation for t in describe(row["archive"])}
            assert kinds[row["method"]] in used, row["name"]
    assert rows["ncz low-rank (BSR) ×2 + quantization, stable-rank fine-tuned"]["finetune_steps"] == 4
    found = [r for r in result["variants"] if r["name"].startswith("ncz pack_for_metric")]
    assert len(found) == 2 and all(r["curve"] and r["valid_metric"] <= 1.02 * r["valid_baseline"] + 1e-3
                                   for r in found)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    # the plot needs matplotlib, a bench extra that the test install (.[test]) does not have
    assert out.with_suffix(".png").exists() == (importlib.util.find_spec("matplotlib") is not None)
    text = page.read_text(encoding="utf-8")
    assert text.count("<!-- ptb: generated by bench/ptb.py -->") == 1 and "kept" in text
    # a rerun with everything cached measures nothing new and rewrites the section in place
    again = ptb.main(argv)
    # (rows of tools not installed, e.g. gguf without the bench extras, carry an error and measure nothing)
    assert all(r.get("reused") or "error" in r for r in again["variants"])
    assert page.read_text(encoding="utf-8").count("<!-- /ptb -->") == 1
