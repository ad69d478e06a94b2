"""Quantized tensors (rowcol steps, step codes, index pairs), fast lossless paths, and the presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ncz.format as nf
from ncz.format import Codec, encode_payload
from ncz.models import Recipe, load_state_dict, pack
from ncz.models.quantized import (
    dequantize,
    pair_symbols,
    quantize,
    quantize_codes,
    step_codes,
    step_values,
    unpair_symbols,
)
from ncz.models.recipe import TENSOR_CLASSES, tiered
from ncz.models.representation import symbol_payload


def _recipe(**options) -> Recipe:
    return Recipe.from_dict({"rule": [{"pattern": "*", "representation": "quantized", **options}]})


def _rewrite(src, dst, change):
    """Copy an archive, letting ``change(info, reader, writer)`` write a section instead (True = handled)."""
    with nf.open(src) as reader, nf.Writer(dst, metadata=reader.metadata) as writer:
        for info in reader.sections:
            if not change(info, reader, writer):
                writer.add_stored(info.name, bytes(reader.stored(info.name)), decoded_length=info.decoded_length,
                                  kind=info.kind, codec=info.codec, params=info.params)


def _set_head_params(path, out, name, **params):
    def change(info, reader, writer):
        if info.name != name:
            return False
        merged = {k: v for k, v in info.params.items() if k not in params}
        merged.update({k: v for k, v in params.items() if v is not None})
        writer.add_stored(info.name, bytes(reader.stored(info.name)), decoded_length=info.decoded_length,
                          kind=info.kind, codec=info.codec, params=merged)
        return True

    _rewrite(path, out, change)


def _set_part(path, out, part, symbols: np.ndarray, shape):
    def change(info, reader, writer):
        if info.name != part:
            return False
        # constant symbols are too predictable for ANS (FORMAT.md §7.1): symbol_payload falls back to zstd
        writer.add_encoded(part, symbol_payload(symbols), kind=nf.Kind.PART,
                           params={"dtype": "int32", "shape": list(shape)})
        return True

    _rewrite(path, out, change)


def _set_sections(path, out, sections: dict):
    """Copy an archive with the sections named in ``sections`` re-encoded as ``(data, codec, params)``."""
    def change(info, reader, writer):
        if info.name not in sections:
            return False
        data, codec, params = sections[info.name]
        writer.add(info.name, data, kind=info.kind, codec=codec, params=params)
        return True

    _rewrite(path, out, change)


# --- step codes ------------------------------------------------------------------


def test_step_codes_are_a_fine_exact_grid():
    x = np.exp(np.random.default_rng(0).uniform(-20, 20, 10_000))
    codes = step_codes(x)
    values = step_values(codes)
    assert values.dtype == np.float32
    assert np.max(np.abs(values / x - 1)) <= 1 / 64 + 1e-6  # 5-bit mantissa: nearest within 1.6 %
    # exactly (32 + f)·2^(e−5), whatever the machine's libm
    e, f = codes >> 5, codes & 31
    assert np.array_equal(values.astype(np.float64), (32.0 + f) * 2.0 ** (e - 5.0))
    assert step_values(np.array([0], np.int32))[0] == 1.0


# --- rowcol --------------------------------------------------------------------


def test_rowcol_meets_error_and_round_trips(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(192, 256) * torch.logspace(-2, 0, 192)[:, None] * torch.logspace(-1, 0, 256)[None, :]
    path = tmp_path / "rc.ncz"
    report = pack({"w": w}, path, recipe=_recipe(rel_error=0.02, granularity="rowcol"))
    back = load_state_dict(path)["w"]
    err = float((back.double() - w.double()).norm() / w.double().norm())
    assert err <= 0.02 and err == pytest.approx(report.tensors[0].rel_error, rel=1e-9)
    with nf.open(path) as reader:
        assert reader.info("w").params["granularity"] == "rowcol"
        assert reader.info("w#colscale").params["shape"] == [1, 256]
    # the small-scale columns got small steps: their relative error is near the large columns'
    rel = ((back - w).pow(2).sum(0) / w.pow(2).sum(0)).sqrt()
    assert float(rel[:32].mean()) < 3 * float(rel[-32:].mean())


def test_rowcol_protects_an_outlier_input_feature():
    """A linear layer whose input has one huge feature (as after LayerNorm in transformers) and
    whose weights reading it are small: per-column steps cut the output error at equal bits."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((256, 128)).astype(np.float32)
    w[:, 7] *= 0.05  # the model learned small weights for the outlier feature
    x = rng.standard_normal((512, 128)).astype(np.float32)
    x[:, 7] *= 40.0
    y = x @ w.T
    errors = {}
    for granularity in ("channel", "rowcol"):
        q, steps, _ = quantize(w, bits=3.0, granularity=granularity)
        errors[granularity] = np.linalg.norm(x @ dequantize(q, steps, granularity).T - y) / np.linalg.norm(y)
    assert errors["rowcol"] < 0.75 * errors["channel"]


