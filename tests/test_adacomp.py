"""Tests for ncz.models.adacomp (AdaComp gradient compression + DDP hook).

Single-process tests cover the selection rule, conservation (error feedback),
the wire format (round trip, encoding choice, hostile input) and state
checkpointing. One 2-process gloo test trains a small MLP with and without the
hook and compares the final loss.
"""

import functools
import io
import json
import math
import os
import socket
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ncz.format import FormatError, InputError, NczError, UsageError
from ncz.models.adacomp import (
    AdaCompCompressor,
    AdaCompConfig,
    AdaCompState,
    AdaCompWireError,
    SparseMessage,
    WireEncoding,
    decode_message,
    encode_message,
    encoded_sizes,
    layer_type_of,
)
from ncz.models.adacomp.hook import _aggregate, _local_payload
from ncz.models.adacomp.wire import frame, unframe

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


class FakeBucket:
    """Stand-in for dist.GradBucket: flat buffer + per-parameter views."""

    def __init__(self, params: list[torch.Tensor], grads: list[torch.Tensor], index: int = 0, last: bool = True):
        self._params = params
        self._buffer = torch.cat([g.reshape(-1) for g in grads]).float()
        self._index = index
        self._last = last

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def gradients(self) -> list[torch.Tensor]:
        out, off = [], 0
        for p in self._params:
            out.append(self._buffer[off : off + p.numel()].view_as(p))
            off += p.numel()
        return out

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._last


def _msg(numel: int, indices, signs, scale: float) -> SparseMessage:
    return SparseMessage(
        numel=numel, indices=np.asarray(indices, np.int64), signs=np.asarray(signs, bool), scale=scale
    )


# --------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------


