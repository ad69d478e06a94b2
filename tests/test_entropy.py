"""Entropy coding: round trips, information bounds, escapes, corruption, bits-back."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ncz.format as nf
from ncz.format import entropy as E
from ncz.format.entropy_tables import GRID_V1, PRECISION, Family, FrequencyTable, fit_table, quantize_masses
from tests.conftest import REPO

CODERS = [E.Coder.ANS, E.Coder.RANGE]
FAMILIES = list(Family)
int32s = st.integers(-(2**31), 2**31 - 1)


def _bound(info_bits: float) -> float:
    """Allowed stream size: information + 0.1% + 64 bits (+ the word rounding of the coder)."""
    return info_bits * 1.001 + 64 + 32


# -- round trips -------------------------------------------------------------------

@pytest.mark.parametrize("coder", CODERS)
@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_conditional_round_trip_extreme_parameters(coder, family, data):
    n = data.draw(st.integers(0, 300))
    means = data.draw(hnp.arrays(np.float64, n, elements=st.floats(-1e6, 1e6)))
    scales = data.draw(hnp.arrays(np.float64, n,
                                  elements=st.sampled_from([1e-9, 0.01, 0.11, 0.5, 3.0, 255.0, 256.0, 1e4, 1e9])))
    noise = data.draw(hnp.arrays(np.int64, n, elements=st.integers(-(2**20), 2**20)))
    symbols = np.clip(np.round(means).astype(np.int64) + noise, -(2**31), 2**31 - 1).astype(np.int32)
    if n:
        symbols[data.draw(st.integers(0, n - 1))] = data.draw(int32s)  # far outside the support
    model = E.ConditionalModel.from_mean_scale(family, means, scales)
    stream = E.encode(symbols, model, coder)
    assert np.array_equal(E.decode(stream, model, coder=coder), symbols)
    assert len(stream) * 8 <= _bound(E.information(symbols, model))


@pytest.mark.parametrize("coder", CODERS)
@settings(max_examples=60, deadline=None)
@given(symbols=hnp.arrays(np.int32, st.integers(0, 2000), elements=int32s | st.integers(-3, 3)))
def test_categorical_fit_round_trip(coder, symbols):
    model = E.CategoricalModel.fit(symbols)
    stream = E.encode(symbols, model, coder)
    assert np.array_equal(E.decode(stream, model, symbols.size, coder), symbols)
    assert len(stream) * 8 <= _bound(E.information(symbols, model))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 10_000), min_size=2, max_size=300), st.integers(-(2**31), 2**31 - 400))
def test_table_serialization_round_trip(counts, offset):
    table = FrequencyTable(offset, quantize_masses(np.array(counts, float)), escape=True)
    again = FrequencyTable.from_bytes(table.to_bytes(), "t")
    assert again.offset == table.offset and np.array_equal(again.freqs, table.freqs)


def test_empty_and_single_symbol():
    for coder in CODERS:
        model = E.CategoricalModel.fit(np.zeros(0, np.int32))
        empty = E.encode(np.zeros(0, np.int32), model, coder)
        assert empty == b"" or len(empty) <= 8
        assert E.decode(E.encode(np.zeros(0, np.int32), model, coder), model, 0, coder).size == 0
        one = np.array([7], np.int32)
        m1 = E.CategoricalModel.fit(one)
        assert E.decode(E.encode(one, m1, coder), m1, 1, coder).tolist() == [7]


@pytest.mark.parametrize("coder", CODERS)
def test_ten_million_symbols_within_information_bound(coder):
    rng = np.random.default_rng(0)
    symbols = np.round(rng.laplace(0, 3, 10**7)).astype(np.int32)
    model = E.CategoricalModel.fit(symbols)
    stream = E.encode(symbols, model, coder)
    info = E.information(symbols, model)
    assert len(stream) * 8 <= info * 1.001 + 64
    assert np.array_equal(E.decode(stream, model, symbols.size, coder), symbols)


@pytest.mark.parametrize("coder", CODERS)
def test_conditional_information_bound_on_realistic_latents(coder):
    rng = np.random.default_rng(1)
    n = 200_000
    means = rng.normal(0, 4, n)
    scales = np.exp(rng.uniform(np.log(0.05), np.log(40), n))
    symbols = np.round(rng.normal(means, scales)).astype(np.int32)
    model = E.ConditionalModel.from_mean_scale(Family.GAUSSIAN, means, scales)
    stream = E.encode(symbols, model, coder)
    info = E.information(symbols, model)
    assert len(stream) * 8 <= info * 1.001 + 64
    # and the integer tables are close to the ideal continuous model
    ideal = E.information(symbols, model)
    assert ideal > 0


def test_escape_costs_exactly_48_bits_more():
    table = fit_table(np.array([0, 1, 1, 2]))
    model = E.CategoricalModel(table)
    inside = E.information(np.array([1]), model)
    outside = E.information(np.array([10**6]), model)
    assert outside == pytest.approx(PRECISION - np.log2(table.freqs[-1]) + E.ESCAPE_BITS)
    assert outside > inside


# -- grids are pinned ----------------------------------------------------------------

def test_grid_hashes_match_the_spec():
    spec = (REPO / "docs" / "FORMAT.md").read_text()
    for family in Family:
        assert f"| {family.name} | `{GRID_V1[family].digest()}` |" in spec.replace("  ", " ")


def test_grid_quantization_uses_comparisons_only():
    grid = GRID_V1[Family.GAUSSIAN]
    offsets, ids = grid.quantize(np.array([0.0, 0.0625, -0.1, 1.99, -7.3]), np.array([0.0, 0.11, 0.1101, 1e9, 3.0]))
    assert offsets.tolist() == [0, 0, -1, 2, -8]
    scale_index = ids % 64
    assert scale_index[0] == 0 and scale_index[1] == 0 and scale_index[3] == 63
    with pytest.raises(nf.UsageError):
        grid.quantize(np.array([np.nan]), np.array([1.0]))


# -- decoders reject corrupt streams --------------------------------------------------

@pytest.mark.parametrize("coder", CODERS)
def test_corrupt_truncated_padded_streams_raise(coder):
    rng = np.random.default_rng(2)
    symbols = np.round(rng.normal(0, 20, 5000)).astype(np.int32)
    model = E.CategoricalModel.fit(symbols)
    stream = E.encode(symbols, model, coder)
    with pytest.raises(nf.StreamError):
        E.decode(stream + b"\x01\x00\x00\x00", model, symbols.size, coder)
    with pytest.raises(nf.StreamError):
        E.decode(stream[:-3], model, symbols.size, coder)
    detected = 0
    for k in range(0, len(stream) - 4, max(1, len(stream) // 40)):
        bad = bytearray(stream)
        bad[k] ^= 0x5A
        try:
            out = E.decode(bytes(bad), model, symbols.size, coder)
        except nf.StreamError:
            detected += 1
            continue
        assert not np.array_equal(out, symbols)
    assert detected > 0  # the exhaustion check catches most corruptions; checksums catch the rest


@pytest.mark.parametrize("coder", CODERS)
def test_short_streams_are_not_silently_zeros(coder):
    """constriction decodes zeros past the end of its data. Our decoder returns a
    message only if the input is exactly that message's encoding."""
    model = E.CategoricalModel.fit(np.arange(10, dtype=np.int32))
    fives = np.full(50, 5, np.int32)
    stream = E.encode(fives, model, coder)
    pieces = [stream[:cut] for cut in range(0, len(stream), 4)] + [stream[cut:] for cut in range(4, len(stream) + 1, 4)]
    for piece in pieces:
        try:
            decoded = E.decode(piece, model, 50, coder)
        except nf.StreamError:
            continue
        assert not np.array_equal(decoded, fives)
        assert E.encode(decoded, model, coder) == piece  # a different, genuinely encoded message


