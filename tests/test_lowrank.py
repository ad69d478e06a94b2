"""Low-rank representation (BSR): error bounds, joint rank selection, compact modules, hostile archives."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import ncz.format as nf
from ncz.models import Recipe, describe, load_into, load_state_dict, pack
from ncz.models.lowrank import (
    LowRankConv2d,
    LowRankLinear,
    break_even_rank,
    encode_lowrank,
    ranks_proxy,
    select_ranks,
    stable_rank_penalty,
    uniform_ranks,
)
from ncz.models.lowrank.plan import plan_lowrank
from ncz.models.representation import relative_error


def _low_rank(m: int, n: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) / math.sqrt(r)


def _spectrum(m: int, n: int, s: np.ndarray, seed: int) -> torch.Tensor:
    """A matrix with exactly the singular values ``s``."""
    g = torch.Generator().manual_seed(seed)
    k = len(s)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    return (u * torch.from_numpy(s)) @ v.T


def _roundtrip(tmp_path, tensors: dict, recipe) -> tuple[dict, object]:
    path = tmp_path / "m.ncz"
    report = pack(tensors, path, recipe=recipe)
    return load_state_dict(path), report


def _rule(rank=None, **options) -> Recipe:
    opts = dict(options)
    if rank is not None:
        opts["rank"] = rank
    return Recipe.from_dict({"rule": [{"pattern": "w*", "representation": "lowrank", **opts},
                                      {"pattern": "*", "representation": "lossless"}]})


# --------------------------------------------------------------------------- encoder / decoder


@pytest.mark.parametrize("factor_rel_error", [0.01, 0.001])
def test_exact_rank_reconstructs_to_quantization_error(tmp_path, factor_rel_error):
    w = _low_rank(96, 160, 8)
    back, report = _roundtrip(tmp_path, {"w": w}, _rule(8, factor_rel_error=factor_rel_error))
    err = relative_error(w, back["w"])
    # only quantization is left: each factor adds ≤ factor_rel_error, so ≈ √2·f in total
    assert err <= 1.6 * factor_rel_error
    assert err >= 0.3 * factor_rel_error  # it really is quantized, not stored exactly
    assert abs(report.tensors[0].rel_error - err) < 1e-4  # the recorded error is the real one
    head = describe(tmp_path / "m.ncz")[0]
    assert head.representation == "low_rank"
    assert head.stored_bytes < 0.2 * w.numel() * 4  # 8·(96+160) numbers at a few bits each
    with nf.open(tmp_path / "m.ncz") as reader:
        params = reader.info("w").params
        assert params["rank"] == 8 and params["view"] == [96, 160] and params["shape"] == [96, 160]
        assert reader.info("w#u").params["shape"] == [96, 8] and reader.info("w#v").params["shape"] == [8, 160]
        assert reader.info("w#u").codec == nf.Codec.ANS and reader.info("w#u_step").params["dtype"] == "float32"


def test_truncation_error_is_optimal_at_fine_quantization():
    w = _spectrum(64, 80, np.linspace(2.0, 0.1, 64), seed=3).float()
    for rank in (4, 16, 40):
        s = torch.linalg.svdvals(w.double())
        optimal = float(s[rank:].norm() / s.norm())  # Eckart–Young
        err = encode_lowrank("w", w, rank=rank, factor_rel_error=1e-4).rel_error
        assert optimal <= err <= optimal * 1.001 + 1e-4


@pytest.mark.parametrize("target", [0.02, 0.05, 0.1, 0.3])
@pytest.mark.parametrize("kind", ["random", "structured"])
def test_rel_error_bound_holds(tmp_path, target, kind):
    torch.manual_seed(7)
    if kind == "random":
        w = torch.randn(128, 96) * 0.02
    else:  # low-rank signal + 1 % noise: what trained layers look like
        w = _low_rank(128, 96, 6, seed=2)
        w = w + 0.01 * w.std() * torch.randn_like(w)
    back, report = _roundtrip(tmp_path, {"w": w}, _rule(rel_error=target))
    err = relative_error(w, back["w"])
    assert err <= target + 1e-6
    assert abs(report.tensors[0].rel_error - err) < 1e-5
    if kind == "structured" and target >= 0.02:
        # the signal is rank 6: factors win and the rank found is about that
        assert report.tensors[0].representation == "lowrank"
        with nf.open(tmp_path / "m.ncz") as reader:
            assert 4 <= reader.info("w").params["rank"] <= 8
        quantized = pack({"w": w}, tmp_path / "q.ncz", recipe=Recipe.from_dict(
            {"rule": [{"pattern": "*", "representation": "quantized", "rel_error": target}]}))
        assert report.file_bytes < 0.5 * quantized.file_bytes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_and_conv_kernels(tmp_path, dtype):
    conv = _low_rank(32, 16 * 9, 5, seed=4).reshape(32, 16, 3, 3).to(dtype)
    back, report = _roundtrip(tmp_path, {"w_conv": conv, "bias": torch.ones(3)}, _rule(5, factor_rel_error=0.003))
    assert back["w_conv"].dtype == dtype and back["w_conv"].shape == conv.shape
    err = relative_error(conv, back["w_conv"])
    assert err <= 0.006 + (0.004 if dtype == torch.bfloat16 else 0.0)
    assert abs(report.tensors[0].rel_error - err) < 1e-5
    assert torch.equal(back["bias"], torch.ones(3))


def test_encoder_edge_cases():
    w = _low_rank(20, 30, 3)
    with pytest.raises(nf.UsageError, match="exactly one"):
        encode_lowrank("w", w)
    with pytest.raises(nf.UsageError, match="rank must be"):
        encode_lowrank("w", w, rank=21)
    with pytest.raises(nf.UsageError, match="rank must be"):
        encode_lowrank("w", w, rank=0)
    with pytest.raises(nf.UsageError):
        encode_lowrank("w", torch.arange(12).reshape(3, 4), rank=1)
    assert encode_lowrank("b", torch.randn(7), rank=1).representation == "lossless"  # nothing to factor
    zero = encode_lowrank("z", torch.zeros(16, 16), rel_error=0.1, fallback=False)
    assert zero.rel_error == 0.0
    # deterministic
    a, b = (encode_lowrank("w", w, rank=3) for _ in range(2))
    assert [s.payload.stored for s in a.sections] == [s.payload.stored for s in b.sections]


# --------------------------------------------------------------------------- rank selection


def _spectra_case() -> dict[str, torch.Tensor]:
    """Three layers with very different spectra: fast decay, flat, slow decay."""
    k = np.arange(64)
    return {
        "fast": _spectrum(64, 96, np.exp(-k / 4.0), 1).float(),
        "flat": _spectrum(64, 64, 1.0 - 0.5 * k / 64, 2).float(),
        "slow": _spectrum(80, 64, 1.0 / (1 + k), 3).float(),
    }


def _params(weights, ranks) -> int:
    total = 0
    for name, w in weights.items():
        m, n = w.shape[0], w[0].numel()
        total += m * n if ranks[name] >= min(m, n) else ranks[name] * (m + n)
    return total


@pytest.mark.parametrize("ratio, margin", [(1.5, 0.1), (2.0, 0.2), (3.0, 0.6), (4.0, 0.95), (8.0, 1.0)])
def test_beam_search_meets_budget_and_beats_uniform(ratio, margin):
    weights = _spectra_case()
    dense = sum(w.numel() for w in weights.values())
    ranks = select_ranks(weights, ratio)
    assert _params(weights, ranks) <= dense / ratio
    assert _params(weights, ranks) >= 0.97 * dense / ratio  # the budget is used, not wasted
    uniform = uniform_ranks(weights, ratio)
    assert _params(weights, uniform) <= dense / ratio
    beam, base = ranks_proxy(weights, ranks), ranks_proxy(weights, uniform)
    # the flat layer should keep most of its ranks, the fast-decaying ones give theirs up
    assert beam < margin * base, (ranks, uniform, beam, base)


def test_beam_search_is_near_the_exhaustive_optimum():
    weights = {"a": _spectrum(24, 32, np.exp(-np.arange(24) / 3.0), 4).float(),
               "b": _spectrum(16, 40, np.linspace(1, 0.3, 16), 5).float(),
               "c": _spectrum(32, 32, 1 / np.sqrt(1 + np.arange(32)), 6).float()}
    ratio = 3.0
    dense = sum(w.numel() for w in weights.values())
    choices = {}
    for name, w in weights.items():
        m, n = w.shape
        choices[name] = list(range(1, break_even_rank(m, n) + 1)) + [min(m, n)]
    best = math.inf
    for combo in itertools.product(*choices.values()):
        ranks = dict(zip(weights, combo))
        if _params(weights, ranks) <= dense / ratio:
            best = min(best, ranks_proxy(weights, ranks))
    found = select_ranks(weights, ratio, beam_width=4)
    assert ranks_proxy(weights, found) <= 1.02 * best + 1e-12


def test_beam_search_options():
    weights = _spectra_case()
    calls = []

    def proxy(ranks):
        calls.append(1)
        return ranks_proxy(weights, ranks)

    # a task proxy (here the same numbers, opaque to the search): the beam alone decides
    beam_only = select_ranks(weights, 3.0, proxy=proxy, steps=32)
    assert 0 < len(calls) < 3 * 32 * 4 * 3
    dense = sum(w.numel() for w in weights.values())
    assert _params(weights, beam_only) <= dense / 3.0
    built_in = select_ranks(weights, 3.0)
    assert ranks_proxy(weights, built_in) <= ranks_proxy(weights, beam_only) <= 1.1 * ranks_proxy(weights, built_in)
    assert ranks_proxy(weights, beam_only) < 0.7 * ranks_proxy(weights, uniform_ranks(weights, 3.0))
    # sensitivity steers ranks toward the layer that matters
    plain = select_ranks(weights, 3.0)
    heavy = select_ranks(weights, 3.0, sensitivity={"slow": 10.0})
    assert heavy["slow"] > plain["slow"]
    # ratio 1 keeps everything dense; a layer that cannot save stays dense
    assert select_ranks(weights, 1.0) == {n: min(w.shape[0], w[0].numel()) for n, w in weights.items()}
    tiny = dict(weights, thin=torch.randn(1, 50))
    assert select_ranks(tiny, 2.0)["thin"] == 1  # full rank of a 1×50 matrix = dense
    with pytest.raises(nf.UsageError, match="out of reach"):
        select_ranks(weights, 1000.0)
    with pytest.raises(nf.UsageError):
        select_ranks(weights, 0.5)
    with pytest.raises(nf.UsageError):
        select_ranks({"b": torch.randn(5)}, 2.0)


# --------------------------------------------------------------------------- whole models, compact modules


class _Net(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(4, 24, 3, padding=1, stride=2)
        self.fc1 = nn.Linear(24 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 96)
        self.head = nn.Linear(96, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _trained_like(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict whose big weights have decaying spectra (like trained layers)."""
    net = _Net(seed)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    for name in ("conv.weight", "fc1.weight", "fc2.weight"):
        w = sd[name]
        m, n = w.shape[0], w[0].numel()
        k = min(m, n)
        sd[name] = (_spectrum(m, n, 0.5 * np.exp(-np.arange(k) / 6.0), seed + len(name)).float()).reshape(w.shape)
    return sd


