"""bench/nlu.py: both data layouts, and the whole path (fine-tune, every variant, JSON, plot) on a tiny model.

The tiny path uses a 1-layer BERT with a generated word-piece vocabulary, so it needs
``transformers`` but neither the MiniLM weights nor ../shared. ``QuantAware`` is checked
against the packer: what the forward used is what the archive holds.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_bench

SHARED = REPO.parent / "shared" / "data" / "nlu"

WORDS = {"weather": ["rain", "sun", "cold", "forecast"], "music": ["play", "song", "album", "band"],
         "alarm": ["wake", "alarm", "morning", "clock"]}


def _queries(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        intent = sorted(WORDS)[i % len(WORDS)]
        rows.append((" ".join(rng.choice(WORDS[intent]) for _ in range(rng.randint(2, 5))) + " please", intent))
    return rows


def _write_folders(root: Path, dev_name: str = "dev") -> Path:
    for split, count, seed in (("train", 60, 0), (dev_name, 9, 1), ("test", 12, 2)):
        folder = root / split
        folder.mkdir(parents=True)
        rows = _queries(count, seed)
        if split == "test":
            rows.append(("play the forecast", "unseen_intent"))  # ATIS has test labels never trained on
        (folder / "seq.in").write_text("".join(f"{t}\n" for t, _ in rows), encoding="utf-8")
        (folder / "label").write_text("".join(f"{lab}\n" for _, lab in rows), encoding="utf-8")
    return root


def _write_clinc(root: Path) -> Path:
    root.mkdir(parents=True)
    data = {"train": [list(r) for r in _queries(60, 0)], "val": [list(r) for r in _queries(9, 1)],
            "test": [list(r) for r in _queries(12, 2)], "oos_train": [["what is love", "oos"]],
            "oos_val": [], "oos_test": [["blah", "oos"]]}
    (root / "data_full.json").write_text(json.dumps(data), encoding="utf-8")
    return root


def test_read_folder_layout(tmp_path):
    nlu = load_bench("nlu")
    data = nlu.read_dataset(_write_folders(tmp_path / "tiny", dev_name="valid"))
    assert data.layout == "seq.in/label" and data.labels == sorted(WORDS)
    assert [len(data.splits[s][0]) for s in ("train", "valid", "test")] == [60, 9, 13]
    assert data.splits["test"][1][-1] == -1  # unseen label: always wrong, never dropped
    texts, labels = data.splits["train"]
    assert texts[0] == _queries(1, 0)[0][0] and data.labels[labels[0]] == _queries(1, 0)[0][1]


def test_read_clinc_layout(tmp_path):
    nlu = load_bench("nlu")
    root = _write_clinc(tmp_path / "clinc")
    for path in (root, root / "data_full.json"):
        data = nlu.read_dataset(path)
        assert data.layout == "clinc150" and data.labels == sorted(WORDS)  # out-of-scope left out
        assert [len(data.splits[s][0]) for s in ("train", "valid", "test")] == [60, 9, 12]


def test_missing_split_is_a_clear_error(tmp_path):
    nlu = load_bench("nlu")
    (tmp_path / "train").mkdir()
    with pytest.raises(SystemExit, match="no train/seq.in"):
        nlu.read_dataset(tmp_path)


def _tiny_encoder(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    words = sorted({w for ws in WORDS.values() for w in ws} | {"please", "the", "what", "is", "love", "blah"})
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n", encoding="utf-8")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    config = transformers.BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    bert = transformers.BertModel(config, add_pooling_layer=False)
    return lambda: (bert, tokenizer)


@pytest.mark.parametrize("layout", ["folders", "clinc"])
def test_tiny_end_to_end(tmp_path, layout):
    nlu = load_bench("nlu")
    factory = _tiny_encoder(tmp_path)
    data = _write_folders(tmp_path / "tiny") if layout == "folders" else _write_clinc(tmp_path / "clinc")
    out = tmp_path / "nlu.json"
    args = nlu.parse_args(["--data", str(data), "--out", str(out), "--runs", str(tmp_path / "runs"),
                           "--epochs", "2", "--batch", "8", "--lr", "1e-3", "--nncodec-qps", "--subspaces", "4",
                           "--centroids", "8", "--kmeans-iterations", "3", "--qat-steps", "6",
                           "--refresh-every", "2", "--presets", "lossless", "q8", "--threads", "1",
                           *(["--distill-hidden", "0"] if layout == "folders" else [])])  # clinc: the default
    result = nlu.run(args, encoder_factory=factory)
    assert result["task_aware"]["distill_hidden"] == (1.0 if layout == "clinc" else 0.0)
    # position, token type, 3 LayerNorms, q, k, v, attention out, intermediate, output, head
    assert result["task_aware"]["quantized_tensors"] == 12
    assert not list((tmp_path / "runs").rglob("*.state.pt"))  # the QAT checkpoint goes once it is done
    saved = json.loads(out.read_text())
    assert saved["uncompressed_accuracy"] == result["uncompressed_accuracy"]
    names = [row["name"] for row in saved["variants"]]
    assert names[:2] == ["safetensors fp32", "safetensors + zstd -19"]
    assert any(name.startswith("ncz low-rank (BSR)") for name in names)
    assert {"ncz lossless", "ncz q8", "ncz task-aware (PQ + QAT)",
            "ncz post-training (task-aware recipe)"} <= set(names)
    keys = {"name", "bytes", "bits_per_weight", "metric_name", "metric", "pack_s", "unpack_s", "archive"}
    for row in saved["variants"]:
        if "error" not in row:
            assert keys <= set(row) and row["metric_name"] == "accuracy" and 0 <= row["metric"] <= 100
    by_name = {row["name"]: row for row in saved["variants"]}
    assert by_name["ncz lossless"]["metric"] == saved["uncompressed_accuracy"]  # lossless means lossless
    assert (REPO / by_name["ncz task-aware (PQ + QAT)"]["archive"]).exists() or \
        Path(by_name["ncz task-aware (PQ + QAT)"]["archive"]).exists()
    assert out.with_suffix(".png").exists() or importlib.util.find_spec("matplotlib") is None
    page = tmp_path / "RESULTS.md"
    page.write_text("# Other results\n\nkept\n")
    for _ in range(2):  # the section is replaced, not appended again; the rest of the page stays
        nlu.write_markdown(page, nlu.markdown([(out, saved)]))
    text = page.read_text()
    assert text.startswith("# Other results") and text.count("## NLU: intent classifier") == 1
    assert f"| ncz q8 | {by_name['ncz q8']['bytes']:,} |" in text
    # a second run resumes: fine-tuning and the task-aware phase are not redone, the numbers agree
    again = nlu.run(args, encoder_factory=factory)
    assert again["uncompressed_accuracy"] == result["uncompressed_accuracy"]
    assert again["variants"][-1]["metric"] == result["variants"][-1]["metric"]


def test_hidden_distillation_measures_every_layer(tmp_path):
    """The hidden term is zero for the teacher itself and grows when one layer's weights change."""
    nlu = load_bench("nlu")
    bert, _ = _tiny_encoder(tmp_path)()
    teacher = nlu.IntentClassifier(bert, 3).eval()
    student = copy.deepcopy(teacher).eval()
    ids = torch.tensor([[2, 7, 8, 3, 0], [2, 9, 3, 0, 0]])
    batch = (ids, (ids > 0).long(), torch.tensor([0, 1]), torch.tensor([0, 1]))
    ce = float(nlu.distilled_loss(None, 0.0, 1.0)(student, batch).detach())
    same = float(nlu.distilled_loss(None, 0.0, 1.0, teacher, hidden=1.0)(student, batch).detach())
    assert same == pytest.approx(ce, abs=1e-6)
    with torch.no_grad():
        student.bert.encoder.layer[0].output.dense.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    moved = nlu.distilled_loss(None, 0.0, 1.0, teacher, hidden=1.0)(student, batch)
    assert float(moved.detach()) > float(nlu.distilled_loss(None, 0.0, 1.0)(student, batch).detach()) + 1e-3
    with pytest.raises(ValueError):
        nlu.distilled_loss(None, 0.0, 1.0, hidden=1.0)