def test_rowcol_on_vectors_falls_back_to_channel(tmp_path):
    path = tmp_path / "v.ncz"
    pack({"v": torch.randn(5000)}, path, recipe=_recipe(rel_error=0.01, granularity="rowcol"))
    with nf.open(path) as reader:
        assert reader.info("v").params["granularity"] == "channel"


def test_bits_target_on_a_sampled_search():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((1024, 512)) * rng.uniform(0.5, 2, (1024, 1))).astype(np.float32)
    for bits in (1.5, 3.0, 5.0):
        result = quantize_codes(w, bits=bits, granularity="rowcol")
        p = np.bincount((result.q - result.q.min()).ravel()) / result.q.size
        p = p[p > 0]
        entropy = float(-(p * np.log2(p)).sum())
        assert bits - 0.05 < entropy <= bits


# --- index pairs ---------------------------------------------------------------


@pytest.mark.parametrize("count", [2_000_000, 2_000_001])
def test_pairs_round_trip_with_escapes(count):
    rng = np.random.default_rng(3)
    q = np.rint(rng.standard_normal(count) * 3).astype(np.int32)
    q[[5, 10, count - 1]] = [3000, -16383, 40]
    for k in (8, 64):
        assert np.array_equal(unpair_symbols(pair_symbols(q, k), k, count, "x"), q)


