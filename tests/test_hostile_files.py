"""Hostile files with valid checksums (tests/hostile_files.py): refused at open, in one line,
before any allocation they ask for; through the library, the CLI and model loading."""

from __future__ import annotations

import io
import resource
import subprocess
import sys

import msgpack
import numpy as np
import pytest
import torch

import ncz.format as nf
from ncz.format import Codec, Kind
from ncz.format import constriction_adapter as adapter
from ncz.format import entropy as E
from ncz.models import load_state_dict, pack, unpack
from ncz.models.representation import symbol_payload
from tests.hostile_files import ARCHIVE, CASES, HUGE_HEADS, KIND_CASES, Section, build, skewed_table


def _open_verify(data: bytes, limits: nf.Limits | None = None) -> None:
    with nf.open_bytes(data, name="hostile.ncz", limits=limits) as reader:
        reader.verify()


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_case_is_refused_at_open(case):
    data, error, pattern = CASES[case]
    with pytest.raises(error, match=pattern) as info:
        _open_verify(data)
    assert "hostile.ncz" in str(info.value) and "\n" not in str(info.value)


def test_every_kind_has_a_hostile_case():
    """A new section kind needs its entry in hostile_files.KIND_CASES (or None with a reason)."""
    assert set(KIND_CASES) == set(Kind)


