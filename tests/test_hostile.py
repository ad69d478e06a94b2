"""One hostile file per error class, plus exhaustive flips and truncations.

Each forged file carries *valid* checksums (see conftest.forge) so that it
reaches the rule under test rather than failing early on a checksum.
"""

from __future__ import annotations

import io
import random

import pytest

import ncz.format as nf
from ncz.format import canonical
from ncz.format.layout import FOOTER, PRELUDE
from tests.conftest import VECTORS, forge, reforge, split


def _small() -> bytes:
    buffer = io.BytesIO()
    with nf.Writer(buffer, metadata={"k": 1}) as writer:
        writer.add("a", b"hello world", codec=nf.Codec.ZSTD)
        writer.add("t", bytes(16), kind=nf.Kind.TENSOR, params={"dtype": "float32", "shape": [2, 2]})
        writer.add("b", b"tail")
    return buffer.getvalue()


def _open_verify(data: bytes, limits: nf.Limits | None = None) -> None:
    with nf.open_bytes(data, name="hostile.ncz", limits=limits) as reader:
        reader.verify()


def _entry(table, name):
    return next(e for e in table if e[0] == name)


# -- flips and truncations -----------------------------------------------------
# Small vectors are tested at every byte. In a large one (the codec weights: 150-190 KB) each region
# has one rule for all its bytes (a checksum), so a seeded sample per region tests the same rules in
# seconds instead of an hour; the prelude and footer, whose every field has its own rule, stay whole.

SMALL = 512  # bytes: every position of a vector up to this size
SAMPLE = 64  # positions drawn from each region of a larger one


def _flip_positions(name: str, data: bytes) -> list[int]:
    if len(data) <= SMALL:
        return list(range(len(data)))
    header_end = PRELUDE.size + PRELUDE.unpack_from(data, 0)[3]
    table_offset = FOOTER.unpack_from(data, len(data) - FOOTER.size)[0]
    rng = random.Random(name)
    positions = set(range(PRELUDE.size)) | set(range(len(data) - FOOTER.size, len(data)))
    for start, end in ((PRELUDE.size, header_end), (header_end, table_offset), (table_offset, len(data) - FOOTER.size)):
        positions |= set(rng.sample(range(start, end), min(SAMPLE, end - start)))
    return sorted(positions)


def _truncation_lengths(name: str, data: bytes) -> list[int]:
    if len(data) <= 8 * SMALL:
        return list(range(len(data)))
    edge = 2 * SMALL  # every length near either end, a sample in between
    middle = random.Random(name).sample(range(edge, len(data) - edge), 2 * SMALL)
    return sorted({*range(edge), *middle, *range(len(data) - edge, len(data))})


@pytest.mark.parametrize("vector", sorted(p.name for p in VECTORS.glob("*.ncz")))
def test_every_bit_flip_of_every_tested_byte_is_detected(vector):
    """All 8 bits of every byte (small vectors) or of every sampled byte (large ones, see above)."""
    data = (VECTORS / vector).read_bytes()
    for index in _flip_positions(vector, data):
        for bit in range(8):
            corrupt = bytearray(data)
            corrupt[index] ^= 1 << bit
            with pytest.raises(nf.NczError):
                _open_verify(bytes(corrupt))


@pytest.mark.parametrize("vector", sorted(p.name for p in VECTORS.glob("*.ncz")))
def test_every_tested_truncation_and_an_extension_are_detected(vector):
    data = (VECTORS / vector).read_bytes()
    for length in _truncation_lengths(vector, data):
        with pytest.raises(nf.NczError):
            _open_verify(data[:length])
    with pytest.raises(nf.NczError):
        _open_verify(data + b"\x00")


def test_large_vectors_keep_their_structure_whole_and_sample_each_region():
    data = (VECTORS / "codec-tiny-hyperprior.ncz").read_bytes()
    positions = _flip_positions("codec-tiny-hyperprior.ncz", data)
    assert len(data) > SMALL and len(positions) == PRELUDE.size + FOOTER.size + 3 * SAMPLE
    assert set(range(PRELUDE.size)) <= set(positions) and len(data) - 1 in positions
    small = (VECTORS / "basic.ncz").read_bytes()
    assert _flip_positions("basic.ncz", small) == list(range(len(small)))


# -- one test per error class --------------------------------------------------

def test_format_error_not_an_ncz_file():
    with pytest.raises(nf.FormatError, match="prelude.magic"):
        _open_verify(b"PK\x03\x04" + bytes(100))


def test_version_error_names_the_major():
    data = reforge(_small(), major=2)
    with pytest.raises(nf.VersionError, match="major is 2"):
        _open_verify(data)


def test_newer_minor_is_accepted():
    _open_verify(reforge(_small(), minor=7))


def test_truncated_error_mentions_footer():
    with pytest.raises(nf.TruncatedError, match="footer.magic"):
        _open_verify(_small()[:-1])


def test_checksum_error_in_payload():
    data = bytearray(_small())
    header, table, _ = split(bytes(data))
    offset = _entry(table, "b")[4]
    data[offset] ^= 1
    with pytest.raises(nf.ChecksumError, match="section 'b'"):
        _open_verify(bytes(data))