def test_quant_aware_rounds_as_the_packer(tmp_path):
    from ncz.models import QuantAware, Recipe, load_state_dict, pack

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 80))
    recipe = Recipe.from_dict({"rule": [
        {"pattern": "0.weight", "representation": "quantized", "bits": 1.5, "granularity": "rowcol"},
        {"pattern": "2.weight", "representation": "quantized", "rel_error": 0.2, "granularity": "channel"},
        {"pattern": "*", "representation": "lossless"}]})
    rounding = QuantAware(model, recipe, refresh_every=3)
    assert rounding.names == ["0.weight", "2.weight"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(7):  # the latent weights move and the steps follow them
        loss = model(torch.randn(16, 64)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        assert model[0].parametrizations.weight.original.grad is not None  # straight through
        optimizer.step()
        rounding.step()
    rounding.refresh()
    seen = {name: model.get_submodule(name[:-7]).weight.detach().clone() for name in rounding.names}
    rounding.detach()
    assert not hasattr(model[0], "parametrizations")
    pack(model.state_dict(), tmp_path / "m.ncz", recipe=recipe)
    stored = load_state_dict(tmp_path / "m.ncz")
    for name, weight in seen.items():
        assert torch.equal(stored[name], weight), name


@pytest.mark.skipif(not (SHARED / "clinc150" / "data_full.json").exists(), reason="needs ../shared/data/nlu")
def test_shared_datasets_read():
    nlu = load_bench("nlu")
    clinc = nlu.read_dataset(SHARED / "clinc150")
    assert len(clinc.labels) == 150 and len(clinc.splits["test"][0]) == 4500
    snips = nlu.read_dataset(SHARED / "snips")
    assert len(snips.labels) == 7 and len(snips.splits["test"][0]) == 700


def test_pack_for_metric_rows_merge(tmp_path):
    """``--variants metric``: pack_for_metric searched on the validation split, its archive scored on the test
    split, rows merged into the full run's JSON (same name replaced, new ones appended, the rest kept)."""
    nlu = load_bench("nlu")
    factory = _tiny_encoder(tmp_path)
    data = _write_clinc(tmp_path / "clinc")
    out = tmp_path / "nlu.json"
    common = ["--data", str(data), "--out", str(out), "--runs", str(tmp_path / "runs"), "--epochs", "2",
              "--batch", "8", "--lr", "1e-3", "--nncodec-qps", "--no-gguf", "--subspaces", "4", "--centroids", "8",
              "--kmeans-iterations", "2", "--qat-steps", "2", "--presets", "lossless", "--threads", "1",
              "--max-evaluations", "4"]
    with pytest.raises(SystemExit, match="which a full run writes first"):
        nlu.run(nlu.parse_args([*common, "--variants", "metric"]), encoder_factory=factory)
    full = nlu.run(nlu.parse_args([*common, "--max-drops", "5"]), encoder_factory=factory)
    rows = [v for v in full["variants"] if v.get("method") == "pack_for_metric"]
    assert [v["name"] for v in rows] == ["ncz pack_for_metric (q8 allocation, valid −5 points)"]
    row = rows[0]
    keys = {"name", "bytes", "bits_per_weight", "metric_name", "metric", "pack_s", "unpack_s", "archive"}
    assert keys <= set(row) and row["metric_name"] == "accuracy"
    assert row["valid_baseline"] == full["valid_accuracy"]  # the search saw the validation split
    assert row["valid_baseline"] - row["valid_metric"] <= 5 + 1e-9
    assert 2 <= row["evaluations"] <= 4 and row["curve"] and Path(row["archive"]).exists()
    assert {"scale", "bits_per_weight", "valid_accuracy", "met"} <= set(row["curve"][0])
    before = [v["name"] for v in full["variants"]]
    seen = []  # the split (by size: 9 validation, 12 test queries) of every accuracy measured
    measure = nlu.accuracy

    def recording(model, split, *a, **k):
        seen.append(len(split))
        return measure(model, split, *a, **k)

    nlu.accuracy = recording
    try:
        merged = nlu.run(nlu.parse_args([*common, "--variants", "metric", "--max-drops", "5", "0"]),
                         encoder_factory=factory)
    finally:
        nlu.accuracy = measure
    new = merged["variants"][-1]
    # fp32 on test and valid, then the new search on valid only, then its archive once on test
    assert seen == [12, 9, *[9] * new["evaluations"], 12]
    names = [v["name"] for v in merged["variants"]]
    assert names[:len(before)] == before  # same name: replaced in place (cached row reused)
    assert names[len(before):] == ["ncz pack_for_metric (q8 allocation, valid −0 points)"]
    assert merged["task_aware"] == full["task_aware"] and merged["command"] == full["command"]
    assert merged["merged"][-1]["variants"] == ["metric"] and merged["pack_for_metric"]["max_drops_points"] == [5, 0]
    assert json.loads(out.read_text()) == merged
    text = nlu.markdown([(out, merged)])
    assert "- ncz pack_for_metric (q8 allocation, valid −0 points): " in text and "searched on **validation**" in text
    assert "| ncz pack_for_metric (q8 allocation, valid −5 points) |" in text
