"""Byte indices (``fast_decode``, FORMAT.md §5.4, format 1.2): the same tensors as ANS, a different layout.

The indices an encoder chooses do not depend on how ``#q`` is stored, so an archive packed with
``fast_decode`` must decode to exactly the tensors of the ANS archive, whatever the dtype, shape,
granularity or outliers (escapes). Hostile byte-index parts fail with one clear error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ncz.format as nf
from ncz.models import Recipe, load_state_dict, pack
from ncz.tools.cli import main


def _recipe(options: dict, fast: bool) -> Recipe:
    recipe = Recipe.from_dict({"rule": [{"pattern": "*", "representation": "quantized", **options}]}, "t")
    return recipe.with_fast_decode() if fast else recipe


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _pack_both(tmp_path, tensors: dict[str, torch.Tensor], options: dict):
    ans, fast = tmp_path / "ans.ncz", tmp_path / "fast.ncz"
    pack(tensors, ans, recipe=_recipe(options, False))
    pack(tensors, fast, recipe=_recipe(options, True))
    return ans, fast


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), outliers=st.integers(0, 6),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       granularity=st.sampled_from(["tensor", "channel", "rowcol", "group"]),
       rel_error=st.sampled_from([0.002, 0.01, 0.1]), seed=st.integers(0, 2**16))
def test_byte_indices_decode_to_the_ans_tensors(tmp_path, rows, cols, outliers, dtype, granularity, rel_error, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    flat = w.view(-1)
    flat[torch.randint(flat.numel(), (outliers,), generator=g)] *= 300.0  # escapes at fine steps
    ans, fast = _pack_both(tmp_path, {"w": w.to(dtype)}, {"rel_error": rel_error, "granularity": granularity})
    a, b = load_state_dict(ans)["w"], load_state_dict(fast)["w"]
    assert a.dtype == b.dtype == dtype and _bits(a) == _bits(b)


def test_escapes_and_sizes_on_a_large_tensor(tmp_path):
    """Outliers go to #qx; the archive is within a few percent of ANS and decodes identically."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 1024, generator=g)
    w[::97, ::13] *= 40  # heavy tails: some indices beyond ±127 at this error
    ans, fast = _pack_both(tmp_path, {"w": w}, {"rel_error": 0.004, "granularity": "tensor"})
    with nf.open(fast) as reader:
        names = [s.name for s in reader.sections]
        q, qx = reader.info("w#q"), reader.info("w#qx")
        assert q.params["dtype"] == "int8" and q.codec == nf.Codec.ZSTD and "pair" not in reader.info("w").params
        assert 0 < qx.params["shape"][0] < w.numel() // 32
    assert "w#qx" in names and fast.stat().st_size < 1.05 * ans.stat().st_size
    assert torch.equal(load_state_dict(ans)["w"], load_state_dict(fast)["w"])


def test_too_many_escapes_stay_ans(tmp_path):
    w = torch.linspace(-1, 1, 64 * 64).reshape(64, 64)  # uniform: at a fine step most indices exceed ±127
    fast = tmp_path / "f.ncz"
    pack({"w": w}, fast, recipe=_recipe({"rel_error": 0.0005, "granularity": "tensor"}, True))
    with nf.open(fast) as reader:
        assert reader.info("w#q").params["dtype"] == "int32" and "w#qx" not in [s.name for s in reader.sections]


def test_calibrated_whole_tensor_path(tmp_path):
    """The calibrated (whole-tensor) encoder writes byte indices too."""
    from ncz.models.quantized.format import encode_quantized

    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(3))
    encoded = encode_quantized("w", w.to(torch.float64).to(torch.float32), rel_error=0.01, fast_decode=True,
                               granularity="channel")
    q = next(s for s in encoded.sections if s.name == "w#q")
    assert q.params["dtype"] == "int8"
    with pytest.raises(nf.UsageError, match="fast_decode"):
        encode_quantized("w", w, rel_error=0.01, fast_decode="yes")


def test_cli_fast_decode(tmp_path, capsys):
    src = tmp_path / "m.pt"
    torch.save({"w": torch.randn(128, 128)}, src)
    assert main(["pack", str(src), "-o", str(tmp_path / "m.ncz"), "--preset", "q8", "--fast-decode"]) == 0
    assert "q8+fast-decode" in capsys.readouterr().out
    with pytest.raises(nf.UsageError, match="fast_decode"):
        Recipe.from_dict({"rule": [{"pattern": "*", "representation": "quantized", "bits": 3.0,
                                    "fast_decode": 1}]})


# --- hostile byte-index parts -------------------------------------------------------------------

def _rewrite(src, dst, change):
    """Copy archive ``src`` to ``dst`` with ``change(name, info, decoded bytes) -> (bytes, params) | None``."""
    with nf.open(src) as reader, nf.Writer(dst, metadata=reader.metadata) as w:
        for info in reader.sections:
            data, params = bytes(reader.read(info.name)), dict(info.params)
            changed = change(info.name, info, data)
            if changed is False:
                continue
            if changed is not None:
                data, params = changed
            codec = nf.Codec.RAW if info.codec in (nf.Codec.ANS, nf.Codec.RANGE) and changed is not None \
                else info.codec
            if codec in (nf.Codec.ANS, nf.Codec.RANGE):
                w.add_stored(info.name, bytes(reader.stored(info.name)), decoded_length=info.decoded_length,
                             kind=info.kind, codec=info.codec, params=params)
            else:
                w.add(info.name, data, kind=info.kind, codec=codec, params=params)


@pytest.fixture
def escaped(tmp_path):
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    w[::31, ::7] *= 60
    path = tmp_path / "e.ncz"
    pack({"w": w}, path, recipe=_recipe({"rel_error": 0.004, "granularity": "tensor"}, True))
    with nf.open(path) as reader:
        assert "w#qx" in [s.name for s in reader.sections]
    return path


def _cases():
    def drop_qx(name, info, data):
        return False if name == "w#qx" else None

    def short_qx(name, info, data):
        if name == "w#qx":
            return data[:-4], {**info.params, "shape": [info.params["shape"][0] - 1]}
        return None

    def in_range_escape(name, info, data):
        if name == "w#qx":
            values = np.frombuffer(data, "<i4").copy()
            values[0] = 5
            return values.tobytes(), info.params
        return None

    def paired_bytes(name, info, data):
        if name == "w":
            return data, {**info.params, "pair": 16}
        return None

    def int16_q(name, info, data):
        if name == "w#q":
            return np.frombuffer(data, np.int8).astype("<i2").tobytes(), {**info.params, "dtype": "int16"}
        return None

    def wrong_count(name, info, data):
        if name == "w#q":
            return data[:-1], {**info.params, "shape": [info.params["shape"][0] - 1]}
        return None

    return [(drop_qx, "escaped indices but no part"), (short_qx, "indices for"),
            (in_range_escape, "not canonical"), (paired_bytes, "dtype 'int8', expected 'int32'"),
            (int16_q, "dtype 'int16', expected 'int32'"), (wrong_count, "indices for")]


@pytest.mark.parametrize("change,match", _cases(), ids=lambda c: getattr(c, "__name__", ""))
def test_hostile_byte_indices(tmp_path, escaped, change, match, capsys):
    broken = tmp_path / "broken.ncz"
    _rewrite(escaped, broken, change)
    with pytest.raises(nf.FormatError, match=match):
        load_state_dict(broken)
    out = tmp_path / "out.safetensors"
    assert main(["unpack", str(broken), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and not out.exists()
