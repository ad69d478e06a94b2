"""Checkpoints, recipes and calibration files as a user hands them over: nothing lost quietly,
nothing blown up, one line per problem (issue 12, items 6, 8, 9, 11, 12)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ncz.format as nf
from ncz.models import Recipe, load_state_dict, open_checkpoint, pack, unpack
from ncz.tools.cli import main
from tests.hostile_files import ARCHIVE, Section, build


def _pt(tmp_path, obj, name="ckpt.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_expanded_tensor_is_refused_before_it_is_densified(tmp_path, capsys):
    path = _pt(tmp_path, {"w": torch.zeros(1).expand(1 << 20, 1 << 20)})
    assert path.stat().st_size < 4096  # a tiny file asking for 4 TiB
    with pytest.raises(nf.InputError, match="'w' has 1099511627776 elements over storage for 1"):
        pack(path, tmp_path / "out.ncz")
    assert main(["pack", str(path), "-o", str(tmp_path / "out.ncz")]) == 1
    assert "expanded" in capsys.readouterr().err
    with pytest.raises(nf.InputError, match="expanded"):  # a state dict in memory too
        pack({"w": torch.zeros(4).as_strided((4, 3), (1, 0))}, tmp_path / "out.ncz")
    assert not (tmp_path / "out.ncz").exists()


@pytest.mark.parametrize("obj, name", [({"a": {"b": torch.ones(2)}, "a.b": torch.zeros(2)}, "a.b"),
                                       ({1: torch.ones(2), "1": torch.zeros(2)}, "1")], ids=["nested", "int-key"])
def test_names_that_flatten_together_are_refused(tmp_path, obj, name):
    with pytest.raises(nf.InputError, match=f"two entries flatten to the tensor name '{name}'"):
        open_checkpoint(_pt(tmp_path, obj))


def test_lists_of_tensors_are_kept(tmp_path):
    layers = [torch.full((2,), float(i)) for i in range(3)]
    source = open_checkpoint(_pt(tmp_path, {"layers": layers, "head": (torch.ones(1),)}))
    assert source.names == ["layers.0", "layers.1", "layers.2", "head.0"]
    pack(source, tmp_path / "o.ncz")
    assert torch.equal(load_state_dict(tmp_path / "o.ncz")["layers.2"], layers[2])


def test_metadata_name_is_refused_both_ways(tmp_path):
    with pytest.raises(nf.InputError, match="'__metadata__'.*safetensors reserves"):
        pack({"__metadata__": torch.ones(2)}, tmp_path / "a.ncz")
    with pytest.raises(nf.InputError, match="__metadata__"):
        open_checkpoint(_pt(tmp_path, {"__metadata__": torch.ones(2)}))
    # an archive from elsewhere holding that name: not turned into a broken .safetensors
    archive = build([Section("__metadata__", nf.Kind.TENSOR, nf.Codec.RAW, bytes(8), None,
                             {"dtype": "float32", "shape": [2]})], ARCHIVE)
    (tmp_path / "m.ncz").write_bytes(archive)
    with pytest.raises(nf.InputError, match="unpack to .pt"):
        unpack(tmp_path / "m.ncz", tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    assert unpack(tmp_path / "m.ncz", tmp_path / "m.pt") == 1


def test_tied_weights_are_said(tmp_path, capsys):
    shared = torch.randn(8, 4)
    path = _pt(tmp_path, {"embed.weight": shared, "head.weight": shared})
    report = pack(path, tmp_path / "o.ncz")
    assert len(report.notes) == 1 and "'head.weight' shares storage with 'embed.weight'" in report.notes[0]
    assert main(["pack", str(path), "-o", str(tmp_path / "o.ncz"), "-q"]) == 0
    assert "ncz: note:" in capsys.readouterr().err


def _hf_folder(tmp_path, weight_map) -> object:
    folder = tmp_path / "model"
    folder.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, folder / "shard.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("weight_map, match", [
    ({"w": 3}, "weight_map must map tensor names to shard file names"),
    ({"w": ["shard.safetensors"]}, "weight_map must map"),
    ({"w": "../outside.safetensors"}, "not a file name inside"),
    ({"w": "/etc/passwd"}, "not a file name inside"),
    ({"w": ".."}, "not a file name inside"),
], ids=["int", "list", "dotdot", "absolute", "parent"])
def test_hf_index_shards_stay_in_the_folder(tmp_path, capsys, weight_map, match):
    folder = _hf_folder(tmp_path, weight_map)
    (tmp_path / "outside.safetensors").write_bytes((folder / "shard.safetensors").read_bytes())
    with pytest.raises(nf.InputError, match=match):
        open_checkpoint(folder)
    assert main(["pack", str(folder), "-o", str(tmp_path / "o.ncz")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert open_checkpoint(_hf_folder(tmp_path / "ok", {"w": "shard.safetensors"})).names == ["w"]


def test_non_checkpoint_message_is_ours(tmp_path, capsys):
    path = tmp_path / "notes.pt"
    path.write_bytes(b"just some text, not a checkpoint\n" * 10)
    assert main(["pack", str(path), "-o", str(tmp_path / "o.ncz")]) == 1
    err = capsys.readouterr().err
    assert "notes.pt: not a checkpoint ncz can read" in err
    assert "torch.save your checkpoint" not in err and "mmap" not in err


@pytest.mark.parametrize("rule, match", [
    ({"group_size": "two"}, "group_size must be an integer"),
    ({"rel_error": 0}, "rel_error must be a number > 0"),
    ({"rel_error": -0.1}, "rel_error must be a number > 0"),
    ({"bits": float("nan")}, "bits must be a number > 0"),
    ({"min_numel": "big"}, "min_numel"),
    ({"ndim": "2"}, "ndim"),
], ids=["group-size-str", "rel-error-0", "rel-error-neg", "bits-nan", "min-numel", "ndim"])
def test_recipe_values_are_checked_on_load(tmp_path, capsys, rule, match):
    with pytest.raises(nf.UsageError, match=match):
        Recipe.from_dict({"rule": [{"pattern": "*", "representation": "quantized", **rule}]})
    lines = ["[[rule]]", 'pattern = "*"', 'representation = "quantized"']
    lines += [f"{k} = {json.dumps(v) if not isinstance(v, float) or v == v else 'nan'}" for k, v in rule.items()]
    (tmp_path / "r.toml").write_text("\n".join(lines) + "\n")
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "c.pt")
    assert main(["pack", str(tmp_path / "c.pt"), "-o", str(tmp_path / "o.ncz"),
                 "--recipe", str(tmp_path / "r.toml")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match.split()[0] in err


def test_calibration_samples_must_be_an_integer(tmp_path, capsys):
    from ncz.models import Calibration

    path = tmp_path / "cal.ncz"
    pack({"rows/w": torch.ones(4)}, path, metadata={"content": "ncz-calibration/v1", "samples": "many"})
    with pytest.raises(nf.InputError, match="samples must be a non-negative integer"):
        Calibration.load(path)
    torch.save({"w": torch.randn(4, 64)}, tmp_path / "c.pt")
    assert main(["pack", str(tmp_path / "c.pt"), "-o", str(tmp_path / "o.ncz"), "--calibration", str(path)]) == 1
    assert "samples" in capsys.readouterr().err


@pytest.mark.parametrize("step", [float("nan"), 0.0, -1.0, float("inf")])
def test_quantized_float_steps_must_be_finite_and_positive(tmp_path, step):
    q = np.arange(8, dtype="<i4") - 4
    sections = [Section("w", nf.Kind.QUANTIZED, params={"dtype": "float32", "shape": [8], "granularity": "tensor",
                                                        "rel_error": 0.0}),
                Section("w#q", nf.Kind.PART, nf.Codec.RAW, q.tobytes(), None, {"dtype": "int32", "shape": [8]}),
                Section("w#step", nf.Kind.PART, nf.Codec.RAW, np.array([[step]], "<f4").tobytes(), None,
                        {"dtype": "float32", "shape": [1, 1]})]
    (tmp_path / "q.ncz").write_bytes(build(sections, ARCHIVE))
    with pytest.raises(nf.FormatError, match="steps must be finite and > 0"):
        load_state_dict(tmp_path / "q.ncz")
