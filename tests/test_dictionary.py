"""Shared dictionary + sparse codes (DirNet): OMP, group coding, archives, DictionaryLinear, hostile files."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from conftest import shared_data
from torch import nn

import ncz.format as nf
from ncz.models import Recipe, describe, load_into, load_state_dict, pack
from ncz.models.archive import ARCHIVE_TAG, write_encoded
from ncz.models.dictionary import (
    DictionaryLinear,
    encode_dictionary,
    encode_dictionary_group,
    omp,
    plan_dictionary,
)
from ncz.models.lossless import encode_lossless
from ncz.models.quantized import encode_quantized
from ncz.models.representation import relative_error, symbol_payload

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models: tests/conftest.py says why


def _atoms(rng: np.random.Generator, d: int, k: int) -> np.ndarray:
    D = rng.standard_normal((d, k))
    return D / np.linalg.norm(D, axis=0)


def _sparse_codes(rng: np.random.Generator, k: int, n: int, s: int) -> np.ndarray:
    C = np.zeros((k, n))
    for c in range(n):
        C[rng.choice(k, s, replace=False), c] = rng.standard_normal(s) + np.sign(rng.standard_normal(s))
    return C


def _group(seed: int = 0, d: int = 24, k: int = 48, cols: int = 256, count: int = 4, s: int = 2,
           noise: float = 1e-3) -> list[torch.Tensor]:
    """Matrices whose columns are s-sparse over one shared dictionary, plus a little noise."""
    rng = np.random.default_rng(seed)
    D = _atoms(rng, d, k)
    return [torch.tensor(D @ _sparse_codes(rng, k, cols, s) + noise * rng.standard_normal((d, cols)),
                         dtype=torch.float32) for _ in range(count)]


def _write(path, encoded) -> int:
    """What pack() writes for pre-encoded tensors; returns the file size."""
    with nf.Writer(path, metadata={"format": ARCHIVE_TAG, "tensors": len(encoded)}) as w:
        for e in encoded:
            write_encoded(w, e)
    return os.path.getsize(path)


# ---------------------------------------------------------------------------
# OMP
# ---------------------------------------------------------------------------


def test_omp_recovers_exact_sparse_codes():
    rng = np.random.default_rng(3)
    D = _atoms(rng, 32, 64)
    C = _sparse_codes(rng, 64, 400, 3)
    codes = omp(D, D @ C, 3)
    assert np.abs(codes.dense(64) - C).max() < 1e-9
    assert (codes.count == 3).all()
    # unnormalised atoms: coefficients refer to the given atoms; per-column limits
    scale = rng.uniform(0.5, 2.0, 64)
    limits = rng.integers(0, 4, 400)
    C2 = C.copy()
    for c in range(400):  # keep each column's largest `limit` entries
        nz = np.nonzero(C2[:, c])[0]
        C2[nz[limits[c]:], c] = 0
    codes = omp(D * scale, D @ C2, limits)
    assert np.abs(codes.dense(64) * scale[:, None] - C2).max() < 1e-9
    assert (codes.count == limits).all()
    # an exactly represented column stops early instead of picking zero-correlation atoms
    codes = omp(D, D @ C, 10)
    assert (codes.count == 3).all()


# ---------------------------------------------------------------------------
# Group coding
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic():
    mats = _group()
    names = [f"layer{i}.weight" for i in range(len(mats))]
    encoded = encode_dictionary_group(names, mats, rel_error=0.05, atoms=(48,), iterations=16)
    return names, mats, encoded


def test_shared_dictionary_beats_per_matrix(tmp_path, synthetic):
    names, mats, group = synthetic
    assert all(e.rel_error <= 0.05 for e in group)
    assert group[0].sections[0].params["dictionary"] == names[0]
    assert all(e.sections[0].params["dictionary"] == names[0] for e in group)
    assert sum(s.name.endswith("#dict") for e in group for s in e.sections) == 1  # stored once
    shared = _write(tmp_path / "group.ncz", group)
    single = [encode_dictionary(n, m, rel_error=0.05, atoms=48, iterations=16) for n, m in zip(names, mats)]
    assert all(e.rel_error <= 0.05 for e in single)
    alone = _write(tmp_path / "single.ncz", single)
    quantized = _write(tmp_path / "q.ncz", [encode_quantized(n, m, rel_error=0.05) for n, m in zip(names, mats)])
    # the shared dictionary is paid once: far cheaper than four dictionaries, and the sparse
    # model beats scalar quantization on data that is sparse over a dictionary
    assert shared < 0.6 * alone, (shared, alone)
    assert shared < 0.75 * quantized, (shared, quantized)


def test_reported_error_matches_archive_round_trip(tmp_path, synthetic):
    names, mats, group = synthetic
    path = tmp_path / "g.ncz"
    _write(path, group)
    back = load_state_dict(path)
    rows = {r.name: r for r in describe(path)}
    for name, tensor, e in zip(names, mats, group):
        measured = relative_error(tensor, back[name])
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert abs(measured - e.rel_error) < 1e-6, (name, measured, e.rel_error)
        assert abs(rows[name].rel_error - measured) < 1e-6
        assert measured <= 0.05
    # the per-tensor path through pack() and a recipe (a group of one, gate blocks sharing D)
    rng = np.random.default_rng(5)
    D = _atoms(rng, 16, 24)
    w = torch.tensor(np.concatenate([D @ _sparse_codes(rng, 24, 48, 2) for _ in range(3)]), dtype=torch.float16)
    recipe = Recipe.from_dict({"rule": [
        {"pattern": "*.weight", "representation": "dictionary", "rel_error": 0.04, "dim": 16, "atoms": [24],
         "iterations": 10},
        {"pattern": "*", "representation": "lossless"}]})
    report = pack({"gates.weight": w, "gates.bias": torch.zeros(48)}, tmp_path / "r.ncz", recipe=recipe)
    assert report.tensors[0].representation.startswith("dictionary")
    back = load_state_dict(tmp_path / "r.ncz")["gates.weight"]
    assert back.dtype == torch.float16
    assert relative_error(w, back) <= 0.04
    assert abs(relative_error(w, back) - report.tensors[0].rel_error) < 1e-6


def test_budget_modes_meet_the_budget_and_trade_error(tmp_path):
    mats = _group(seed=1, count=2)
    names = ["a", "b"]
    numel = sum(m.numel() for m in mats)
    errors = []
    for bits in (1.5, 3.0):
        encoded = encode_dictionary_group(names, mats, bits=bits, atoms=(24, 48), iterations=8)
        coded = sum(8 * (s.payload.stored_length + len(s.payload.params.get("table", b"")))
                    for e in encoded for s in e.sections)
        assert coded <= bits * numel, (bits, coded / numel)
        _write(tmp_path / "b.ncz", encoded)
        back = load_state_dict(tmp_path / "b.ncz")
        for n, m, e in zip(names, mats, encoded):
            assert abs(relative_error(m, back[n]) - e.rel_error) < 1e-6
        errors.append(math.sqrt(sum(e.rel_error**2 * e.numel for e in encoded) / numel))
    assert errors[1] < 0.7 * errors[0], errors
    # ratio is bits in disguise: 32/16 = 2 bits per float32 weight
    encoded = encode_dictionary_group(names, mats, ratio=16.0, atoms=(24,), iterations=4)
    coded = sum(8 * (s.payload.stored_length + len(s.payload.params.get("table", b"")))
                for e in encoded for s in e.sections)
    assert coded <= 2.0 * numel


def test_encoder_is_deterministic_and_checks_arguments():
    mats = _group(seed=2, count=2, cols=48)
    first = encode_dictionary_group(["a", "b"], mats, rel_error=0.1, atoms=(16,), iterations=4)
    again = encode_dictionary_group(["a", "b"], mats, rel_error=0.1, atoms=(16,), iterations=4)
    assert [bytes(s.payload.stored) for e in first for s in e.sections] == \
        [bytes(s.payload.stored) for e in again for s in e.sections]
    calls = []
    encode_dictionary_group(["a"], mats[:1], rel_error=0.1, atoms=(16,), iterations=2,
                            progress=lambda done, total, what: calls.append((done, total)))
    assert calls and calls[-1][0] == calls[-1][1] and all(a <= b for (a, _), (b, _) in zip(calls, calls[1:]))
    with pytest.raises(nf.UsageError, match="exactly one"):
        encode_dictionary_group(["a"], mats[:1], rel_error=0.1, bits=2.0)
    with pytest.raises(nf.UsageError, match="different row counts"):
        encode_dictionary_group(["a", "b"], [mats[0], torch.zeros(16, 8)], rel_error=0.1)
    with pytest.raises(nf.UsageError, match="not a multiple"):
        encode_dictionary_group(["a"], [torch.randn(30, 8)], rel_error=0.1, dim=16)
    with pytest.raises(nf.UsageError, match="2 dimensions"):
        encode_dictionary("v", torch.randn(40), rel_error=0.1)
    with pytest.raises(nf.UsageError, match="NaN"):
        encode_dictionary("v", torch.tensor([[1.0, float("nan")]] * 4), rel_error=0.1)


def test_rel_error_is_met_even_with_too_few_atoms():
    torch.manual_seed(0)
    w = torch.randn(16, 64)  # unstructured: 4 atoms cannot reach 10 %
    e = encode_dictionary("w", w, rel_error=0.1, atoms=4, iterations=3)
    assert e.rel_error <= 0.1
    assert e.sections[0].params["atoms"] == 16  # fell back to a complete dictionary


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------


def test_dictionary_linear_matches_dense_and_shares_the_dictionary(tmp_path):
    rng = np.random.default_rng(7)
    D = _atoms(rng, 32, 24)

    def net():
        return nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 32))

    model = net()
    with torch.no_grad():  # weights that are sparse over one dictionary of 32-long atoms
        model[0].weight.copy_(torch.tensor(np.concatenate([D @ _sparse_codes(rng, 24, 256, 2) for _ in range(2)])))
        model[2].weight.copy_(torch.tensor(D @ _sparse_codes(rng, 24, 64, 2)))
    sd = model.state_dict()
    encoded = plan_dictionary(sd, {"*.weight": {"dim": 32}}, rel_error=0.03, atoms=(24,), iterations=12)
    assert sorted(encoded) == ["0.weight", "2.weight"]
    path = tmp_path / "m.ncz"
    _write(path, [encoded.get(n) or encode_lossless(n, t) for n, t in sd.items()])

    dense = net()
    dense.load_state_dict(load_state_dict(path))
    compact = net()
    report = load_into(compact, path)
    assert sorted(report.factorized) == ["0", "2"]
    assert isinstance(compact[0], DictionaryLinear) and isinstance(compact[2], DictionaryLinear)
    assert compact[0].dictionary is compact[2].dictionary  # one D in memory for the group
    assert report.parameter_bytes_after < 0.75 * report.parameter_bytes_before, report
    x = torch.randn(5, 7, 256)
    with torch.no_grad():
        ref, out = dense(x), compact(x)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert torch.allclose(compact[0].dense_weight(), dense[0].weight, atol=1e-6)
    # trainable: gradients reach the shared dictionary and the code values
    compact(x).square().sum().backward()
    assert compact[0].dictionary.grad is not None and compact[0].values.grad is not None
    assert float(compact[0].values.grad.abs().sum()) > 0


# ---------------------------------------------------------------------------
# Hostile archives
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory):
    torch.manual_seed(1)
    mats = [torch.randn(16, 24), torch.randn(16, 20)]
    encoded = encode_dictionary_group(["a.weight", "b.weight"], mats, rel_error=0.3, atoms=(12,), iterations=2)
    path = tmp_path_factory.mktemp("hostile") / "ok.ncz"
    _write(path, encoded)
    load_state_dict(path)  # the unmodified file is fine
    return path


def _symbols(path, name) -> np.ndarray:
    with nf.open(path) as r:
        return np.frombuffer(r.read(name), dtype="<i4").copy()


def _rewrite(src, dst, *, params=None, symbols=None, floats=None, drop=()):
    """Copy ``src`` with some sections' params or content replaced (valid checksums)."""
    with nf.open(src) as r, nf.Writer(dst, metadata=r.metadata) as w:
        for info in r.sections:
            if info.name in drop:
                continue
            p = dict(info.params)
            if params and info.name in params:
                p = params[info.name](p)
            if symbols and info.name in symbols:
                data = np.asarray(symbols[info.name], dtype="<i4")
                w.add_encoded(info.name, symbol_payload(data), kind=info.kind,  # zstd when too dense for ANS
                              params={"dtype": "int32", "shape": [data.size]})
            elif floats and info.name in floats:
                data = np.asarray(floats[info.name], dtype="<f4")
                w.add(info.name, data.tobytes(), kind=info.kind, params={"dtype": "float32", "shape": [1, 1]})
            else:
                w.add_stored(info.name, bytes(r.stored(info.name)), decoded_length=info.decoded_length,
                             kind=info.kind, codec=info.codec, params=p)
    return dst