def test_config_defaults_follow_paper() -> None:
    cfg = AdaCompConfig()
    assert cfg.bin_len_for("conv") == 50
    assert cfg.bin_len_for("linear_lstm") == 500
    assert AdaCompConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bin_len_conv": 0}, "bin_len_conv must be in"),
        ({"bin_len_linear_lstm": -5}, "bin_len_linear_lstm must be in"),
        ({"bin_len_other": 2.5}, "bin_len_other must be an int"),
        ({"bin_len_conv": True}, "bin_len_conv must be an int"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
        ({"history_len": -1}, "history_len must be >= 0"),
        ({"always_send_bin_max": 1}, "always_send_bin_max must be a bool"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):  # bad arguments, like everywhere in ncz
        AdaCompConfig(**kwargs)


def test_config_unknown_layer_type_and_fields() -> None:
    with pytest.raises(UsageError, match="attention"):
        AdaCompConfig().bin_len_for("attention")
    with pytest.raises(UsageError, match="bin_len"):
        AdaCompConfig.from_dict({"bin_len": 3})


def test_layer_type_of() -> None:
    assert layer_type_of(torch.empty(8, 3, 3, 3)) == "conv"
    assert layer_type_of(torch.empty(8, 3, 5)) == "conv"
    assert layer_type_of(torch.empty(8, 3)) == "linear_lstm"
    assert layer_type_of(torch.empty(8)) == "other"


# --------------------------------------------------------------------------
# compressor: selection rule and conservation
# --------------------------------------------------------------------------


def test_threshold_hand_made_first_step() -> None:
    # bins of 4: [1, .4, -.6, .1] [0 0 0 0] [.2, -.2, .05, 0]
    grad = torch.tensor([1.0, 0.4, -0.6, 0.1, 0, 0, 0, 0, 0.2, -0.2, 0.05, 0.0])
    residue = torch.zeros(12)
    msg = AdaCompCompressor().compress(grad, residue, bin_len=4)
    # G = grad, H = 2G; bin 0: g_max=1 -> |H| >= 1 at 0 (2.0) and 2 (1.2), not 1 (0.8)
    # bin 1: all zero -> nothing; bin 2: g_max=.2 -> 8, 9 (|H|=.4), not 10 (.1), not 11 (G=0)
    assert msg.indices.tolist() == [0, 2, 8, 9]
    assert msg.signs.tolist() == [False, True, False, True]
    assert msg.scale == pytest.approx((1.0 + 0.6 + 0.2 + 0.2) / 4)
    expected = torch.tensor([0.5, 0.4, -0.1, 0.1, 0, 0, 0, 0, -0.3, 0.3, 0.05, 0.0])
    torch.testing.assert_close(residue, expected)


def test_self_adjusting_holds_back_opposed_entries() -> None:
    # G = [.95, 0, 0, .8]; H = G + g = [1.0, 0, 0, .6]: entry 3 is near the max
    # but its fresh gradient opposes it, so it is held back.
    residue = torch.tensor([0.9, 0.0, 0.0, 1.0])
    grad = torch.tensor([0.05, 0.0, 0.0, -0.2])
    msg = AdaCompCompressor().compress(grad, residue, bin_len=4)
    assert msg.indices.tolist() == [0]
    # the same magnitudes with an agreeing gradient are sent
    residue = torch.tensor([0.9, 0.0, 0.0, 0.6])
    msg = AdaCompCompressor().compress(torch.tensor([0.05, 0.0, 0.0, 0.2]), residue, bin_len=4)
    assert msg.indices.tolist() == [0, 3]


def test_bin_max_guarantee_vs_paper_rule() -> None:
    # G = [.7, .5], H = [.4, .5], g_max = .7: the paper's rule sends nothing.
    def run(flag: bool) -> list[int]:
        residue = torch.tensor([1.0, 0.5])
        return AdaCompCompressor(always_send_bin_max=flag).compress(
            torch.tensor([-0.3, 0.0]), residue, bin_len=2
        ).indices.tolist()

    assert run(False) == []
    assert run(True) == [0]


def test_short_last_bin_is_its_own_bin() -> None:
    # n = 10, L = 4 -> bins [0..3], [4..7], [8, 9]; the tiny tail bin still sends
    grad = torch.tensor([5.0, 0, 0, 0, 0, 0, 3.0, 0, 0, 1e-3])
    msg = AdaCompCompressor().compress(grad, torch.zeros(10), bin_len=4)
    assert msg.indices.tolist() == [0, 6, 9]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3000),
    bin_len=st.sampled_from([1, 3, 50, 500]),
    zero_frac=st.floats(0.0, 0.95),
    seed=st.integers(0, 2**31 - 1),
    flag=st.booleans(),
)
def test_every_nonzero_bin_sends(n: int, bin_len: int, zero_frac: float, seed: int, flag: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    residue = torch.randn(n, generator=gen) * (torch.rand(n, generator=gen) > zero_frac)
    grad = torch.randn(n, generator=gen) * (torch.rand(n, generator=gen) > zero_frac)
    g_acc = residue + grad
    msg = AdaCompCompressor(always_send_bin_max=flag).compress(grad, residue, bin_len)
    sent_bins = set((msg.indices // bin_len).tolist())
    nonzero_bins = set((torch.nonzero(g_acc).squeeze(1) // bin_len).tolist())
    assert sent_bins <= nonzero_bins  # all-zero bins never send
    assert not bool(np.any(g_acc.numpy()[msg.indices] == 0))  # zeros are never sent
    if flag:
        assert sent_bins == nonzero_bins
        # the sent entries include each bin's arg-max of |G|
        for b in nonzero_bins:
            seg = g_acc[b * bin_len : (b + 1) * bin_len].abs()
            top = set((torch.nonzero(seg == seg.max()).squeeze(1) + b * bin_len).tolist())
            assert top & set(msg.indices.tolist())


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 5000),
    bin_len=st.sampled_from([1, 7, 50, 500]),
    steps=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_conservation_nothing_is_lost(n: int, bin_len: int, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    comp = AdaCompCompressor()
    residue = torch.zeros(n)
    grad_sum = torch.zeros(n, dtype=torch.float64)
    sent_sum = torch.zeros(n, dtype=torch.float64)
    for _ in range(steps):
        grad = torch.randn(n, generator=gen) * torch.rand(1, generator=gen) * 10
        before = residue.clone()
        msg = comp.compress(grad, residue, bin_len)
        sent = comp.decompress(msg)
        # one step: sent + new residue == old residue + gradient (float32 rounding)
        tol = 1e-5 * float(before.abs().max() + grad.abs().max())
        torch.testing.assert_close(sent + residue, before + grad, rtol=0, atol=tol)
        # sent values are +-scale on the selected entries only
        nz = torch.nonzero(sent).squeeze(1).numpy()
        assert set(nz.tolist()) <= set(msg.indices.tolist())
        if msg.nnz:
            assert torch.allclose(sent[msg.indices].abs(), torch.tensor(msg.scale))
            assert msg.scale == pytest.approx(float((before + grad)[msg.indices].abs().mean()), rel=1e-5)
        grad_sum += grad.double()
        sent_sum += sent.double()
    # over all steps: everything sent + what is still owed == all gradients
    torch.testing.assert_close(sent_sum + residue.double(), grad_sum, rtol=0,
                               atol=1e-4 * float(grad_sum.abs().max() + 1))


def test_compressor_rejects_bad_input() -> None:
    comp = AdaCompCompressor()
    with pytest.raises(UsageError, match="equal length"):
        comp.compress(torch.zeros(4), torch.zeros(5), 2)
    with pytest.raises(UsageError, match="float32"):
        comp.compress(torch.zeros(4), torch.zeros(4, dtype=torch.float64), 2)
    with pytest.raises(UsageError, match="bin_len"):
        comp.compress(torch.zeros(4), torch.zeros(4), 0)
    residue = torch.ones(3)
    with pytest.raises(UsageError, match="non-finite"):
        comp.compress(torch.tensor([0.0, float("nan"), 1.0]), residue, 2)
    assert torch.equal(residue, torch.ones(3))  # untouched on error
    assert comp.compress(torch.zeros(0), torch.zeros(0), 5).nnz == 0


def test_compression_rate_on_noise_matches_paper_ballpark() -> None:
    """Steady-state on i.i.d. noise: a handful of entries per bin.

    The paper reports ~200x for L=500 and ~40x for L=50; on Gaussian noise
    (the least compressible case: no temporal correlation) we need to be at
    least in that ballpark, otherwise the selection rule is off.
    """
    gen = torch.Generator().manual_seed(0)
    comp = AdaCompCompressor()
    n = 50_000
    for bin_len, min_rate in ((500, 200.0), (50, 40.0)):
        residue = torch.zeros(n)
        for _ in range(60):
            msg = comp.compress(torch.randn(n, generator=gen), residue, bin_len)
        per_bin = msg.nnz / (n / bin_len)
        assert 1.0 <= per_bin <= 10.0
        assert 4 * n / len(encode_message(msg)) >= min_rate


# --------------------------------------------------------------------------
# wire format
# --------------------------------------------------------------------------


@st.composite
def sparse_messages(draw: st.DrawFn) -> SparseMessage:
    numel = draw(st.one_of(st.integers(0, 64), st.integers(1, 100_000), st.integers(1, 2**32 - 1)))
    if numel == 0:
        return _msg(0, [], [], 0.0)
    kind = draw(st.sampled_from(["random", "runs"]))
    if kind == "random":
        idx = sorted(draw(st.sets(st.integers(0, numel - 1), max_size=200)))
    else:
        start = draw(st.integers(0, numel - 1))
        length = draw(st.integers(0, min(300, numel - start)))
        idx = list(range(start, start + length))
    signs = draw(st.lists(st.booleans(), min_size=len(idx), max_size=len(idx)))
    scale = 0.0 if not idx else draw(st.floats(0.0, allow_nan=False, allow_infinity=False, width=32))
    return _msg(numel, idx, signs, scale)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=sparse_messages())
def test_wire_round_trip_and_smallest_encoding(msg: SparseMessage) -> None:
    sizes = encoded_sizes(msg)
    for enc in WireEncoding:
        data = encode_message(msg, enc)
        assert data[0] == int(enc)
        assert len(data) == sizes[enc]
        assert decode_message(data) == msg
    auto = encode_message(msg)
    assert len(auto) == min(sizes.values())
    assert auto[0] == min(sizes, key=lambda e: (sizes[e], int(e)))
    assert decode_message(auto, expected_numel=msg.numel) == msg


def test_encoding_choice_on_constructed_cases() -> None:
    # a dense run: all gaps 0 -> 0-bit width, BITPACK costs 1 byte
    run = _msg(10_000, np.arange(0, 1000), np.zeros(1000, bool), 0.5)
    assert encode_message(run)[0] == WireEncoding.BITPACK
    assert len(encode_message(run)) == 13 + 1 + 125

    # small gaps plus one huge one: fixed width blows up, varint does not
    idx = np.concatenate([np.arange(0, 2000, 2), [3_000_000]])
    spiky = _msg(4_000_000, idx, np.ones(idx.size, bool), 1.0)
    sizes = encoded_sizes(spiky)
    assert encode_message(spiky)[0] == WireEncoding.VARINT
    assert sizes[WireEncoding.VARINT] < sizes[WireEncoding.BITPACK]

    # geometric gaps (what AdaComp produces): Rice wins
    rng = np.random.default_rng(0)
    idx = np.cumsum(rng.geometric(1 / 300, size=2000))
    geo = _msg(int(idx[-1]) + 1, idx, rng.random(idx.size) < 0.5, 0.25)
    sizes = encoded_sizes(geo)
    assert encode_message(geo)[0] == WireEncoding.RICE
    assert sizes[WireEncoding.RICE] < min(sizes[WireEncoding.BITPACK], sizes[WireEncoding.VARINT])


def test_wire_layout_is_documented_little_endian() -> None:
    msg = _msg(1000, [3, 4, 700], [True, False, True], 0.75)
    data = encode_message(msg, WireEncoding.VARINT)
    tag, numel, nnz, scale = struct.unpack_from("<BIIf", data)
    assert (tag, numel, nnz, scale) == (1, 1000, 3, 0.75)
    # gaps 3, 0, 695 -> varints 03 | 00 | b7 05 ; signs 0b101
    assert data[13:] == bytes([0x03, 0x00, 0xB7, 0x05, 0b101])


@functools.lru_cache(maxsize=1)
def _valid_samples() -> tuple[bytes, ...]:
    rng = np.random.default_rng(1)
    idx = np.unique(rng.integers(0, 5000, 300))
    m = _msg(5000, idx, rng.random(idx.size) < 0.5, 0.125)
    return tuple(encode_message(m, e) for e in WireEncoding) + (encode_message(_msg(7, [], [], 0.0)),)


@pytest.mark.parametrize("sample", range(4))
def test_every_truncation_and_extension_is_rejected(sample: int) -> None:
    data = _valid_samples()[sample]
    decode_message(data)
    for cut in range(len(data)):
        with pytest.raises(AdaCompWireError):
            decode_message(data[:cut])
    with pytest.raises(AdaCompWireError):
        decode_message(data + b"\x00")


def _patched(data: bytes, offset: int, fmt: str, value) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


def test_hostile_headers() -> None:
    good = encode_message(_msg(100, [1, 50, 99], [False, True, False], 2.0), WireEncoding.BITPACK)
    cases = {
        "bad tag": _patched(good, 0, "<B", 7),
        "nnz > numel": _patched(_patched(good, 1, "<I", 2), 5, "<I", 3),
        "index out of range": _patched(good, 1, "<I", 99),
        "nan scale": _patched(good, 9, "<f", float("nan")),
        "inf scale": _patched(good, 9, "<f", float("inf")),
        "negative scale": _patched(good, 9, "<f", -1.0),
        "width > 32": _patched(good, 13, "<B", 40),
        "huge nnz": _patched(_patched(good, 1, "<I", 2**32 - 1), 5, "<I", 2**32 - 1),
        "empty": b"",
    }
    empty = encode_message(_msg(10, [], [], 0.0))
    cases["empty with scale"] = _patched(empty, 9, "<f", 1.0)
    for name, data in cases.items():
        with pytest.raises(AdaCompWireError):
            decode_message(data)
            pytest.fail(name)
    with pytest.raises(AdaCompWireError, match="expected"):
        decode_message(good, expected_numel=101)


def test_hostile_payload_bits() -> None:
    msg = _msg(100, [1, 50, 99], [False, True, False], 2.0)
    signs_padding = bytearray(encode_message(msg, WireEncoding.BITPACK))
    signs_padding[-1] |= 0x80  # sign bit beyond nnz
    # over-long varint: gap 1 written as 0x81 0x00
    varint = bytearray(encode_message(msg, WireEncoding.VARINT))
    overlong = bytes(varint[:13]) + bytes([0x81, 0x00]) + bytes(varint[14:])
    overlong = _patched(overlong, 5, "<I", 3)
    # a 6-byte varint
    too_long = bytes(varint[:13]) + bytes([0x81] * 5 + [0x01]) + bytes(varint[14:])
    rice = bytearray(encode_message(msg, WireEncoding.RICE))
    rice_k = bytes(rice[:13]) + bytes([32]) + bytes(rice[14:])
    bitpack = bytearray(encode_message(msg, WireEncoding.BITPACK))
    # gaps 1, 48, 48 -> width 6 -> 18 bits in 3 bytes; set bit 23 (padding)
    bitpack[13 + 1 + 2] |= 0x80
    for data in (bytes(signs_padding), overlong, too_long, rice_k, bytes(bitpack)):
        with pytest.raises(AdaCompWireError):
            decode_message(data)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=64))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        msg = decode_message(data)
    except AdaCompWireError:
        return
    assert decode_message(encode_message(msg, WireEncoding(data[0]))) == msg


@settings(max_examples=400, deadline=None)
@given(sample=st.integers(0, 3), pos=st.integers(0, 10_000), value=st.integers(0, 255))
def test_mutated_messages_never_crash(sample: int, pos: int, value: int) -> None:
    data = bytearray(_valid_samples()[sample])
    data[pos % len(data)] = value
    try:
        msg = decode_message(bytes(data))
    except AdaCompWireError:
        return
    assert msg.indices.size == msg.signs.size and (msg.nnz == 0 or msg.indices[-1] < msg.numel)


def test_sparse_message_validation() -> None:
    with pytest.raises(UsageError, match="strictly increasing"):
        _msg(10, [3, 3], [True, True], 1.0)
    with pytest.raises(UsageError, match="out of range"):
        _msg(10, [10], [True], 1.0)
    with pytest.raises(UsageError, match="differ in length"):
        _msg(10, [1, 2], [True], 1.0)
    with pytest.raises(UsageError, match="finite"):
        _msg(10, [1], [True], float("nan"))
    with pytest.raises(UsageError, match="scale 0"):
        _msg(10, [], [], 1.0)


def test_bucket_frames() -> None:
    msgs = [b"abc", b"", b"\x00" * 10]
    assert unframe(frame(msgs), 3) == msgs
    framed = frame(msgs)
    for bad, count in ((framed[:-1], 3), (framed + b"x", 3), (framed, 2), (b"\x01", 1)):
        with pytest.raises(AdaCompWireError):
            unframe(bad, count)


# --------------------------------------------------------------------------
# hook internals with fake buckets, state_dict
# --------------------------------------------------------------------------


def _fake_model_params() -> list[torch.Tensor]:
    return [torch.empty(16, 3, 3, 3), torch.empty(16), torch.empty(40, 64), torch.empty(40)]


def test_two_simulated_workers_average_and_conserve() -> None:
    params = _fake_model_params()
    gen = torch.Generator().manual_seed(3)
    states = [AdaCompState(AdaCompConfig(warmup_steps=0)) for _ in range(2)]
    owed = [torch.zeros(sum(p.numel() for p in params), dtype=torch.float64) for _ in range(2)]
    applied_sum = torch.zeros_like(owed[0])
    for _ in range(5):
        payloads, sent = [], []
        for w in range(2):
            grads = [torch.randn(p.shape, generator=gen) for p in params]
            bucket = FakeBucket(params, grads)
            before = states[w].residues.get(0, torch.zeros(bucket.buffer().numel())).clone()
            payload, by_type = _local_payload(states[w], bucket)
            payloads.append(payload)
            # what this worker sent, recovered from its own payload
            one = FakeBucket(params, [torch.zeros(p.shape) for p in params])
            sent.append(_aggregate(one, [payload]).clone())
            torch.testing.assert_close(sent[w] + states[w].residues[0], before + bucket.buffer(), rtol=0, atol=1e-5)
            assert by_type["conv"].numel == 16 * 27 and by_type["linear_lstm"].numel == 40 * 64
            assert sum(b.wire_bytes for b in by_type.values()) == len(payload) - 4
            owed[w] += bucket.buffer().double()
        result = _aggregate(FakeBucket(params, [torch.zeros(p.shape) for p in params]), payloads)
        torch.testing.assert_close(result, (sent[0] + sent[1]) / 2)
        applied_sum += result.double()
    # all gradient mass is either applied or still in some worker's residue
    total_owed = (owed[0] + owed[1]) / 2
    in_residues = (states[0].residues[0].double() + states[1].residues[0].double()) / 2
    torch.testing.assert_close(applied_sum + in_residues, total_owed, rtol=0, atol=1e-4)


def test_state_dict_round_trip() -> None:
    params = _fake_model_params()
    gen = torch.Generator().manual_seed(5)
    state = AdaCompState(AdaCompConfig(warmup_steps=0))
    for _ in range(3):
        bucket = FakeBucket(params, [torch.randn(p.shape, generator=gen) for p in params])
        _local_payload(state, bucket)
        state.step += 1
    state.totals["conv"].wire_bytes = 123
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    restored = AdaCompState(AdaCompConfig(warmup_steps=0))
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.step == 3
    assert restored.totals["conv"].wire_bytes == 123
    assert restored.residues.keys() == state.residues.keys()
    torch.testing.assert_close(restored.residues[0], state.residues[0], rtol=0, atol=0)
    # both continue identically
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    p1, _ = _local_payload(state, FakeBucket(params, grads))
    p2, _ = _local_payload(restored, FakeBucket(params, grads))
    assert p1 == p2

    bad = state.state_dict()
    bad["version"] = 99
    with pytest.raises(InputError, match="version 99"):
        AdaCompState().load_state_dict(bad)
    bad = state.state_dict()
    bad["residues"][0] = torch.zeros(3)
    with pytest.raises(InputError, match="residue of bucket 0 has 3 elements"):
        AdaCompState().load_state_dict(bad)


def test_layout_change_resets_residue_with_warning() -> None:
    state = AdaCompState(AdaCompConfig(warmup_steps=0))
    a = [torch.empty(10, 10)]
    _local_payload(state, FakeBucket(a, [torch.randn(10, 10)]))
    b = [torch.empty(50, 1), torch.empty(50)]  # same numel, different split
    with pytest.warns(RuntimeWarning, match="layout"):
        _local_payload(state, FakeBucket(b, [torch.randn(50, 1), torch.randn(50)]))
    assert state.residue_resets == 1


# --------------------------------------------------------------------------
# 2-process gloo DDP
# --------------------------------------------------------------------------

DDP_STEPS = 250
DDP_LR = 0.25
# Tolerance: on this task (250 steps, SGD lr 0.25, batch 32/worker) plain DDP
# reaches MSE ~0.008 from an initial ~0.5; an offline 2-worker simulation of
# AdaComp (which reproduces this DDP run exactly) lands 7-8% *below* plain over
# three batch seeds. We allow AdaComp to be at most 10% worse. Dropping error
# feedback (zeroing the residue after each step) ends at 0.038, 4.4x higher, so
# the bound has teeth.
DDP_REL_TOL = 0.10


def _ddp_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2048, 32, generator=g)
    w = torch.randn(32, 1, generator=g)
    noise = 0.05 * torch.randn(2048, 1, generator=g)
    y = torch.tanh(x @ w / 4) + 0.1 * torch.sin(x[:, :4].sum(1, keepdim=True)) + noise
    return x, y


def _ddp_train(rank: int, world: int, use_hook: bool) -> tuple[float, torch.Tensor, AdaCompState | None]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ncz.models.adacomp import register_adacomp

    x, y = _ddp_data()
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128), torch.nn.Tanh(), torch.nn.Linear(128, 1)
    )
    model = DDP(net)
    state = register_adacomp(model, AdaCompConfig()) if use_hook else None
    opt = torch.optim.SGD(model.parameters(), lr=DDP_LR)
    xr, yr = x[rank::world], y[rank::world]
    gen = torch.Generator().manual_seed(1000 + rank)
    for _ in range(DDP_STEPS):
        i = torch.randint(0, xr.shape[0], (32,), generator=gen)
        loss = torch.nn.functional.mse_loss(model(xr[i]), yr[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(x), y).item()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return final, flat, state


def _ddp_worker(rank: int, world: int, port: int, out_path: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        plain, _, _ = _ddp_train(rank, world, use_hook=False)
        ada, flat, state = _ddp_train(rank, world, use_hook=True)
        assert state is not None
        replicas = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(replicas, flat)
        if rank == 0:
            rates = state.compression_rate()
            result = {
                "plain": plain,
                "adacomp": ada,
                "replicas_identical": all(torch.equal(replicas[0], r) for r in replicas),
                "rates": {k: (None if math.isnan(v) else v) for k, v in rates.items()},
                "step": state.step,
                "history": len(state.history),
                "resets": state.residue_resets,
                "warmup_bytes": state.warmup_bytes,
                "bytes_sent": state.bytes_sent(),
            }
            Path(out_path).write_text(json.dumps(result))
        # Leave together: a rank that tears gloo down while its peer still talks to it aborts
        # ("terminate called without an active exception", SIGABRT) about half the time.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Under load the abort still came (CI, session 6) from gloo's threads met by the interpreter's
    # exit-time destructors: a rank that succeeded leaves without running them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_training_matches_plain_ddp(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    out = tmp_path / "result.json"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    r = json.loads(out.read_text())
    assert r["replicas_identical"], "AdaComp replicas diverged across ranks"
    assert r["step"] == DDP_STEPS and r["history"] == DDP_STEPS and r["resets"] == 0
    assert r["plain"] < 0.05, r  # training happened (initial MSE ~0.5)
    assert r["adacomp"] <= r["plain"] * (1 + DDP_REL_TOL), r
    # compression actually happened: Linear weights >= 100x, whole model >= 50x
    assert r["rates"]["linear_lstm"] >= 100.0, r
    assert r["rates"]["total"] >= 50.0, r
    dense_one_step = 4 * (32 * 128 + 128 + 128 * 128 + 128 + 128 + 1)
    assert r["warmup_bytes"] == dense_one_step
    assert r["bytes_sent"] < dense_one_step * DDP_STEPS / 20


# --------------------------------------------------------------------------
# its place in the package and the error tree
# --------------------------------------------------------------------------


def test_adacomp_is_loaded_only_when_used() -> None:
    """`import ncz.codec` (which loads ncz.models for its weights) and `import ncz.models` leave
    AdaComp unloaded, and with it torch.distributed wherever `import torch` alone does not load it
    (torch 2.13's does, so there only our modules can be checked); one of its names loads it."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "before = 'torch.distributed' in sys.modules\n"
        "import ncz.codec, ncz.models\n"
        "ours = sorted(m for m in sys.modules if m.startswith('ncz.models.adacomp'))\n"
        "assert not ours, ours\n"
        "assert before or 'torch.distributed' not in sys.modules\n"
        "from ncz.models import AdaCompWireError\n"
        "assert 'ncz.models.adacomp' not in sys.modules  # an error class needs no torch.distributed\n"
        "from ncz.models import register_adacomp\n"
        "assert 'ncz.models.adacomp.hook' in sys.modules and 'torch.distributed' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_errors_are_in_the_ncz_tree() -> None:
    assert issubclass(AdaCompWireError, FormatError) and issubclass(AdaCompWireError, ValueError)
    with pytest.raises(NczError):
        decode_message(b"\x07")
    with pytest.raises(UsageError):
        AdaCompCompressor().compress(torch.zeros(3), torch.zeros(4), 2)
    import ncz.models

    assert ncz.models.AdaCompWireError is AdaCompWireError