def test_plan_pack_load_into_swaps_modules(tmp_path):
    sd = _trained_like()
    plan = plan_lowrank(sd, 4.0, min_numel=1000, factor_rel_error=0.002)
    lowrank_rules = [r for r in plan.rules if r.representation == "lowrank"]
    assert {r.pattern for r in lowrank_rules} <= {"conv.weight", "fc1.weight", "fc2.weight"}
    assert len(lowrank_rules) >= 2
    path = tmp_path / "net.ncz"
    pack(sd, path, recipe=plan)
    dense = _Net(1)
    dense.load_state_dict(load_state_dict(path))
    compact = _Net(2)  # a different initialization: everything must come from the archive
    report = load_into(compact, path, factorized=True)
    assert set(report.factorized) == {r.pattern.rsplit(".", 1)[0] for r in lowrank_rules}
    assert isinstance(compact.fc1, LowRankLinear) == ("fc1" in report.factorized)
    if "conv" in report.factorized:
        assert isinstance(compact.conv, LowRankConv2d)
    assert report.parameter_bytes_after < 0.6 * report.parameter_bytes_before
    x = torch.randn(5, 4, 8, 8)
    with torch.no_grad():
        out_dense, out_compact = dense(x), compact(x)
    assert torch.allclose(out_dense, out_compact, atol=1e-5, rtol=1e-4)
    # and both are close to the original network (≤ a few % error in the weights)
    original = _Net(3)
    original.load_state_dict(sd)
    with torch.no_grad():
        ref = original(x)
    assert float((out_compact - ref).norm() / ref.norm()) < 0.1