def _set(**changes):
    return lambda p: {**p, **changes}


def test_hostile_dictionary_archives(tmp_path, small_archive):
    ok = small_archive
    with nf.open(ok) as r:
        K = r.info("b.weight").params["atoms"]
    index = _symbols(ok, "b.weight#index")
    counts = _symbols(ok, "b.weight#count")
    cases = {
        # an atom index ≥ K (first index of the first column)
        "index": (dict(symbols={"b.weight#index": np.concatenate([[K], index[1:]])}), "atom index"),
        # gaps that run past K
        "gaps": (dict(symbols={"b.weight#index": np.full(index.size, 3)}), "atom index"),
        "negative": (dict(symbols={"b.weight#index": np.concatenate([[-1], index[1:]])}), "negative"),
        # counts that do not add up to the indices, exceed the sparsity, go negative, or miss columns
        "sum": (dict(symbols={"b.weight#count": np.concatenate([counts[:-1], [counts[-1] - 1]])}), "counts sum"),
        "big": (dict(symbols={"b.weight#count": np.concatenate([[99], counts[1:]])}), "column counts"),
        "neg": (dict(symbols={"b.weight#count": np.concatenate([[-1], counts[1:]])}), "column counts"),
        "cols": (dict(symbols={"b.weight#count": counts[:-1]}), "column counts, expected"),
        # dictionary references: missing, cyclic, to a non-owner, mismatched
        "missing": (dict(params={"b.weight": _set(dictionary="nope")}), "lacks"),
        "cycle": (dict(params={"a.weight": _set(dictionary="b.weight"), "b.weight": _set(dictionary="a.weight")}),
                  "own dictionary"),
        "chain": (dict(params={"b.weight": _set(dictionary="b.weight2")}), "lacks"),
        "atoms": (dict(params={"b.weight": _set(atoms=K + 1)}), "expects"),
        "no-dict-part": (dict(drop={"a.weight#dict"}), "lacks its part"),
        "dict-size": (dict(symbols={"a.weight#dict": _symbols(ok, "a.weight#dict")[:-1]}), "entries"),
        # params themselves
        "blocks": (dict(params={"b.weight": _set(blocks=2)}), "blocks"),
        "dim-type": (dict(params={"b.weight": _set(dim="16")}), "params.dim"),
        "sparsity": (dict(params={"b.weight": _set(sparsity=K + 1)}), "exceeds"),
        "step": (dict(floats={"b.weight#step": [float("nan")]}), "finite"),
    }
    for label, (change, message) in cases.items():
        bad = _rewrite(ok, tmp_path / f"{label}.ncz", **change)
        with pytest.raises(nf.FormatError, match=message):
            load_state_dict(bad)
        model = nn.Module()
        model.a, model.b = nn.Linear(24, 16), nn.Linear(20, 16)
        with pytest.raises(nf.FormatError):
            load_into(model, bad, strict=False)


