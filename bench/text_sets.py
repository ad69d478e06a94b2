"""The English text sets the model presets are derived and checked on (``../shared/data``).

Five sets of different kinds of text, each with three disjoint parts:

* ``derive``: what the presets' per-class errors are fitted to (``bench/models.py --derive``),
* ``test``: held out from the derivation; the presets' promise is measured there,
* ``train``: what a user would calibrate on (``--derive-calibrated`` and the calibrated check).

| set | what | derive | test | train |
|-----|------|--------|------|-------|
| ``clinc150`` | short assistant queries, 150 intents | val | test | train |
| ``snips`` | voice-assistant commands with many named entities | dev | test | train |
| ``atis`` | airline travel requests | dev | test | train |
| ``ptb`` | Wall Street Journal sentences (lower case, ``<unk>``, ``N``) | valid | test | train |
| ``shakespeare`` | tiny-shakespeare, sentences of the speeches | 80–90 % | 90–100 % | 0–80 % |

Every list is deterministic: parts are taken in file order, and :func:`spread` picks
evenly spaced items when fewer are asked for (so a subset still covers the whole split).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TEXT_SETS = ("clinc150", "snips", "atis", "ptb", "shakespeare")
PARTS = ("derive", "test", "train")
_SPLITS = {"derive": "dev", "test": "test", "train": "train"}  # SNIPS / ATIS folder names
_PTB_SPLITS = {"derive": "valid", "test": "test", "train": "train"}
_CLINC_SPLITS = {"derive": "val", "test": "test", "train": "train"}
_SHAKESPEARE_RANGES = {"derive": (0.8, 0.9), "test": (0.9, 1.0), "train": (0.0, 0.8)}
MIN_WORDS = 3  # shorter pieces ("All:", "Speak, speak.") say little about a sentence encoder
MAX_WORDS = 60  # longer PTB / Shakespeare sentences are cut into pieces of at most this many words


def available(data: Path = DATA) -> bool:
    """True when every set's files are present (tests skip otherwise)."""
    return all(path.exists() for path in _files(data))


def _files(data: Path) -> list[Path]:
    return [data / "nlu" / "clinc150" / "data_full.json",
            *(data / "nlu" / name / split / "seq.in" for name in ("snips", "atis") for split in _SPLITS.values()),
            *(data / "text" / "ptb" / f"ptb.{split}.txt" for split in _PTB_SPLITS.values()),
            data / "text" / "tinyshakespeare" / "input.txt"]


def spread(items: list[str], count: int | None) -> list[str]:
    """``count`` items evenly spaced over ``items`` (all of them when count is None or larger)."""
    if count is None or count >= len(items):
        return list(items)
    if count <= 0:
        return []
    return [items[(i * len(items)) // count] for i in range(count)]


def chunk_words(text: str, max_words: int = MAX_WORDS) -> list[str]:
    """``text`` cut into pieces of at most ``max_words`` words (as even as possible)."""
    words = text.split()
    if not words:
        return []
    pieces = -(-len(words) // max_words)
    size = -(-len(words) // pieces)
    return [" ".join(words[i:i + size]) for i in range(0, len(words), size)]


def _keep(pieces: list[str]) -> list[str]:
    return [p for p in pieces if len(p.split()) >= MIN_WORDS]


def clinc150(part: str, data: Path = DATA) -> list[str]:
    rows = json.loads((data / "nlu" / "clinc150" / "data_full.json").read_text(encoding="utf-8"))
    return [text for text, _intent in rows[_CLINC_SPLITS[part]]]


def _seq_in(name: str, part: str, data: Path) -> list[str]:
    lines = (data / "nlu" / name / _SPLITS[part] / "seq.in").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def snips(part: str, data: Path = DATA) -> list[str]:
    return _seq_in("snips", part, data)


def atis(part: str, data: Path = DATA) -> list[str]:
    return _seq_in("atis", part, data)


def ptb_lines(text: str) -> list[str]:
    """PTB's one-sentence lines, ``<unk>`` spelled out, long ones chunked, short ones dropped."""
    out: list[str] = []
    for line in text.splitlines():
        out.extend(chunk_words(line.replace("<unk>", "unknown")))
    return _keep(out)


def ptb(part: str, data: Path = DATA) -> list[str]:
    return ptb_lines((data / "text" / "ptb" / f"ptb.{_PTB_SPLITS[part]}.txt").read_text(encoding="utf-8"))


_SPEAKER = re.compile(r"^[A-Z][A-Za-z' ]*:$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def shakespeare_sentences(text: str) -> list[str]:
    """The sentences of a play's speeches: speaker lines dropped, a speech's lines joined,
    split after . ! ?, long ones chunked, short ones dropped."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if lines and _SPEAKER.match(lines[0]):
            lines = lines[1:]
        for sentence in _SENTENCE_END.split(" ".join(lines)):
            out.extend(chunk_words(sentence))
    return _keep(out)


def shakespeare(part: str, data: Path = DATA) -> list[str]:
    sentences = shakespeare_sentences((data / "text" / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8"))
    lo, hi = _SHAKESPEARE_RANGES[part]
    return sentences[int(lo * len(sentences)):int(hi * len(sentences))]


_LOADERS: dict[str, Callable[[str, Path], list[str]]] = {
    "clinc150": clinc150, "snips": snips, "atis": atis, "ptb": ptb, "shakespeare": shakespeare}


def sentences(name: str, part: str, count: int | None = None, data: Path = DATA) -> list[str]:
    """``count`` sentences (evenly spread, deterministic) of part ``part`` of text set ``name``."""
    if name not in _LOADERS:
        raise ValueError(f"unknown text set {name!r} (known: {', '.join(TEXT_SETS)})")
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r} (known: {', '.join(PARTS)})")
    return spread(_LOADERS[name](part, data), count)