def test_lowrank_linear_matches_dense_decoded_layer(tmp_path):
    w = _low_rank(48, 70, 6, seed=9)
    path = tmp_path / "l.ncz"
    pack({"lin.weight": w, "lin.bias": torch.randn(48)}, path,
         recipe=Recipe.from_dict({"rule": [{"pattern": "*.weight", "representation": "lowrank", "rank": 6},
                                           {"pattern": "*", "representation": "lossless"}]}))
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(70, 48))
    report = load_into(model, path)
    assert report.factorized == ["lin"] and isinstance(model.lin, LowRankLinear)
    assert model.lin.u.shape == (48, 6) and model.lin.v.shape == (6, 70)
    decoded = load_state_dict(path)
    x = torch.randn(9, 70)
    with torch.no_grad():
        expected = x @ decoded["lin.weight"].T + decoded["lin.bias"]
        assert torch.allclose(model(x), expected, atol=1e-5)
        assert torch.allclose(model.lin.weight, decoded["lin.weight"], atol=1e-6)
    assert report.parameter_bytes_after == 4 * (6 * (48 + 70) + 48)


def test_plan_escapes_names_and_uses_fallback():
    sd = {"blk[0].w": _low_rank(64, 64, 2), "blk[1].w": _low_rank(64, 64, 40), "norm": torch.ones(64)}
    plan = plan_lowrank(sd, 3.0, min_numel=100, fallback="q8")
    rules = {r.pattern: r for r in plan.rules}
    assert "blk[[]0[]].w" in rules
    rule = plan.choose("blk[0].w", sd["blk[0].w"])
    assert rule.representation == "lowrank" and 1 <= rule.options["rank"] <= 20
    assert plan.choose("blk[9].w", sd["blk[0].w"]).representation != "lowrank"
    assert plan.choose("norm", sd["norm"]).representation == "lossless"  # q8's own last rule