def test_large_tensor_is_paired_and_exact(tmp_path):
    torch.manual_seed(4)
    w = torch.randn(1 << 20 | 1)  # odd count: padded pair
    w[3] = 40.0  # an escaped pair
    path = tmp_path / "p.ncz"
    report = pack({"w": w}, path, recipe=_recipe(rel_error=0.2, granularity="tensor"))
    with nf.open(path) as reader:
        head = reader.info("w")
        assert head.params.get("pair") in (8, 16)
        assert reader.info("w#q").params["shape"] == [(w.numel() + 1) // 2]
    back = load_state_dict(path)["w"]
    assert float((back.double() - w.double()).norm() / w.double().norm()) == pytest.approx(
        report.tensors[0].rel_error, rel=1e-9)
    assert abs(float(back[3]) - 40.0) < 1.0


def test_hostile_pairs_are_refused(tmp_path):
    w = torch.randn(1 << 20 | 1)
    path = tmp_path / "p.ncz"
    pack({"w": w}, path, recipe=_recipe(rel_error=0.2, granularity="tensor"))
    with nf.open(path) as reader:
        k = reader.info("w").params["pair"]
        symbols = np.frombuffer(reader.read("w#q"), "<i4").copy()
    n = symbols.size
    bad = symbols.copy()
    bad[0] = k * k + 0  # escape of the pair (0, 0), which has a regular symbol
    _set_part(path, tmp_path / "a.ncz", "w#q", bad, [n])
    with pytest.raises(nf.FormatError, match="not canonical"):
        load_state_dict(tmp_path / "a.ncz")
    bad = symbols.copy()
    bad[-1] = (k // 2) * k + (k // 2 + 1)  # padding index 1
    _set_part(path, tmp_path / "b.ncz", "w#q", bad, [n])
    with pytest.raises(nf.FormatError, match="padding"):
        load_state_dict(tmp_path / "b.ncz")
    _set_part(path, tmp_path / "c.ncz", "w#q", symbols[:-1], [n - 1])
    with pytest.raises(nf.FormatError, match="pair symbols"):
        load_state_dict(tmp_path / "c.ncz")
    _set_head_params(path, tmp_path / "d.ncz", "w", pair=7)
    with pytest.raises(nf.FormatError, match="params.pair"):
        load_state_dict(tmp_path / "d.ncz")


def test_paired_indices_in_any_codec(tmp_path):
    w = torch.randn(1 << 20 | 1)
    path = tmp_path / "p.ncz"
    pack({"w": w}, path, recipe=_recipe(rel_error=0.2, granularity="tensor"))
    expected = load_state_dict(path)["w"]
    with nf.open(path) as reader:
        info = reader.info("w#q")
        assert info.codec == Codec.ANS
        q = reader.read("w#q")
    _set_sections(path, tmp_path / "raw.ncz", {"w#q": (q, Codec.RAW, info.params)})
    assert torch.equal(load_state_dict(tmp_path / "raw.ncz")["w"], expected)
    _set_sections(path, tmp_path / "u8.ncz", {"w#q": (q, Codec.RAW, {"dtype": "uint8", "shape": [len(q)]})})
    with pytest.raises(nf.FormatError, match="expected 'int32'"):
        load_state_dict(tmp_path / "u8.ncz")


def test_hostile_step_codes_are_refused(tmp_path):
    path = tmp_path / "s.ncz"
    pack({"w": torch.randn(64, 96)}, path, recipe=_recipe(rel_error=0.01, granularity="rowcol"))
    _set_head_params(path, tmp_path / "a.ncz", "w", step_base="1.0")
    with pytest.raises(nf.FormatError, match="step_base"):
        load_state_dict(tmp_path / "a.ncz")
    _set_head_params(path, tmp_path / "b.ncz", "w", step_base=-1.0)
    with pytest.raises(nf.FormatError, match="step_base"):
        load_state_dict(tmp_path / "b.ncz")
    _set_part(path, tmp_path / "c.ncz", "w#step", np.full((64, 1), 61 * 32, np.int32), [64, 1])
    with pytest.raises(nf.FormatError, match="step codes"):
        load_state_dict(tmp_path / "c.ncz")
    _set_part(path, tmp_path / "d.ncz", "w#colscale", np.zeros((1, 95), np.int32), [1, 95])
    with pytest.raises(nf.FormatError, match="column scales"):
        load_state_dict(tmp_path / "d.ncz")


def test_float32_steps_still_decode(tmp_path):
    """Files whose #step part holds float32 steps (no step_base) decode as before."""
    w = torch.randn(32, 48)
    path = tmp_path / "s.ncz"
    pack({"w": w}, path, recipe=_recipe(rel_error=0.01, granularity="channel"))
    with nf.open(path) as reader:
        base = np.float32(reader.info("w").params["step_base"])
        steps = step_values(np.frombuffer(reader.read("w#step"), "<i4").reshape(32, 1)) * base
    expected = load_state_dict(path)["w"]

    def change(info, reader, writer):
        if info.name == "w#step":
            writer.add_encoded("w#step", encode_payload(steps.astype("<f4").tobytes(), Codec.RAW), kind=nf.Kind.PART,
                               params={"dtype": "float32", "shape": [32, 1]})
            return True
        return False

    _rewrite(path, tmp_path / "f.ncz", change)
    _set_head_params(tmp_path / "f.ncz", tmp_path / "g.ncz", "w", step_base=None)
    assert torch.equal(load_state_dict(tmp_path / "g.ncz")["w"], expected)


# --- lossless --------------------------------------------------------------------


def test_lossless_large_structured_tensor_is_exact_and_compressed(tmp_path):
    # low mantissa bytes zero (values from a lower precision): zstd / ANS must find it
    w = torch.randn(300, 1024).to(torch.bfloat16).float()
    path = tmp_path / "l.ncz"
    report = pack({"w": w}, path, recipe="lossless")
    back = load_state_dict(path)["w"]
    assert torch.equal(back.view(torch.int32), w.view(torch.int32))
    assert report.tensors[0].stored_bytes < 0.5 * w.numel() * 4


def test_byte_planes_in_any_codec_and_out_of_range_symbols(tmp_path):
    torch.manual_seed(3)
    w = torch.randn(64, 64) * 0.02
    path = tmp_path / "l.ncz"
    pack({"w": w}, path, recipe="lossless")
    with nf.open(path) as reader:
        assert reader.info("w").kind == nf.Kind.BYTE_PLANES
        assert reader.info("w#p3").codec == Codec.ANS
        planes = [np.frombuffer(reader.read(f"w#p{k}"), "<i4" if reader.info(f"w#p{k}").params["dtype"] == "int32"
                                else np.uint8).astype(np.int32) for k in range(4)]
    n = w.numel()

    def part(values, codec, dtype="int32"):
        data = np.asarray(values, "<i4" if dtype == "int32" else np.uint8).tobytes()
        return data, codec, {"dtype": dtype, "shape": [n]}

    # the planes as ANS, RANGE, raw int32 and zstd uint8: the same tensor
    codecs = [(Codec.ANS, "int32"), (Codec.RANGE, "int32"), (Codec.RAW, "int32"), (Codec.ZSTD, "uint8")]
    _set_sections(path, tmp_path / "any.ncz", {f"w#p{k}": part(planes[k], *codecs[k]) for k in range(4)})
    assert torch.equal(load_state_dict(tmp_path / "any.ncz")["w"].view(torch.int32), w.view(torch.int32))
    for bad in (256, -1, 2**31 - 1):
        for codec in (Codec.ANS, Codec.RAW):
            values = planes[3].copy()
            values[5] = bad
            _set_sections(path, tmp_path / "bad.ncz", {"w#p3": part(values, codec)})
            with pytest.raises(nf.FormatError, match="outside 0..255"):
                load_state_dict(tmp_path / "bad.ncz")
    _set_sections(path, tmp_path / "short.ncz", {"w#p3": (np.asarray(planes[3][:-1], "<i4").tobytes(), Codec.ANS,
                                                          {"dtype": "int32", "shape": [n - 1]})})
    with pytest.raises(nf.FormatError, match=f"expected {n}"):
        load_state_dict(tmp_path / "short.ncz")


# --- presets ---------------------------------------------------------------------


@pytest.mark.parametrize("name,expected", [
    ("embeddings.word_embeddings.weight", "token_embedding"),
    ("model.embed_tokens.weight", "token_embedding"),
    ("transformer.wte.weight", "token_embedding"),
    ("embeddings.position_embeddings.weight", "position_embedding"),
    ("encoder.layer.3.attention.self.key.weight", "attention_qk"),
    ("model.layers.0.self_attn.q_proj.weight", "attention_qk"),
    ("encoder.layer.3.attention.self.value.weight", "attention_v"),
    ("encoder.layer.3.attention.output.dense.weight", "attention_out"),
    ("model.layers.0.self_attn.o_proj.weight", "attention_out"),
    ("encoder.layer.3.intermediate.dense.weight", "ffn_in"),
    ("model.layers.0.mlp.gate_proj.weight", "ffn_in"),
    ("encoder.layer.3.output.dense.weight", "ffn_out"),
    ("model.layers.0.mlp.down_proj.weight", "ffn_out"),
    ("transformer.h.0.mlp.c_proj.weight", "ffn_out"),
    ("pooler.dense.weight", "other"),
])
def test_presets_classify_generic_names(name, expected):
    classes = [c for c, _, _ in TENSOR_CLASSES]
    recipe = Recipe.from_dict(tiered({c: (i + 1) / 1000 for i, c in enumerate(classes)}))
    rule = recipe.choose(name, torch.zeros(512, 512))
    assert rule.representation == "quantized"
    assert classes[round(rule.options["rel_error"] * 1000) - 1] == expected


def test_presets_keep_small_tensors_exact_and_order_errors(tmp_path):
    torch.manual_seed(5)
    sd = {"embeddings.word_embeddings.weight": torch.randn(600, 64) * 0.05,
          "encoder.layer.0.attention.self.value.weight": torch.randn(64, 64) * 0.1,
          "encoder.layer.0.intermediate.dense.weight": torch.randn(256, 64) * 0.1,
          "encoder.layer.0.output.dense.weight": torch.randn(64, 256) * 0.1,
          "encoder.layer.0.output.dense.bias": torch.randn(64)}
    errors = {}
    for preset in ("q8", "q4", "small"):
        report = pack(sd, tmp_path / f"{preset}.ncz", recipe=preset)
        errors[preset] = {t.name: t.rel_error for t in report.tensors}
        assert errors[preset]["encoder.layer.0.output.dense.bias"] == 0.0
        back = load_state_dict(tmp_path / f"{preset}.ncz")
        assert torch.equal(back["encoder.layer.0.output.dense.bias"], sd["encoder.layer.0.output.dense.bias"])
    for name in sd:
        if "bias" not in name:
            assert errors["q8"][name] < errors["q4"][name] < errors["small"][name]
    # the token-embedding table tolerates more error than the attention values
    assert errors["q8"]["embeddings.word_embeddings.weight"] > 3 * errors["q8"][
        "encoder.layer.0.attention.self.value.weight"]


def test_tiered_rejects_unknown_classes():
    with pytest.raises(nf.UsageError, match="unknown tensor classes"):
        tiered({"attention": 0.01})


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group", "rowcol"])
def test_quantized_odd_shapes_round_trip(tmp_path, granularity):
    torch.manual_seed(6)
    sd = {"empty_rows": torch.zeros(0, 8), "empty_cols": torch.zeros(3, 0), "zeros": torch.zeros(4, 8),
          "scalar": torch.tensor(3.0), "row": torch.randn(1, 8), "vector": torch.randn(7),
          "conv": torch.randn(3, 8, 2, 2).half()}
    path = tmp_path / "o.ncz"
    report = pack(sd, path, recipe=_recipe(rel_error=0.01, granularity=granularity, group_size=4))
    back = load_state_dict(path)
    for t in report.tensors:
        original, restored = sd[t.name], back[t.name]
        assert restored.shape == original.shape and restored.dtype == original.dtype
        assert t.rel_error <= 0.01
        if original.numel() and float(original.double().norm()) > 0:
            assert float((restored.double() - original.double()).norm() / original.double().norm()) <= 0.0101
        else:
            assert torch.equal(restored, original)