# ---------------------------------------------------------------------------
# A real-ish case: LSTM gates on tiny-shakespeare
# ---------------------------------------------------------------------------


def test_lstm_gates_share_a_dictionary(tmp_path):
    text = shared_data("text", "tinyshakespeare", "input.txt").read_text(encoding="utf-8")[:200_000]
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text[:50_000]], dtype=torch.long)
    torch.manual_seed(0)

    class CharLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(len(chars), 32)
            self.lstm = nn.LSTM(32, 128, batch_first=True)
            self.out = nn.Linear(128, len(chars))

        def forward(self, x):
            return self.out(self.lstm(self.emb(x))[0])

    model = CharLSTM()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)

    def batch(g):
        start = torch.randint(0, data.numel() - 33, (16,), generator=g)
        seq = torch.stack([data[s:s + 33] for s in start])
        return seq[:, :-1], seq[:, 1:]

    def loss_of(m, x, y):
        return nn.functional.cross_entropy(m(x).reshape(-1, len(chars)), y.reshape(-1))

    for _ in range(100):
        x, y = batch(gen)
        loss = loss_of(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    held = [batch(torch.Generator().manual_seed(1)) for _ in range(4)]
    with torch.no_grad():
        base = float(np.mean([loss_of(model, x, y) for x, y in held]))
    assert base < 3.3  # it learned something (uniform over 65 symbols is 4.17)

    sd = model.state_dict()
    gates = ["lstm.weight_ih_l0", "lstm.weight_hh_l0"]
    # the four gate blocks of both matrices share one dictionary of 128-long atoms
    encoded = plan_dictionary(sd, {"lstm.weight_*": {"dim": 128}}, bits=3.0, atoms=(32,), iterations=3)
    assert sorted(encoded) == sorted(gates)
    assert all(encoded[n].sections[0].params["blocks"] == 4 for n in gates)
    numel = sum(sd[n].numel() for n in gates)
    coded = sum(8 * (s.payload.stored_length + len(s.payload.params.get("table", b"")))
                for n in gates for s in encoded[n].sections)
    assert coded <= 3.0 * numel
    path = tmp_path / "lstm.ncz"
    _write(path, [encoded.get(n) or encode_lossless(n, t) for n, t in sd.items()])
    back = load_state_dict(path)
    for n in gates:
        assert abs(relative_error(sd[n], back[n]) - encoded[n].rel_error) < 1e-6
    restored = CharLSTM()
    restored.load_state_dict(back)
    with torch.no_grad():
        after = float(np.mean([loss_of(restored, x, y) for x, y in held]))
    print(f"LSTM gates: {coded / numel:.2f} bits/weight, errors "
          f"{[round(encoded[n].rel_error, 3) for n in gates]}, loss {base:.3f} -> {after:.3f}")
    assert after < base + 0.5, (base, after)


def test_columns_are_summed_left_to_right_from_the_first_term():
    """FORMAT.md §5.4: a column is Σ value·D̂[:, atom] in float64 in stored order. numpy's add.reduceat
    (the decoder before) adds the rest of a column to its first term, which rounds differently when
    terms cancel: a column −47, 47, −3·2⁻⁵⁰, 5·2⁻⁵⁰ must give 2⁻⁴⁹, not 2⁻⁴⁷."""
    from ncz.models.dictionary.format import reconstruct

    rng = np.random.default_rng(0)
    for trial in range(40):
        d, K, blocks, cols = (int(x) for x in rng.integers(1, 6, 4))
        N = blocks * cols
        D = (rng.standard_normal((d, K)) * 10.0 ** rng.integers(-6, 6, (d, K))).astype(np.float32)
        counts = rng.integers(0, K + 1, N)
        atoms = np.concatenate([np.sort(rng.choice(K, c, replace=False)) for c in counts]).astype(np.int64)
        values = (rng.standard_normal(atoms.size) * 10.0 ** rng.integers(-6, 6, atoms.size)).astype(np.float32)
        Wt, position = np.zeros((N, d)), 0
        for c in range(N):
            for j in range(counts[c]):
                term = D[:, atoms[position]].astype(np.float64) * np.float64(values[position])
                Wt[c] = term if j == 0 else Wt[c] + term
                position += 1
        want = Wt.T.reshape(d, blocks, cols).transpose(1, 0, 2).reshape(blocks * d, cols).astype(np.float32)
        got = reconstruct(D, counts, atoms, values, blocks, cols, (blocks * d, cols))
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), trial
    cancelling = reconstruct(np.ones((1, 4), np.float32), np.array([4]), np.arange(4),
                             np.array([-47, 47, -3 * 2.0**-50, 5 * 2.0**-50], np.float32), 1, 1, (1, 1))
    assert cancelling[0, 0] == np.float32(2.0**-49)