# --------------------------------------------------------------------------- hostile archives


def _rewrite(src, dst, *, params=None, replace=None, drop=()):
    """Copy an archive, changing the head's params and/or replacing parts with new (payload, params)."""
    replace = replace or {}
    with nf.open(src) as reader, nf.Writer(dst, metadata=reader.metadata) as w:
        for info in reader.sections:
            if info.name in drop:
                continue
            if info.name in replace:
                payload, part_params = replace[info.name]
                w.add_encoded(info.name, payload, kind=nf.Kind.PART, params=part_params)
                continue
            p = dict(info.params)
            if info.name == "w" and params:
                p.update(params)
            w.add_stored(info.name, bytes(reader.stored(info.name)), decoded_length=info.decoded_length,
                         kind=info.kind, codec=info.codec, params=p)


def test_hostile_archives(tmp_path):
    src = tmp_path / "ok.ncz"
    pack({"w": _low_rank(12, 20, 3)}, src, recipe=_rule(3))
    load_state_dict(src)
    bad = tmp_path / "bad.ncz"
    cases = [
        ({"rank": 13}, "params.rank"),  # larger than min(12, 20)
        ({"rank": 0}, "params.rank"),
        ({"rank": True}, "params.rank"),
        ({"rank": 2}, "has shape"),  # parts hold rank 3
        ({"view": [20, 12]}, "params.view"),
        ({"dtype": "int32"}, "float dtype"),
        ({"shape": [12, 4, 5], "view": [12, 20]}, None),  # a consistent reshape is fine
    ]
    for params, message in cases:
        _rewrite(src, bad, params=params)
        if message is None:
            assert load_state_dict(bad)["w"].shape == (12, 4, 5)
            continue
        with pytest.raises(nf.FormatError, match=message):
            load_state_dict(bad)
    # a part with the wrong shape (a fourth column), a missing part, non-finite steps, overflow
    wide = nf.encode_payload(np.zeros((12, 4), "<i4").tobytes(), nf.Codec.ZSTD)  # constant: too dense for ANS
    _rewrite(src, bad, replace={"w#u": (wide, {"dtype": "int32", "shape": [12, 4]})})
    with pytest.raises(nf.FormatError, match=r"w#u.*shape \[12, 4\], expected \[12, 3\]"):
        load_state_dict(bad)
    floats = nf.encode_payload(np.zeros((12, 3), "<f4").tobytes(), nf.Codec.RAW)
    _rewrite(src, bad, replace={"w#u": (floats, {"dtype": "float32", "shape": [12, 3]})})
    with pytest.raises(nf.FormatError, match="dtype"):
        load_state_dict(bad)
    _rewrite(src, bad, drop={"w#v_step"})
    with pytest.raises(nf.FormatError, match="lacks its part"):
        load_state_dict(bad)
    nan = nf.encode_payload(np.array([1.0, np.nan, 1.0], "<f4").tobytes(), nf.Codec.RAW)
    _rewrite(src, bad, replace={"w#v_step": (nan, {"dtype": "float32", "shape": [3]})})
    with pytest.raises(nf.FormatError, match="non-finite"):
        load_state_dict(bad)
    huge = nf.encode_payload(np.full(3, 3e38, "<f4").tobytes(), nf.Codec.RAW)
    _rewrite(src, bad, replace={"w#u_step": (huge, {"dtype": "float32", "shape": [3]})})
    with pytest.raises(nf.FormatError, match="overflow|non-finite"):
        load_state_dict(bad)
    # the compact-module path validates the same way, and checks the owner's shape
    _rewrite(src, bad, params={"rank": 13})
    with pytest.raises(nf.FormatError, match="params.rank"):
        _build(bad, nn.Linear(20, 12))
    with pytest.raises(nf.InputError, match="expects"):
        _build(src, nn.Linear(12, 20))
    assert isinstance(_build(src, nn.Linear(20, 12)), LowRankLinear)