@pytest.mark.parametrize("kind", sorted(HUGE_HEADS), ids=lambda k: Kind(k).name)
def test_terabyte_tensor_is_refused_before_anything_is_read(kind, tmp_path):
    path = tmp_path / "huge.ncz"
    path.write_bytes(HUGE_HEADS[kind])
    with pytest.raises(nf.LimitError, match="limit"):
        _open_verify(HUGE_HEADS[kind])
    with pytest.raises(nf.LimitError):
        load_state_dict(path)
    with pytest.raises(nf.LimitError):
        unpack(path, tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.ncz"]  # no output, no temp file


def _run_capped(args: list[str], memory: int = 6 << 30) -> subprocess.CompletedProcess:
    """The CLI in a child whose address space is capped, so a bomb cannot take the machine down
    (before the fix these aborted inside constriction: SIGABRT, no Python exception)."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run([sys.executable, "-m", "ncz.tools.cli", *args], capture_output=True, text=True,
                          preexec_fn=cap, timeout=120)


def test_entropy_bombs_exit_1_through_the_cli(tmp_path):
    tensor = build([Section("w", Kind.TENSOR, Codec.ANS, b"", 1 << 32,
                            {"dtype": "int32", "shape": [1 << 30], "model": 1, "table": skewed_table()})], ARCHIVE)
    (tmp_path / "t.ncz").write_bytes(tensor)
    archive = str(tmp_path / "t.ncz")
    for args in (["verify", archive], ["unpack", archive, "-o", str(tmp_path / "o.pt")]):
        proc = _run_capped(args)
        assert proc.returncode == 1, proc.stderr[-500:]
        assert proc.stderr.count("\n") == 1 and "t.ncz" in proc.stderr and "symbols in 0 bytes" in proc.stderr
    assert not (tmp_path / "o.pt").exists()


# --- the density rule (FORMAT.md §7.1) --------------------------------------------------------------


def test_writer_refuses_streams_denser_than_the_rule():
    constant = np.zeros(6144, "<i4").tobytes()  # fits a table that codes it in 0 bytes
    with pytest.raises(nf.DensityError, match="6144 symbols in 0 bytes"):
        nf.encode_payload(constant, Codec.ANS)
    with pytest.raises(nf.DensityError):
        with nf.Writer(io.BytesIO()) as writer:
            writer.add("alpha", constant, codec=Codec.RANGE)
    payload = symbol_payload(np.zeros(6144, np.int32))  # what the model encoders do instead
    assert payload.codec == Codec.ZSTD
    noisy = np.random.default_rng(0).integers(-50, 50, 6144).astype("<i4")
    assert symbol_payload(noisy).codec == Codec.ANS


def test_rule_boundary_is_exact():
    stream = E.encode(np.arange(8, dtype=np.int32) % 3, E.CategoricalModel.fit(np.arange(3)))
    assert len(stream) >= 4
    table = E.CategoricalModel.fit(np.arange(3)).table.to_bytes()
    for count, ok in ((1024 * len(stream), True), (1024 * len(stream) + 1, False)):
        data = build([Section("s", Kind.BLOB, Codec.ANS, stream, 4 * count, {"model": 1, "table": table})])
        if ok:
            with nf.open_bytes(data) as reader:
                assert reader.info("s").decoded_length == 4 * count  # opens; decoding then fails on content
        else:
            with pytest.raises(nf.FormatError, match="symbols per byte"):
                nf.open_bytes(data)


def test_decoding_runs_in_bounded_chunks(monkeypatch):
    monkeypatch.setattr(adapter, "CHUNK", 1000)
    symbols = np.random.default_rng(1).integers(-20, 20, 5500).astype(np.int32)
    model = E.CategoricalModel.fit(symbols)
    calls = []
    original = adapter._decode_chunked

    def spy(decode, count, table_model):
        calls.append(count)
        return original(decode, count, table_model)

    monkeypatch.setattr(adapter, "_decode_chunked", spy)
    for coder in (E.Coder.ANS, E.Coder.RANGE):
        assert np.array_equal(E.decode(E.encode(symbols, model, coder), model, symbols.size, coder), symbols)
    assert max(calls) == 5500  # split into calls of at most CHUNK inside


# --- reader budgets -------------------------------------------------------------------------------


def test_per_file_budget_counts_decoded_bytes():
    buffer = io.BytesIO()
    with nf.Writer(buffer) as writer:
        writer.add("a", bytes(1000), codec=Codec.ZSTD)
        writer.add("b", bytes(1000), codec=Codec.ZSTD)
    with nf.open_bytes(buffer.getvalue(), name="two.ncz", limits=nf.Limits(max_file_decoded_bytes=1500)) as reader:
        assert reader.read("a") == bytes(1000)
        with pytest.raises(nf.LimitError, match="two.ncz: section 'b'.*max_file_decoded_bytes"):
            reader.read("b")
        with pytest.raises(nf.LimitError, match="max_image_pixels"):
            reader.charge_pixels(nf.Limits().max_image_pixels + 1, "image 'x'")


def test_archive_dense_total_is_checked_before_any_part(tmp_path):
    path = tmp_path / "m.ncz"
    pack({"a": torch.randn(64, 64), "b": torch.randn(64, 64)}, path, recipe="q8")
    assert set(load_state_dict(path)) == {"a", "b"}
    with pytest.raises(nf.LimitError, match="2 tensors are 32768 bytes dense"):
        load_state_dict(path, limits=nf.Limits(max_file_decoded_bytes=20000))


# --- msgpack: depth and totals without recursion ------------------------------------------------------


def _many_nils(arrays: int, length: int) -> bytes:
    return build([Section("s", params={f"k{i:05d}": [None] * length for i in range(arrays)})])


@pytest.mark.parametrize("arrays, length", [(10, 20000), (24, 60000)], ids=["bulk", "incremental"])
def test_total_items_are_capped_while_reading(arrays, length):
    data = _many_nils(arrays, length)
    assert (len(data) > 1 << 20) == (arrays == 24)  # the second parses container by container
    limits = nf.Limits(max_total_items=100_000)
    with pytest.raises(nf.LimitError, match="more than 100000 msgpack items"):
        nf.open_bytes(data, limits=limits)
    with nf.open_bytes(data) as reader:  # under the default cap it is a valid file
        assert len(reader.info("s").params) == arrays


def test_incremental_parse_equals_msgpack():
    """A table over 1 MiB (read container by container) gives the same entries as msgpack."""
    buffer = io.BytesIO()
    with nf.Writer(buffer, metadata={"k": [1, 2.5, "x", b"y", None, True, {"z": -3}]}) as writer:
        for i in range(20000):
            writer.add(f"section-{i}", b"", params={"i": i, "f": i / 7, "s": [i, -i, 2**40]})
    data = buffer.getvalue()
    with nf.open_bytes(data) as reader:
        assert reader.metadata == {"k": [1, 2.5, "x", b"y", None, True, {"z": -3}]}
        sections = [info.to_entry() for info in reader.sections]
    table_offset, table_length = np.frombuffer(data[-32:-16], "<u8")
    expected = msgpack.unpackb(data[int(table_offset):int(table_offset + table_length)], raw=False)
    assert int(table_length) > 1 << 20 and sections == expected
