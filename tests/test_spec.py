"""docs/FORMAT.md and the code agree on every id and fixed layout."""

from __future__ import annotations

import re

from ncz.format import ALIGNMENT, MAGIC, VERSION, Codec, Kind, SectionFlag
from ncz.format.container import ENTRY_FIELDS, FOOTER, FOOTER_MAGIC, PRELUDE, TENSOR_DTYPES
from tests.conftest import REPO

SPEC = (REPO / "docs" / "FORMAT.md").read_text(encoding="utf-8")


def _table_after(heading: str) -> list[list[str]]:
    """Rows of the first markdown table after ``heading``."""
    start = SPEC.index(heading)
    rows, seen_table = [], False
    for line in SPEC[start:].splitlines()[1:]:
        if line.startswith("|"):
            seen_table = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif seen_table:
            break
    return rows[1:]  # drop the heading row


def _ids(heading: str, id_col: int = 0, name_col: int = 1) -> dict[str, int]:
    return {row[name_col].strip("`"): int(row[id_col]) for row in _table_after(heading)}


def test_kind_ids_match():
    assert _ids("### 5.1 Kind ids") == {k.name: k.value for k in Kind}


def test_codec_ids_match():
    assert _ids("### 5.2 Codec ids") == {c.name: c.value for c in Codec}


def test_flag_bits_match():
    assert _ids("Flag bits:") == {f.name: f.value for f in SectionFlag}


def test_entry_fields_match():
    rows = _table_after("### 4.3 Section table and entries")
    assert [(int(r[0]), r[1].strip("`")) for r in rows] == list(enumerate(ENTRY_FIELDS))


def test_prelude_and_footer_layout_match():
    prelude = [(int(r[0]), int(r[1]), r[2].strip("`")) for r in _table_after("### 4.1 Prelude")]
    assert prelude == [(0, 8, "magic"), (8, 2, "major"), (10, 2, "minor"), (12, 4, "header_length"),
                       (16, 8, "header_xxh3")]
    assert sum(size for _, size, _ in prelude) == PRELUDE.size
    footer = [(int(r[0]), int(r[1]), r[2].strip("`")) for r in _table_after("### 4.5 Footer")]
    assert [name for *_, name in footer] == ["table_offset", "table_length", "table_xxh3", "magic"]
    assert sum(size for _, size, _ in footer) == FOOTER.size
    assert FOOTER_MAGIC.decode() in SPEC


def test_magic_version_alignment_dtypes_in_spec():
    assert " ".join(f"{b:02X}" for b in MAGIC) in SPEC
    assert f"Version **{VERSION[0]}.{VERSION[1]}**" in SPEC
    assert f"`Aᵢ = {ALIGNMENT}`" in SPEC
    listed = dict(re.findall(r"`(\w+)` (\d)", SPEC[SPEC.index("Tensor dtypes"):]))
    assert {k: int(v) for k, v in listed.items() if k in TENSOR_DTYPES} == TENSOR_DTYPES


def test_version_history_lists_current_version():
    history = _table_after("### Version history")
    assert history[-1][0] == f"{VERSION[0]}.{VERSION[1]}"


def test_entropy_model_ids_match():
    from ncz.format.entropy import ModelId

    assert _ids("Model ids:") == {m.name: m.value for m in ModelId}


def test_entropy_constants_match():
    from ncz.format.entropy import ESCAPE_BITS
    from ncz.format.entropy_tables import GRID_V1, PRECISION, Family

    assert f"**precision {PRECISION}**" in SPEC
    assert f"{ESCAPE_BITS} bits" in SPEC
    grid = GRID_V1[Family.GAUSSIAN]
    ratio = f"ln({grid.scale_max:g}/{grid.scale_min})"
    assert f"`S = {grid.num_scales}` values `sₖ = {grid.scale_min} · exp(k · {ratio} / {grid.num_scales - 1})`" in SPEC
    assert f"floor(mean · {grid.mean_steps} + 0.5)" in SPEC