def _mutations(stream: bytes, rng: np.random.Generator) -> list[bytes]:
    """Truncations, paddings, word drops and swaps, bit flips and random tails of ``stream``."""
    words = len(stream) // 4
    out = [stream[:4 * k] for k in range(words)] + [stream[4 * k:] for k in range(1, words + 1)]
    out += [stream + bytes(4), stream + b"\x01\x00\x00\x00", stream + rng.bytes(4), stream + rng.bytes(8)]
    for _ in range(12):
        bad = bytearray(stream + rng.bytes(4 * int(rng.integers(0, 3))))
        if bad:
            bad[int(rng.integers(0, len(bad)))] ^= 1 << int(rng.integers(0, 8))
        out.append(bytes(bad))
        if words >= 2:
            k = int(rng.integers(0, words - 1))
            out.append(stream[:4 * k] + stream[4 * k + 4:])  # a word dropped
            out.append(stream[:4 * k] + stream[4 * k + 4:4 * k + 8] + stream[4 * k:4 * k + 4] + stream[4 * k + 8:])
    return out


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_ans_accepts_exactly_the_encodings_of_what_it_decodes(data):
    """ANS decoding checks canonicality by the coder ending empty, not by re-encoding:
    whatever it accepts must still be exactly the encoding of what it returns."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    n = data.draw(st.integers(0, 400))
    width = data.draw(st.sampled_from([0.3, 3.0, 200.0]))
    symbols = np.round(rng.normal(0, width, n)).astype(np.int32)
    if n and data.draw(st.booleans()):  # escapes: values outside the fitted window
        symbols[rng.integers(0, n, 3)] = rng.integers(-(2**31), 2**31 - 1, 3, dtype=np.int64)
    if data.draw(st.booleans()):
        model = E.CategoricalModel.fit(symbols[: max(1, n // 2)] if n else np.zeros(1, np.int32))
    else:
        tables = tuple(fit_table(np.round(rng.normal(0, s, 300)).astype(int)) for s in (0.5, 5.0))
        model = E.IndexedModel(tables, rng.integers(0, 2, n), rng.integers(-3, 3, n))
    stream = E.encode(symbols, model, E.Coder.ANS)
    assert np.array_equal(E.decode(stream, model, n), symbols)
    for piece in _mutations(stream, rng):
        try:
            decoded = E.decode(piece, model, n)
        except nf.StreamError:
            continue
        assert decoded.dtype == np.int32 and decoded.shape == (n,)
        assert E.encode(decoded, model, E.Coder.ANS) == piece


def test_ans_decode_returns_escapes_and_int32_extremes():
    table = fit_table(np.arange(-3, 4))
    model = E.CategoricalModel(table)
    symbols = np.array([0, -(2**31), 2**31 - 1, 3, -3, 1000, 0], np.int32)
    out = E.decode(E.encode(symbols, model), model, symbols.size)
    assert out.dtype == np.int32 and np.array_equal(out, symbols)
    four = fit_table(np.arange(4))
    high = E.CategoricalModel(FrequencyTable(2**31 - 4, four.freqs, escape=True))  # regular range up to 2^31 - 1
    top = np.array([2**31 - 1, 2**31 - 4, 5, 2**31 - 2], np.int32)
    assert np.array_equal(E.decode(E.encode(top, high), high, top.size), top)


@pytest.mark.parametrize("codec", [nf.Codec.ANS, nf.Codec.RANGE])
def test_read_symbols_is_read_without_bytes(codec):
    rng = np.random.default_rng(4)
    ints = np.round(rng.normal(0, 30, 5000)).astype("<i4")
    ints[7] = 2**31 - 1  # an escape
    latents = np.round(rng.normal(0, 2, 100)).astype(np.int32)
    model = E.ConditionalModel.from_mean_scale(Family.GAUSSIAN, np.zeros(100), np.full(100, 2.0))
    buffer = io.BytesIO()
    with nf.Writer(buffer) as writer:
        writer.add("q", ints.tobytes(), kind=nf.Kind.TENSOR, codec=codec, params={"dtype": "int32", "shape": [5000]})
        writer.add("raw", ints.tobytes(), kind=nf.Kind.TENSOR, params={"dtype": "int32", "shape": [5000]})
        E.write_conditional(writer, "y", latents, model, codec=codec, kind=nf.Kind.BLOB)
    with nf.open_bytes(buffer.getvalue()) as reader:
        symbols = E.read_symbols(reader, "q")
        assert symbols.dtype == np.int32 and symbols.flags.writeable
        assert np.array_equal(symbols, np.frombuffer(reader.read("q"), "<i4"))
        assert np.array_equal(symbols, ints)
        with pytest.raises(nf.FormatError, match="not an entropy codec"):
            E.read_symbols(reader, "raw")
        with pytest.raises(nf.UsageError, match="conditional"):
            E.read_symbols(reader, "y")


# -- sections ---------------------------------------------------------------------------

@pytest.mark.parametrize("codec", [nf.Codec.ANS, nf.Codec.RANGE])
def test_entropy_sections_in_container(codec):
    rng = np.random.default_rng(3)
    ints = np.round(rng.normal(0, 5, (64, 33))).astype("<i4")
    latents = np.round(rng.normal(0, 2, 1000)).astype(np.int32)
    means, scales = np.zeros(1000), np.full(1000, 2.0)
    model = E.ConditionalModel.from_mean_scale(Family.GAUSSIAN, means, scales)
    buffer = io.BytesIO()
    with nf.Writer(buffer) as writer:
        writer.add("q", ints.tobytes(), kind=nf.Kind.TENSOR, codec=codec, params={"dtype": "int32", "shape": [64, 33]})
        E.write_conditional(writer, "y", latents, model, codec=codec, kind=nf.Kind.BLOB)
    with nf.open_bytes(buffer.getvalue()) as reader:
        reader.verify()
        assert np.array_equal(np.frombuffer(reader.read("q"), "<i4").reshape(64, 33), ints)
        with pytest.raises(nf.UsageError, match="conditional"):
            reader.read("y")
        assert np.array_equal(E.read_conditional(reader, "y", model), latents)
        wrong = E.ConditionalModel.from_mean_scale(Family.LAPLACE, means, scales)
        with pytest.raises(nf.UsageError):
            E.read_conditional(reader, "y", wrong)
        assert reader.info("q").stored_length < ints.nbytes / 3


def test_thread_count_independence():
    """Encode in a process with 2 threads, decode in one with 1: identical symbols."""
    code = (
        "import os,sys,numpy as np,torch;torch.set_num_threads(int(sys.argv[1]));"
        "from ncz.format import entropy as E, Family;"
        "rng=np.random.default_rng(5);m=rng.normal(0,3,20000);s=np.exp(rng.normal(0,1.5,20000));"
        "x=np.round(rng.normal(m,s)).astype(np.int32);model=E.ConditionalModel.from_mean_scale(Family.GAUSSIAN,m,s);"
        "sys.stdout.buffer.write(E.encode(x,model)) if sys.argv[2]=='enc' else "
        "sys.stdout.write(str(int(np.array_equal(E.decode(sys.stdin.buffer.read(),model),x))))"
    )
    env_two = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    import os
    enc = subprocess.run([sys.executable, "-c", code, "2", "enc"], capture_output=True, env={**os.environ, **env_two},
                         check=True)
    dec = subprocess.run([sys.executable, "-c", code, "1", "dec"], input=enc.stdout, capture_output=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    assert dec.stdout == b"1"


# -- bits-back ---------------------------------------------------------------------------

def test_bits_back_restores_borrowed_bits_exactly():
    """Encoder: pop z ~ q(z|y) (borrow), push y|z, push z with the prior.
    Decoder: pop z (prior), pop y|z, push z with q(z|y) -> the seed comes back."""
    rng = np.random.default_rng(7)
    n_z, n_y = 500, 4000
    y = np.round(rng.normal(0, 3, n_y)).astype(np.int32)
    posterior = E.ConditionalModel.from_mean_scale(Family.LOGISTIC, rng.normal(0, 2, n_z), np.full(n_z, 1.5))
    prior = E.CategoricalModel.fit(np.round(rng.normal(0, 3, 10_000)).astype(np.int32))

    def likelihood_given(z: np.ndarray) -> E.ConditionalModel:  # stands in for the hyper-decoder
        means = np.repeat(z.astype(float) * 0.5, n_y // n_z)
        return E.ConditionalModel.from_mean_scale(Family.GAUSSIAN, means, np.full(n_y, 3.0))

    seed = E.BitsBackStack.seed_words(200, seed=11)
    stack = E.BitsBackStack(seed.copy())
    z = stack.pop(posterior)                       # borrow bits
    borrowed = E.information(z, posterior)
    stack.push(y, likelihood_given(z))
    stack.push(z, prior)
    stream = stack.to_bytes()

    decoder = E.BitsBackStack.from_bytes(stream)
    z_dec = decoder.pop(prior, n_z)
    y_dec = decoder.pop(likelihood_given(z_dec))
    decoder.push(z_dec, posterior)                 # give the bits back
    decoder.check_restored(seed)
    assert np.array_equal(z_dec, z) and np.array_equal(y_dec, y)
    # the stream is shorter than seed + both messages by about the borrowed bits
    net = len(stream) * 8 - 32 * seed.size
    plain = E.information(y, likelihood_given(z)) + E.information(z, prior)
    assert net == pytest.approx(plain - borrowed, abs=0.01 * plain + 64)


def test_bits_back_refuses_to_borrow_from_an_empty_stack():
    posterior = E.ConditionalModel.from_mean_scale(Family.GAUSSIAN, np.zeros(100), np.full(100, 50.0))
    with pytest.raises(nf.StreamError, match="initial bits"):
        E.BitsBackStack().pop(posterior)
    with pytest.raises(nf.StreamError, match="initial bits"):
        E.BitsBackStack.seeded(2).pop(posterior)


def test_bits_back_detects_wrong_restoration():
    stack = E.BitsBackStack.seeded(10, seed=1)
    with pytest.raises(nf.StreamError):
        stack.check_restored(E.BitsBackStack.seed_words(10, seed=2))


def test_scale_index_is_exactly_the_count_of_smaller_boundaries():
    grid = GRID_V1[Family.LAPLACE]
    rng = np.random.default_rng(4)
    b = grid.boundaries
    scales = np.concatenate([np.exp(rng.uniform(-40, 40, 100_000)), b, np.nextafter(b, 0), np.nextafter(b, np.inf),
                             grid.scales, [0.0, 5e-324, 1e308, np.inf]])
    assert np.array_equal(grid.scale_index(scales), np.searchsorted(b, scales, side="left"))


@pytest.mark.parametrize("coder", CODERS)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_indexed_model_round_trip(coder, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    tables = tuple(fit_table(np.round(rng.normal(0, s, 500)).astype(int)) for s in (0.3, 2.0, 40.0))
    n = data.draw(st.integers(0, 3000))
    ids = rng.integers(0, len(tables), n)
    symbols = np.round(rng.normal(0, 10, n)).astype(np.int32)
    model = E.IndexedModel(tables, ids, rng.integers(-5, 5, n))
    stream = E.encode(symbols, model, coder)
    assert np.array_equal(E.decode(stream, model, coder=coder), symbols)
    assert len(stream) * 8 <= _bound(E.information(symbols, model))
    with pytest.raises(nf.UsageError):
        E.IndexedModel(tables, np.array([3]))