def _build(path, owner: nn.Module) -> nn.Module:
    """What load_into does with the head "w" for an owner module."""
    from ncz.models import registry

    with nf.open(path) as reader:
        head = reader.info("w")
        return registry.for_kind(head.kind).build_module(head, reader, owner)


# --------------------------------------------------------------------------- compression-friendly training


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Conv1d(32, 16, 1))


def test_stable_rank_penalty_values_and_gradient():
    model = _mlp()
    exact = stable_rank_penalty(model, 0.25, method="svd")
    for _ in range(5):
        power = stable_rank_penalty(model, 0.25, iterations=10)
    assert abs(power.item() - exact.item()) < 1e-2 * exact.item()  # subspace iteration, small gaps
    # r = 0 is the plain stable rank ‖W‖_F²/‖W‖_2² averaged over the layers
    layers = [model[0].weight, model[2].weight, model[4].weight.reshape(16, 32)]
    with torch.no_grad():
        plain = np.mean([float(w.norm() ** 2 / torch.linalg.matrix_norm(w, 2) ** 2) for w in layers])
    assert abs(stable_rank_penalty(model, method="svd").item() - plain) < 1e-4 * plain
    # zero on weights of rank ≤ r; only named layers count
    with torch.no_grad():
        model[0].weight.copy_(_low_rank(64, 40, 5))
    assert stable_rank_penalty(model, {"0.weight": 5}, method="svd").item() < 1e-10
    assert stable_rank_penalty(model, {"0.weight": 5}, iterations=20).item() < 1e-6
    # gradient: 2·W(I − QQᵀ)/σ_1² with σ_1 a constant (stop-gradient)
    w = model[2].weight
    with torch.no_grad():
        w.copy_(_spectrum(32, 64, np.r_[[3.0, 2.0, 1.5, 1.0], np.linspace(0.4, 0.01, 28)], seed=8).float())
    model.zero_grad()
    stable_rank_penalty(model, {"2.weight": 4}, iterations=30).backward()
    u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
    tail = (u[:, 4:] * s[4:]) @ vh[4:]
    expected = 2 * tail / s[0] ** 2
    assert torch.allclose(w.grad.double(), expected, atol=1e-4 * float(expected.abs().max()))