def test_unknown_critical_kind_is_refused_by_name():
    def mutate(table):
        _entry(table, "b")[1] = 999
        return table
    with pytest.raises(nf.UnsupportedError, match="section 'b'.*unknown kind 999"):
        _open_verify(reforge(_small(), mutate))


def test_unknown_critical_codec_is_refused_by_name():
    def mutate(table):
        _entry(table, "b")[2] = 777
        return table
    with pytest.raises(nf.UnsupportedError, match="section 'b'.*unknown codec 777"):
        _open_verify(reforge(_small(), mutate))


def test_unknown_ancillary_section_is_skipped():
    def mutate(table):
        entry = _entry(table, "b")
        entry[1], entry[2], entry[3] = 999, 777, nf.SectionFlag.ALIGNED  # unknown kind+codec, not critical
        return table
    with nf.open_bytes(reforge(_small(), mutate)) as reader:
        reader.verify()  # checksummed, but not decoded
        assert not reader.info("b").known
        assert reader.read("a") == b"hello world"


def test_limit_error_before_allocation():
    limits = nf.Limits(max_decoded_bytes=10)
    with pytest.raises(nf.LimitError, match="decoded_length 11 exceeds"):
        _open_verify(_small(), limits)
    with pytest.raises(nf.LimitError, match="header_length"):
        _open_verify(_small(), nf.Limits(max_header_bytes=1))
    with pytest.raises(nf.LimitError, match="table_length"):
        _open_verify(_small(), nf.Limits(max_table_bytes=8))
    with pytest.raises(nf.NczError, match="exceeds|limit"):
        _open_verify(_small(), nf.Limits(max_sections=2))


def test_limit_error_on_huge_tensor_dimension():
    def mutate(table):
        _entry(table, "t")[8]["shape"] = [2**41, 0]
        return table
    with pytest.raises(nf.LimitError, match="dimension"):
        _open_verify(reforge(_small(), mutate))


def test_stream_error_on_corrupt_zstd():
    import zstandard

    frame = zstandard.ZstdCompressor(level=3).compress(b"some text " * 50)
    for name, stored in [("truncated", frame[:-1]), ("trailing", frame + b"\x00"),
                         ("garbled", frame[:6] + bytes(len(frame) - 6))]:
        buffer = io.BytesIO()
        with nf.Writer(buffer) as writer:  # add_stored trusts its caller: a forger's tool
            writer.add_stored(name, stored, decoded_length=500, kind=nf.Kind.BLOB, codec=nf.Codec.ZSTD)
        with pytest.raises(nf.StreamError):
            _open_verify(buffer.getvalue())


def test_zstd_bomb_declaration_rejected():
    def mutate(table):
        _entry(table, "a")[6] = 10**9  # claims a gigabyte from a few bytes (under the size cap)
        return table
    with pytest.raises(nf.FormatError, match="impossible"):
        _open_verify(reforge(_small(), mutate))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t + [t[0]], "not unique"),
        (lambda t: [t[0], [t[1][0], 3, 0, 1, t[1][4] + 64, *t[1][5:]], t[2]], "offset"),
        (lambda t: [[*t[0][:3], 4, *t[0][4:]], *t[1:]], "reserved"),
        (lambda t: [*t[:2], [*t[2][:3], 1, *t[2][4:]]], "offset"),
        (lambda t: [t[0][:8], *t[1:]], "array of 9"),
        (lambda t: [[t[0][0], -1, *t[0][2:]], *t[1:]], "non-negative"),
        (lambda t: [[*t[0][:8], []], *t[1:]], "params must be a msgpack map"),
        (lambda t: {"not": "array"}, "array"),
        (lambda t: t[:2], "unaccounted"),
    ],
    ids=["duplicate-name", "overlap-offset", "reserved-flag", "flag-changes-placement", "short-entry", "negative",
         "params-type", "table-type", "gap"],
)
def test_table_rules(mutate, message):
    with pytest.raises(nf.FormatError, match=message):
        _open_verify(reforge(_small(), mutate))


def test_non_canonical_msgpack_is_rejected():
    header, table, region = split(_small())
    # same value, keys unsorted -> not canonical
    import msgpack
    raw = msgpack.packb({"z": 1, "a": 2})
    with pytest.raises(nf.FormatError, match="canonical"):
        _open_verify(forge(header=raw, table=table, payloads=region))


def test_nonzero_padding_is_rejected():
    header, table, region = split(_small())
    body = bytearray(region)
    # the raw tensor 't' is aligned; the byte just before it is padding
    header_len = len(canonical.pack(header))
    pad_index = _entry(table, "t")[4] - 24 - header_len - 1
    assert body[pad_index] == 0
    body[pad_index] = 1
    with pytest.raises(nf.FormatError, match="padding"):
        _open_verify(forge(header=header, table=table, payloads=bytes(body)))


def test_error_message_names_the_file(tmp_path):
    path = tmp_path / "broken.ncz"
    path.write_bytes(_small()[:-3])
    with pytest.raises(nf.NczError) as info:
        nf.open(path)
    assert "broken.ncz" in str(info.value)
