"""The text sets and the derivation behind the model presets (bench/text_sets.py, bench/models_presets.py)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import REPO, load_bench, shared_data

from ncz.models import PRESETS
from ncz.models.recipe import TENSOR_CLASSES

ts = load_bench("text_sets")
mp = load_bench("models_presets")


# --- text sets -----------------------------------------------------------------


def test_spread_and_chunks():
    items = [str(i) for i in range(10)]
    assert ts.spread(items, 3) == ["0", "3", "6"]
    assert ts.spread(items, None) == items and ts.spread(items, 50) == items and ts.spread(items, 0) == []
    words = " ".join(f"w{i}" for i in range(130))
    pieces = ts.chunk_words(words, 60)
    assert [len(p.split()) for p in pieces] == [44, 44, 42]  # as even as possible, none over 60
    assert " ".join(pieces) == words
    assert ts.chunk_words("   ") == []


def test_ptb_lines_spell_out_unk_and_drop_short_lines():
    text = " the <unk> rose N N \n ok \n" + " ".join(["x"] * 70) + "\n"
    lines = ts.ptb_lines(text)
    assert lines[0] == "the unknown rose N N"
    assert [len(line.split()) for line in lines[1:]] == [35, 35]


def test_shakespeare_sentences_drop_speakers_and_join_lines():
    text = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
            "MENENIUS:\nWhy, masters, my good friends,\nmine honest neighbours, will you undo yourselves? "
            "We know't, we know't.\n")
    assert ts.shakespeare_sentences(text) == [
        "Before we proceed any further, hear me speak.",
        "Why, masters, my good friends, mine honest neighbours, will you undo yourselves?",
        "We know't, we know't."]  # "Speak, speak." has fewer than MIN_WORDS words


def _fake_data(root):
    (root / "nlu" / "clinc150").mkdir(parents=True)
    (root / "nlu" / "clinc150" / "data_full.json").write_text(json.dumps(
        {part: [[f"clinc {part} query {i}", "intent"] for i in range(4)] for part in ("train", "val", "test")}))
    for name in ("snips", "atis"):
        for split in ("train", "dev", "test"):
            (root / "nlu" / name / split).mkdir(parents=True)
            (root / "nlu" / name / split / "seq.in").write_text(
                "".join(f"{name} {split} utterance {i}\n" for i in range(3)))
    (root / "text" / "ptb").mkdir(parents=True)
    for split in ("train", "valid", "test"):
        (root / "text" / "ptb" / f"ptb.{split}.txt").write_text(f" a {split} <unk> sentence \n")
    (root / "text" / "tinyshakespeare").mkdir(parents=True)
    (root / "text" / "tinyshakespeare" / "input.txt").write_text(
        "\n\n".join(f"KING:\nSpeech number {i} is here." for i in range(20)))


def test_sentences_parts_from_each_source(tmp_path):
    _fake_data(tmp_path)
    assert ts.available(tmp_path) and not ts.available(tmp_path / "missing")
    assert ts.sentences("clinc150", "derive", data=tmp_path)[0] == "clinc val query 0"
    assert ts.sentences("snips", "test", 2, data=tmp_path) == ["snips test utterance 0", "snips test utterance 1"]
    assert ts.sentences("atis", "train", data=tmp_path)[-1] == "atis train utterance 2"
    assert ts.sentences("ptb", "derive", data=tmp_path) == ["a valid unknown sentence"]
    parts = {part: ts.sentences("shakespeare", part, data=tmp_path) for part in ts.PARTS}
    assert [len(parts[p]) for p in ("train", "derive", "test")] == [16, 2, 2]  # 80 / 10 / 10 %, in file order
    assert parts["test"] == ["Speech number 18 is here.", "Speech number 19 is here."]
    with pytest.raises(ValueError, match="unknown text set"):
        ts.sentences("wikitext", "test", data=tmp_path)
    with pytest.raises(ValueError, match="unknown part"):
        ts.sentences("ptb", "valid", data=tmp_path)


def test_shared_text_sets_have_enough_held_out_text():
    shared_data("nlu", "snips")
    if not ts.available():
        pytest.skip("needs all five text sets under ../shared/data")
    for name in ts.TEXT_SETS:
        derive, test = ts.sentences(name, "derive"), ts.sentences(name, "test")
        assert len(derive) >= 300 and len(test) >= 500 and len(ts.sentences(name, "train")) >= 2000, name
        assert len(set(test) & set(derive)) < 0.05 * len(test), name  # the test part is held out


# --- fits, allocation, settling ------------------------------------------------


def _measured(sensitivity: dict[str, dict[str, float]], weights: dict[str, int]):
    """Probes of exact laws: drop = s·e², bits = 2 − log2 e."""
    return {cls: [{"rel_error": e, "weights": weights[cls], "bits": 2 - math.log2(e),
                   "drop": {s: sens[cls] * e * e for s, sens in sensitivity.items()}}
                  for e in (0.01, 0.02, 0.05)] for cls in weights}


def test_fits_recover_the_laws_and_set_aside_insensitive_classes():
    measured = _measured({"a": {"x": 3.0, "y": 1e-9}}, {"x": 100, "y": 50})
    fits = mp.fit_models(measured)
    assert fits["insensitive"] == ["y"]
    d0, d1 = fits["classes"]["x"]["drop"]["a"]
    b0, b1 = fits["classes"]["x"]["bits"]
    assert d1 == pytest.approx(2) and math.exp(d0) == pytest.approx(3)
    assert b1 == pytest.approx(-1 / math.log(2)) and b0 == pytest.approx(2)


def test_allocation_on_one_set_equalizes_drop_per_bit():
    pytest.importorskip("scipy")
    weights = {"x": 300, "y": 100}
    fits = mp.fit_models(_measured({"a": {"x": 1.0, "y": 4.0}}, weights))
    errors = mp.allocate(fits, 1e-3, ["a"])
    drops = {"x": errors["x"] ** 2, "y": 4 * errors["y"] ** 2}
    assert sum(drops.values()) == pytest.approx(1e-3, rel=1e-3)
    assert drops["x"] / drops["y"] == pytest.approx(3, rel=1e-2)  # shares ∝ nᵢ at equal bits slopes


def test_allocation_meets_every_set_with_fewer_bits_than_scaling():
    pytest.importorskip("scipy")
    weights = {"x": 300, "y": 100, "z": 100}
    sensitivity = {"a": {"x": 1.0, "y": 1.0, "z": 0.2}, "b": {"x": 0.2, "y": 3.0, "z": 1.0}}
    fits = mp.fit_models(_measured(sensitivity, weights))
    errors = mp.allocate(fits, 1e-3, ["a", "b"])
    drops = mp.predicted(fits, errors, ["a", "b"])["drop"]
    assert max(drops.values()) == pytest.approx(1e-3, rel=1e-3)
    # against the allocation of either set alone, scaled until both sets hold
    for alone in ("a", "b"):
        single = mp.allocate(fits, 1e-3, [alone])
        worst = max(mp.predicted(fits, single, ["a", "b"])["drop"].values())
        scaled = {c: e * math.sqrt(1e-3 / worst) for c, e in single.items()}
        assert (mp.predicted(fits, errors, ["a"])["bits_of_these_classes"]
                < mp.predicted(fits, scaled, ["a"])["bits_of_these_classes"] - 0.01)


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
def test_settle_lands_in_the_band_below_the_target(scale):
    calls = []

    def run(errors):
        calls.append(errors)
        e = errors["x"]
        return {"a": {"drop": scale * e * e}, "b": {"drop": 0.5 * scale * e * e}}

    settled, history = mp.settle({"x": 0.03, "y": 0.01}, 1e-3, run)
    worst = scale * settled["x"] ** 2
    assert mp.SETTLE_BAND * 1e-3 <= worst <= 1e-3
    assert settled["y"] / settled["x"] == pytest.approx(1 / 3)  # one factor for all classes
    assert len(history) == len(calls) <= 4


# --- the presets are the derivation's ------------------------------------------


def _preset_errors(name: str, key: str) -> dict[str, float]:
    by_pattern = {pattern: cls for cls, patterns, _ in TENSOR_CLASSES for pattern in patterns}
    return {by_pattern[r["pattern"]]: r[key] for r in PRESETS[name]["rule"] if key in r}


@pytest.mark.parametrize("kind", ["data_free", "calibrated"])
def test_presets_are_the_committed_derivation(kind):
    """recipe.py's numbers are those bench/models_presets.py derived (bench/results/models_derivation*.json)."""
    name = "models_derivation.json" if kind == "data_free" else "models_derivation_calibrated.json"
    derivation = json.loads((REPO / "bench" / "results" / name).read_text(encoding="utf-8"))
    assert derivation["calibrated"] == (kind == "calibrated")
    assert set(derivation["sets"]) == set(ts.TEXT_SETS)
    key = "rel_error" if kind == "data_free" else "calibrated_rel_error"
    for preset, entry in derivation["presets"].items():
        assert _preset_errors(preset, key) == pytest.approx(entry["rel_error"], rel=1e-9), preset


def test_docs_state_the_promise_as_measured():
    """docs/MODELS.md's promise tables are bench/models_presets.py's rendering of models_presets.json."""
    result = json.loads((REPO / "bench" / "results" / "models_presets.json").read_text(encoding="utf-8"))
    docs = (REPO / "docs" / "MODELS.md").read_text(encoding="utf-8")
    assert set(result["presets"]) == {"q8", "q4", "small"}
    for key in ("presets", "clinc150_only_allocation"):
        assert mp.markdown_table(result, key) in docs, key
    # the committed presets are the ones measured
    for preset, entry in result["presets"].items():
        assert entry["promise"] == mp.PROMISE[preset]
        assert entry["recipe"] == PRESETS[preset], preset