def test_stable_rank_penalty_covers_lstm_and_embedding_matrices():
    """An LSTM keeps its matrices as ``weight_ih_l0``/``weight_hh_l0`` parameters, not Linear layers, and
    plan_lowrank factorizes embedding tables: the penalty reaches both under their state-dict names."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"embedding": nn.Embedding(50, 12), "lstm": nn.LSTM(12, 8, 2)})
    names = ["embedding.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1", "lstm.weight_hh_l1"]
    ranks = {name: 3 for name in names}
    params = dict(model.named_parameters())
    with torch.no_grad():
        expected = np.mean([float((s[3:] ** 2).sum() / s[0] ** 2)
                            for s in (torch.linalg.svdvals(params[n].double()) for n in names)])
    assert abs(stable_rank_penalty(model, ranks, method="svd").item() - expected) < 1e-4 * expected
    for _ in range(5):
        power = stable_rank_penalty(model, ranks, iterations=20)
    assert abs(power.item() - expected) < 1e-2 * expected
    power.backward()
    assert all(params[n].grad is not None and float(params[n].grad.abs().sum()) > 0 for n in names)
    assert params["lstm.bias_ih_l0"].grad is None  # vectors are not factorized


def test_penalty_removes_the_tail_and_keeps_the_head():
    """Descending the penalty alone: the energy beyond rank r vanishes, the top-r part stays put.

    With the gradient through σ_1² as well (detach_sigma=False) the ratio also falls by
    inflating σ_1 — the failure mode the stop-gradient avoids (see bench/stable_rank.py).
    """
    def descend(detach: bool) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(48, 64, bias=False))
        start = model[0].weight.detach().clone()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(60):
            opt.zero_grad()
            stable_rank_penalty(model, {"0.weight": 6}, detach_sigma=detach).backward()
            opt.step()
        return start, model[0].weight.detach().clone()

    def parts(w):
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        return (u[:, :6] * s[:6]) @ vh[:6], s

    start, end = descend(True)
    head0, s0 = parts(start)
    head1, s1 = parts(end)
    assert float((s1[6:] ** 2).sum() / s1[0] ** 2) < 0.05 * float((s0[6:] ** 2).sum() / s0[0] ** 2)
    assert float((head1 - head0).norm() / head0.norm()) < 0.05
    _, naive = descend(False)
    _, s2 = parts(naive)
    assert float(s2[0]) > 1.1 * float(s0[0])  # the naive gradient inflates σ_1
    assert float(s1[0]) < 1.02 * float(s0[0])
