"""Round trips, determinism, atomicity and layout of the container."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ncz.format as nf
from ncz.format.container import ALIGNMENT, FOOTER, PRELUDE

section_strategy = st.tuples(
    st.text(min_size=1, max_size=20),
    st.binary(max_size=3000),
    st.sampled_from([nf.Codec.RAW, nf.Codec.ZSTD]),
    st.booleans(),
)


def _write(sections, metadata=None) -> bytes:
    buffer = io.BytesIO()
    with nf.Writer(buffer, metadata=metadata) as writer:
        for name, data, codec, critical in sections:
            writer.add(name, data, codec=codec, critical=critical)
    return buffer.getvalue()


@settings(max_examples=150, deadline=None)
@given(
    st.lists(section_strategy, max_size=8, unique_by=lambda s: s[0]),
    st.dictionaries(st.text(max_size=8), st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(), st.binary(),
                                                   st.floats(allow_nan=False), st.booleans(), st.none()), max_size=5),
)
def test_round_trip_any_sections(sections, metadata):
    data = _write(sections, metadata)
    reader = nf.open_bytes(data)
    reader.verify()
    assert reader.metadata == metadata
    assert [s.name for s in reader.sections] == [s[0] for s in sections]
    for (name, payload, codec, critical), info in zip(sections, reader.sections):
        assert reader.read(name) == payload
        assert info.codec == codec and info.critical == critical
        if codec == nf.Codec.RAW:
            assert info.offset % ALIGNMENT == 0
            assert bytes(reader.view(name)) == payload
    # deterministic: the same input gives the same bytes
    assert _write(sections, metadata) == data


def test_overhead_is_small():
    empty = _write([])
    assert len(empty) == PRELUDE.size + 1 + 1 + FOOTER.size  # empty header map, empty table


def test_tensor_view_is_zero_copy_and_aligned(tmp_path):
    array = np.random.default_rng(1).standard_normal((100, 37)).astype(np.float32)
    path = tmp_path / "t.ncz"
    with nf.Writer(path) as writer:
        writer.add("pad", b"x" * 5, codec=nf.Codec.ZSTD)
        writer.add("w", array.tobytes(), kind=nf.Kind.TENSOR, params={"dtype": "float32", "shape": [100, 37]})
    with nf.open(path) as reader:
        view = reader.view("w")
        restored = np.frombuffer(view, dtype=np.float32).reshape(100, 37)
        assert np.array_equal(restored, array)
        assert reader.info("w").offset % 64 == 0
        assert not restored.flags.owndata  # a view into the mapping, not a copy
        del restored, view


def test_writer_is_atomic_on_error(tmp_path):
    path = tmp_path / "out.ncz"
    with pytest.raises(RuntimeError):
        with nf.Writer(path) as writer:
            writer.add("a", b"123")
            raise RuntimeError("crash mid-write")
    assert not path.exists()
    assert os.listdir(tmp_path) == []  # no temp file left behind either


def test_writer_replaces_existing_file_only_on_success(tmp_path):
    path = tmp_path / "out.ncz"
    path.write_bytes(b"previous")
    writer = nf.Writer(path)
    writer.add("a", b"1")
    assert path.read_bytes() == b"previous"  # nothing visible before close
    writer.close()
    assert nf.open(path).read("a") == b"1"


def test_writer_rejects_bad_usage(tmp_path):
    with nf.Writer(io.BytesIO()) as writer:
        writer.add("a", b"")
        with pytest.raises(nf.UsageError, match="used twice"):
            writer.add("a", b"")
        with pytest.raises(nf.UsageError, match="name"):
            writer.add("", b"")
        with pytest.raises(nf.UsageError, match="name"):
            writer.add("x" * 256, b"")
        with pytest.raises(nf.NczError, match="dtype/shape imply"):
            writer.add("t", b"abc", kind=nf.Kind.TENSOR, params={"dtype": "float32", "shape": [1]})
        with pytest.raises(nf.UsageError, match="level"):
            writer.add("z", b"abc", codec=nf.Codec.ZSTD, options={"level": 99})


def test_zstd_level_changes_size_not_content():
    payload = bytes(range(256)) * 200
    small = _write([("a", payload, nf.Codec.ZSTD, True)])
    assert nf.open_bytes(small).read("a") == payload
    assert len(small) < len(payload) // 10


def test_large_section_count():
    sections = [(f"s{i}", bytes([i % 256]) * (i % 7), nf.Codec.ZSTD, True) for i in range(2000)]
    data = _write(sections)
    reader = nf.open_bytes(data)
    assert len(reader) == 2000 and reader.read("s1999") == bytes([1999 % 256]) * (1999 % 7)


# --- published files: mode, names in errors, stale temp files (issue 12) ---------------------------------


def test_new_files_follow_the_umask_and_replacements_keep_their_mode(tmp_path):
    old = os.umask(0o077)
    try:
        with nf.Writer(tmp_path / "new.ncz") as writer:
            writer.add("a", b"x")
        nf.atomic_write(tmp_path / "new.png", lambda handle: handle.write(b"png"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.ncz").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "new.png").stat().st_mode) == 0o600
    for name in ("new.ncz", "new.png"):
        os.chmod(tmp_path / name, 0o640)
    with nf.Writer(tmp_path / "new.ncz") as writer:
        writer.add("a", b"y")
    nf.atomic_write(tmp_path / "new.png", lambda handle: handle.write(b"png2"))
    assert stat.S_IMODE((tmp_path / "new.ncz").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "new.png").stat().st_mode) == 0o640


def test_errors_name_the_target(tmp_path):
    target = tmp_path / "missing" / "x.ncz"
    with pytest.raises(OSError) as info:
        nf.Writer(target)
    assert info.value.filename == str(target)
    with pytest.raises(OSError) as info:
        nf.atomic_write(target, lambda handle: handle.write(b""))
    assert info.value.filename == str(target)


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".x.ncz.{dead}.abcd1234.tmp"  # what a writer killed with -9 leaves behind
    live = tmp_path / f".x.ncz.{os.getpid()}.efgh5678.tmp"  # a writer still running (this process)
    other = tmp_path / f".y.ncz.{dead}.abcd1234.tmp"  # another target's: not this write's business
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    with nf.Writer(tmp_path / "x.ncz") as writer:
        writer.add("a", b"x")
    assert not stale.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".x.ncz")) == [live.name]
