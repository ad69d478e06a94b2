"""Fuzzing of the reader: open() + verify() on arbitrary and mutated bytes.

Property: whatever the input, the reader either succeeds or raises an NczError;
never another exception, never a hang, never an allocation beyond its caps.
CI runs a bounded number of examples; for a long run by hand::

    NCZ_FUZZ_EXAMPLES=200000 python -m pytest tests/test_fuzz.py -q
"""

from __future__ import annotations

import contextlib
import os
import signal
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ncz.format as nf
from tests.conftest import VECTORS

EXAMPLES = int(os.environ.get("NCZ_FUZZ_EXAMPLES", "400"))
LIMITS = nf.Limits(max_header_bytes=1 << 16, max_table_bytes=1 << 16, max_sections=256,
                   max_params_items=256, max_decoded_bytes=1 << 20, max_dimension=1 << 20)
ALLOCATION_CAP = 8 << 20  # caps above bound what a reader may allocate
SEEDS = [p.read_bytes() for p in sorted(VECTORS.glob("*.ncz"))]
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


# A hang is caught by a CPU-time alarm, not by timing the example: CPU seconds do not grow when other
# jobs load the machine, and the alarm also stops a reader that would never return. An example takes
# milliseconds; the bound is three orders of magnitude above that.
CPU_SECONDS = 10.0


class ReaderHung(Exception):
    pass


@contextlib.contextmanager
def _cpu_limit(seconds: float):
    def stop(signum, frame):
        raise ReaderHung(f"reader still busy after {seconds} s of CPU")

    previous = signal.signal(signal.SIGPROF, stop)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def _exercise(data: bytes) -> None:
    tracemalloc.start()
    try:
        with _cpu_limit(CPU_SECONDS), nf.open_bytes(data, name="fuzz.ncz", limits=LIMITS) as reader:
            reader.verify()
            for info in reader.sections:
                if info.known:
                    reader.read(info.name)
    except nf.NczError as exc:
        assert str(exc), "errors must carry a message"
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < ALLOCATION_CAP + 4 * len(data), f"reader allocated {peak} bytes"


def test_cpu_limit_stops_a_busy_loop():
    with pytest.raises(ReaderHung):
        with _cpu_limit(0.05):
            while True:
                pass


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data):
    _exercise(data)


@FUZZ
@given(st.binary(max_size=400).map(lambda body: b"\x89NCZ\r\n\x1a\n" + body))
def test_random_bytes_behind_magic(data):
    _exercise(data)


@st.composite
def mutated_vector(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "set" and data:
            data[position] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0xCF, 0xDD, 0xDF]))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete" and data:
            del data[position:position + draw(st.integers(1, 8))]
        elif action == "truncate":
            del data[position:]
    return bytes(data)


@FUZZ
@given(mutated_vector())
def test_mutated_vectors(data):
    _exercise(data)


@FUZZ
@given(st.data())
def test_forged_tables_with_valid_checksums(data):
    """Checksums are valid, so the fuzzer reaches the table and params rules."""
    from tests.conftest import forge

    scalar = st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=6), st.binary(max_size=6), st.none(),
                       st.booleans(), st.floats(allow_nan=False))
    value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=4), inner, max_size=4)),
                         max_leaves=12)
    entry = st.tuples(st.text(min_size=1, max_size=6), st.sampled_from([1, 2, 3, 999]),
                      st.sampled_from([0, 1, 2, 3, 777]), st.integers(0, 3), st.integers(0, 600), st.integers(0, 600),
                      st.integers(0, 1 << 30), st.integers(0, 2**64 - 1),
                      st.dictionaries(st.sampled_from(["dtype", "shape", "x"]), value, max_size=3)).map(list)
    table = data.draw(st.lists(st.one_of(entry, value), max_size=5))
    header = data.draw(st.dictionaries(st.text(max_size=4), value, max_size=3))
    payloads = data.draw(st.binary(max_size=300))
    _exercise(forge(header=header, table=table, payloads=payloads))


# msgpack values as headers and tables carry them; bytes are mutated to reach the error paths too
_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | \
    st.text(max_size=8) | st.binary(max_size=8)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=5)
                       | st.dictionaries(st.text(max_size=4), inner, max_size=5), max_leaves=40)


def _parse(data: bytes, bulk: bool):
    from ncz.format import canonical

    saved = canonical._BULK_BYTES
    canonical._BULK_BYTES = saved if bulk else -1  # -1: every input takes the container-by-container path
    try:
        return ("ok", canonical.unpack(data, what="x", max_bytes=1 << 16, max_items=64, max_total_items=200))
    except nf.NczError as exc:
        assert isinstance(exc, (nf.FormatError, nf.LimitError)) and str(exc).startswith("x: ")
        return ("error",)  # which check fires first may differ when bytes break several rules
    finally:
        canonical._BULK_BYTES = saved


@FUZZ
@given(_values, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3))
def test_both_msgpack_paths_agree(value, flips):
    """The incremental reader (inputs over 1 MiB) accepts exactly what msgpack's bulk parse accepts,
    with the same value, and refuses the rest."""
    from ncz.format import canonical

    try:
        data = bytearray(canonical.pack(value))
    except nf.FormatError:  # deeper than the rule allows: pack() refuses to write it
        return
    for position, byte in flips:
        data[position % len(data)] = byte
    assert _parse(bytes(data), bulk=True) == _parse(bytes(data), bulk=False)
