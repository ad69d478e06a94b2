"""Model archives: exact lossless round trips, error bounds, hostile checkpoints, CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ncz.format as nf
from ncz.models import Recipe, describe, iter_tensors, load_state_dict, open_checkpoint, pack, unpack
from ncz.models.quantized import quantize
from ncz.tools.cli import main

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    return torch.equal(a, b)


def _special(dtype: torch.dtype, n: int = 4096) -> torch.Tensor:
    torch.manual_seed(0)
    t = (torch.randn(n) * 0.05).to(dtype)
    t[:6] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-30]).to(dtype)
    return t.reshape(64, -1)


@pytest.mark.parametrize("dtype", FLOATS)
def test_lossless_is_bit_exact_with_special_values(tmp_path, dtype):
    sd = {"w": _special(dtype), "small": torch.tensor([-0.0, float("nan")], dtype=dtype)}
    # a non-canonical NaN payload survives too
    if dtype == torch.float32:
        sd["w"].view(torch.int32)[0, 7] = 0x7FC00123
    path = tmp_path / "a.ncz"
    pack(sd, path, recipe="lossless")
    back = load_state_dict(path)
    for k in sd:
        assert _bits_equal(back[k], sd[k]), k


def test_lossless_integers_and_empty(tmp_path):
    sd = {"i64": torch.arange(-5, 1000), "u8": torch.randint(0, 255, (33,), dtype=torch.uint8),
          "b": torch.tensor([True, False, True]), "empty": torch.zeros(0, 7), "scalar": torch.tensor(3.5)}
    path = tmp_path / "i.ncz"
    pack(sd, path)
    back = load_state_dict(path)
    for k in sd:
        assert _bits_equal(back[k], sd[k]), k


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=0, max_size=600),
       st.sampled_from(FLOATS))
def test_lossless_property(values, dtype):
    import tempfile

    tensor = torch.tensor(values, dtype=torch.float32).to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/p.ncz"
        pack({"t": tensor}, path)
        assert _bits_equal(load_state_dict(path)["t"], tensor)


def test_lossless_beats_zstd_on_trained_like_weights(tmp_path):
    import zstandard

    torch.manual_seed(1)
    w = (torch.randn(512, 512) * 0.03).float()
    path = tmp_path / "z.ncz"
    report = pack({"w": w}, path)
    zstd = len(zstandard.ZstdCompressor(level=19).compress(w.numpy().tobytes()))
    assert report.tensors[0].stored_bytes < zstd


def test_lossless_choice_counts_the_table_entries_of_its_sections(tmp_path):
    """A LayerNorm's 384 floats: byte planes have the smaller payload but cost five table entries;
    the writer picks the encoding whose *file* is smaller, and a larger tensor still gets planes."""
    from ncz.models import lossless

    torch.manual_seed(2)
    small = (1.0 + 0.05 * torch.randn(384)).float()
    chosen = lossless.encode_lossless("ln.weight", small)
    assert [s.kind for s in chosen.sections] == [nf.Kind.TENSOR]
    matrix = np.frombuffer(small.numpy().tobytes(), dtype=np.uint8).reshape(-1, 4)
    planes = [lossless._plane_payload(np.ascontiguousarray(matrix[:, k]), 19) for k in range(4)]
    assert sum(p.stored_length for p, _ in planes) < chosen.stored_bytes  # planes win on payload alone
    with nf.Writer(tmp_path / "chosen.ncz") as writer:
        for s in chosen.sections:
            writer.add_encoded(s.name, s.payload, kind=s.kind, params=s.params)
    with nf.Writer(tmp_path / "planes.ncz") as writer:
        writer.add_encoded("ln.weight", nf.encode_payload(b"", nf.Codec.RAW), kind=nf.Kind.BYTE_PLANES,
                           params={"dtype": "float32", "shape": [384]})
        for k, (payload, dtype) in enumerate(planes):
            writer.add_encoded(f"ln.weight#p{k}", payload, kind=nf.Kind.PART, params={"dtype": dtype, "shape": [384]})
    assert (tmp_path / "chosen.ncz").stat().st_size < (tmp_path / "planes.ncz").stat().st_size
    larger = lossless.encode_lossless("w", (torch.randn(64, 64) * 0.03).float())
    assert larger.sections[0].kind == nf.Kind.BYTE_PLANES


def test_section_overhead_is_the_table_entry_a_section_adds(tmp_path):
    payload = nf.encode_payload(bytes(range(200)) * 3, nf.Codec.ZSTD)
    params = {"dtype": "uint8", "shape": [600]}
    with nf.Writer(tmp_path / "empty.ncz"):
        pass
    with nf.Writer(tmp_path / "one.ncz") as writer:
        writer.add_encoded("t", payload, kind=nf.Kind.TENSOR, params=params)
    added = (tmp_path / "one.ncz").stat().st_size - (tmp_path / "empty.ncz").stat().st_size - payload.stored_length
    # the offset here is 25, one msgpack byte; section_overhead counts the usual 5 (a file under 4 GiB)
    assert nf.section_overhead("t", nf.Kind.TENSOR, payload, params) == added + 4
    raw = nf.encode_payload(bytes(600), nf.Codec.RAW)  # aligned by default: 32 bytes of padding expected
    assert nf.section_overhead("t", nf.Kind.TENSOR, raw, params) == \
        nf.section_overhead("t", nf.Kind.TENSOR, raw, params, aligned=False) + 32

@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("target", [0.001, 0.01, 0.1])
def test_quantized_meets_relative_error(tmp_path, granularity, target):
    torch.manual_seed(2)
    w = torch.randn(96, 128) * torch.logspace(-2, 0, 96)[:, None]  # rows of very different scale
    w[3, 5] = 25.0  # an outlier stays within the step, no clipping
    recipe = Recipe.from_dict({"rule": [{"pattern": "*", "representation": "quantized", "rel_error": target,
                                         "granularity": granularity, "group_size": 32}]})
    path = tmp_path / "q.ncz"
    report = pack({"w": w}, path, recipe=recipe)
    back = load_state_dict(path)["w"]
    err = float((back - w).norm() / w.norm())
    assert err <= target * 1.0001
    assert err == pytest.approx(report.tensors[0].rel_error, rel=1e-6)
    assert abs(float(back[3, 5]) - 25.0) < 25.0 * 0.5


def test_quantized_bits_target():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((256, 256)).astype(np.float32)
    for bits in (2.0, 4.0, 6.0):
        q, steps, err = quantize(w, bits=bits, granularity="tensor")
        p = np.bincount((q - q.min()).ravel()) / q.size
        p = p[p > 0]
        entropy = float(-(p * np.log2(p)).sum())
        assert entropy <= bits and entropy > bits - 0.25
        # high-rate theory: error ≈ step/√12 relative to σ=1
        assert err == pytest.approx(float(steps.ravel()[0]) / math.sqrt(12), rel=0.1)


def test_structured_matrix_error_bound():
    # low-rank plus noise, the shape of real weights
    rng = np.random.default_rng(4)
    w = rng.standard_normal((200, 8)) @ rng.standard_normal((8, 300)) + 0.01 * rng.standard_normal((200, 300))
    w = w.astype(np.float32)
    q, steps, err = quantize(w, rel_error=0.02, granularity="channel")
    assert err <= 0.02


def test_toy_model_outputs_within_reported_error(tmp_path):
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 32))
    path = tmp_path / "m.ncz"
    report = pack(model.state_dict(), path, recipe="q8")
    restored = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 32))
    restored.load_state_dict(load_state_dict(path))
    x = torch.randn(128, 64)
    with torch.no_grad():
        a, b = model(x), restored(x)
    worst = max(t.rel_error for t in report.tensors)
    # errors of two layers compound at most additively (to first order)
    assert float((a - b).norm() / a.norm()) <= 2.5 * worst


def test_checkpoint_formats_and_unpack(tmp_path):
    from safetensors.torch import load_file, save_file

    sd = {"a.weight": torch.randn(16, 8), "a.bias": torch.randn(16)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    torch.save(sd, tmp_path / "m.pt")
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(sd, str(hf / "model.safetensors"))
    for source in (tmp_path / "m.safetensors", tmp_path / "m.pt", hf):
        out = tmp_path / f"{source.name}.ncz"
        pack(source, out)
        assert all(_bits_equal(load_state_dict(out)[k], sd[k]) for k in sd)
    unpack(tmp_path / "m.pt.ncz", tmp_path / "back.safetensors")
    st_back = load_file(str(tmp_path / "back.safetensors"))
    assert all(_bits_equal(st_back[k], sd[k]) for k in sd)
    unpack(tmp_path / "m.pt.ncz", tmp_path / "back.pt")
    pt_back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert all(_bits_equal(pt_back[k], sd[k]) for k in sd)
    rows = describe(tmp_path / "m.pt.ncz")
    assert [r.name for r in rows] == ["a.weight", "a.bias"]


class _Evil:
    pass


def test_hostile_checkpoints_are_refused(tmp_path, capsys):
    torch.save({"obj": _Evil(), "w": torch.randn(3)}, tmp_path / "evil.pt")
    with pytest.raises(nf.InputError, match="unpickle"):
        open_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(nf.InputError):
        open_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(nf.InputError):
        open_checkpoint(tmp_path / "junk.safetensors")
    assert main(["pack", str(tmp_path / "evil.pt"), "-o", str(tmp_path / "e.ncz")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "evil.pt" in err and "Traceback" not in err
    assert not (tmp_path / "e.ncz").exists()
    with pytest.raises(nf.InputError, match="#"):
        pack({"bad#name": torch.zeros(2)}, tmp_path / "x.ncz")


def test_hostile_archives(tmp_path):
    path = tmp_path / "m.ncz"
    pack({"w": torch.randn(64, 64)}, path, recipe="q8")
    # a plain (non-model) archive is refused by the model loader
    with nf.Writer(tmp_path / "plain.ncz") as w:
        w.add("x", b"1")
    with pytest.raises(nf.InputError, match="not a model archive"):
        load_state_dict(tmp_path / "plain.ncz")
    # a quantized head whose index part is missing
    with nf.open(path) as reader, nf.Writer(tmp_path / "broken.ncz", metadata=reader.metadata) as w:
        for info in reader.sections:
            if not info.name.endswith("#q"):
                w.add_stored(info.name, bytes(reader.stored(info.name)), decoded_length=info.decoded_length,
                             kind=info.kind, codec=info.codec, params=info.params)
    with pytest.raises(nf.FormatError, match="lacks its part"):
        load_state_dict(tmp_path / "broken.ncz")


def test_cli_pack_info_unpack(tmp_path, capsys):
    torch.save({"l.weight": torch.randn(128, 64), "l.bias": torch.randn(128)}, tmp_path / "c.pt")
    assert main(["pack", str(tmp_path / "c.pt"), "-o", str(tmp_path / "c.ncz"), "--preset", "q4"]) == 0
    assert main(["info", str(tmp_path / "c.ncz")]) == 0
    out = capsys.readouterr().out
    assert "quantized" in out and "exact" in out
    assert main(["verify", str(tmp_path / "c.ncz")]) == 0
    assert main(["unpack", str(tmp_path / "c.ncz"), "-o", str(tmp_path / "c.safetensors")]) == 0
    assert main(["unpack", str(tmp_path / "c.ncz"), "-o", str(tmp_path / "c1.safetensors"), "--workers", "1"]) == 0
    assert (tmp_path / "c1.safetensors").read_bytes() == (tmp_path / "c.safetensors").read_bytes()
    assert main(["unpack", str(tmp_path / "c.ncz"), "-o", str(tmp_path / "c0.safetensors"), "--workers", "0"]) == 2
    assert not (tmp_path / "c0.safetensors").exists()
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[rule]]\npattern = "*.weight"\nrepresentation = "quantized"\nbits = 3.0\n'
                      '[[rule]]\npattern = "*"\nrepresentation = "lossless"\n')
    assert main(["pack", str(tmp_path / "c.pt"), "-o", str(tmp_path / "r.ncz"), "--recipe", str(recipe)]) == 0
    recipe.write_text('[[rule]]\npattern = "*"\nrepresentation = "magic"\n')
    assert main(["pack", str(tmp_path / "c.pt"), "-o", str(tmp_path / "r2.ncz"), "--recipe", str(recipe)]) == 1


# --- the registry and the shape of the package ------------------------------------------------------


def test_registry_lists_every_representation_once_with_its_head_kinds():
    from ncz.format.layout import REPRESENTATION_HEADS
    from ncz.models import registry

    kinds = [int(k) for rep in registry.REPRESENTATIONS for k in rep.kinds]
    assert len(kinds) == len(set(kinds))
    assert set(kinds) == {int(nf.Kind.TENSOR)} | {int(k) for k in REPRESENTATION_HEADS}
    assert registry.names() == sorted(rep.name for rep in registry.REPRESENTATIONS)
    assert [rep.name for rep in registry.REPRESENTATIONS if rep.uses_calibration] == ["quantized"]
    for rep in registry.REPRESENTATIONS:
        assert registry.by_name(rep.name) is rep and all(registry.for_kind(k) is rep for k in rep.kinds)
    with pytest.raises(nf.UsageError, match="unknown representation 'magic'"):
        registry.by_name("magic")
    with pytest.raises(nf.UsageError, match="unknown representation"):
        Recipe.from_dict({"rule": [{"pattern": "*", "representation": "magic"}]})


def test_a_representation_whose_head_the_container_does_not_check_is_refused():
    """A head kind missing from the container's list would skip its dtype/shape check silently."""
    from ncz.models.representation import Representation

    with pytest.raises(nf.UsageError, match="not a representation head"):
        Representation("image-as-tensor", (nf.Kind.IMAGE,), lambda *a: None, lambda *a: None, lambda *a: None)


def _module_imports(path, package: str) -> list[tuple[str, bool]]:
    """(imported ncz module, at module level?) for the imports of ``path`` that run (not those
    under ``if TYPE_CHECKING:``), relative ones resolved against ``package``."""
    import ast

    tree = ast.parse(path.read_text())
    typing_only = {id(inner) for node in tree.body if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for inner in ast.walk(node)}
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                stem = f"{base}.{node.module}" if node.module else base
                names = [stem] if node.module else [f"{stem}.{alias.name}" for alias in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(name, id(node) in top) for name in names if name.startswith("ncz.")]
    return found


def test_models_imports_point_one_way_without_cycles():
    """No module of ncz.models imports another inside a function (the package's lazy AdaComp names
    aside, which use importlib), and the module graph has no cycle, counting the package
    ``__init__`` that importing a submodule runs first: the archive and recipes depend on the
    registry, the registry on the representations, never the reverse."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "models"
    imports: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        module = ".".join(("ncz", "models") + (parts[:-1] if parts[-1] == "__init__" else parts))
        package = module if parts[-1] == "__init__" else module.rpartition(".")[0]
        found = _module_imports(path, package)
        late = [name for name, top_level in found if not top_level]
        assert not late, f"{module} imports {late} inside a function"
        imports[module] = {name for name, _ in found if name.startswith("ncz.models")}

    def ancestors(name: str) -> set[str]:
        pieces = name.split(".")
        return {".".join(pieces[:i]) for i in range(2, len(pieces))}

    edges: dict[str, set[str]] = {}
    for module, names in imports.items():
        targets = {name if name in imports else name.rpartition(".")[0] for name in names}  # `from pkg import mod`
        # importing a.b.c first runs the __init__ of every package above it that is not already running
        edges[module] = {t for name in targets for t in ancestors(name) | {name}
                         if t in imports and t != module and t not in ancestors(module)}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if state.get(module) != 2:
            state[module] = 1
            for dep in sorted(edges[module]):
                visit(dep, path + [module])
            state[module] = 2

    for module in sorted(edges):
        visit(module, [])
    above = {"ncz.models.archive", "ncz.models.registry", "ncz.models.calibration", "ncz.models.recipe",
             "ncz.models.vectors"}
    for module, deps in edges.items():
        representation = module.split(".")[2:3] in (["lossless"], ["quantized"], ["lowrank"], ["dictionary"],
                                                    ["codebook"], ["representation"])
        if representation and module != "ncz.models.lowrank.plan":  # a recipe for a whole model: above the registry
            assert not deps & above, f"{module}, a representation, imports {sorted(deps & above)}"


def test_recipes_read_toml_without_tomllib(tmp_path):
    """Python 3.10 has no tomllib; recipe.py then imports tomli (pyproject requires it there).
    Simulated: tomllib cannot be imported, and the module tomli is tomllib under another name."""
    import subprocess
    import sys

    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "x"\n[[rule]]\npattern = "*"\nrepresentation = "quantized"\nbits = 3.0\n')
    broken = tmp_path / "broken.toml"
    broken.write_text("[[rule]\n")
    code = (
        "import importlib, sys\n"
        "sys.modules['tomli'] = importlib.import_module('tomllib')\n"
        "del sys.modules['tomllib']\n"
        "class NoTomllib:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'tomllib':\n"
        "            raise ModuleNotFoundError(\"No module named 'tomllib'\", name=name)\n"
        "sys.meta_path.insert(0, NoTomllib())\n"
        "import ncz.format as nf\n"
        "from ncz.models import Recipe, recipe\n"
        "assert recipe.tomllib is sys.modules['tomli'] and 'tomllib' not in sys.modules\n"
        f"r = Recipe.from_toml({str(recipe)!r})\n"
        "assert (r.name, r.rules[0].representation, r.rules[0].options) == ('x', 'quantized', {'bits': 3.0})\n"
        "try:\n"
        f"    Recipe.from_toml({str(broken)!r})\n"
        "except nf.InputError as exc:\n"
        "    assert 'not a readable TOML recipe' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('a broken recipe was accepted')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_every_head_is_checked_before_any_tensor_is_decoded(tmp_path):
    """The registry's check_head runs over the whole table first: a bad head at the end stops
    iter_tensors before it yields (or reads the parts of) the first tensor."""
    path = tmp_path / "m.ncz"
    pack({"a": torch.randn(64, 64), "b": torch.randn(64, 64)}, path, recipe="q8")
    with nf.open(path) as reader, nf.Writer(tmp_path / "bad.ncz", metadata=reader.metadata) as w:
        for info in reader.sections:
            params = dict(info.params, granularity="diagonal") if info.name == "b" else info.params
            w.add_stored(info.name, bytes(reader.stored(info.name)), decoded_length=info.decoded_length,
                         kind=info.kind, codec=info.codec, params=params)
    tensors = iter_tensors(tmp_path / "bad.ncz")
    with pytest.raises(nf.FormatError, match="'b': params.granularity"):
        next(tensors)
    assert [row.name for row in describe(tmp_path / "bad.ncz")] == ["a", "b"]  # info still lists it


def test_models_subpackages_import_neither_codec_tools_nor_format_libraries():
    """tests/test_exports.py checks models/*.py; the representation and AdaComp subpackages too."""
    import ast
    from pathlib import Path

    banned = ("ncz.codec", "ncz.tools", "constriction", "zstandard", "msgpack")
    for path in (Path(__file__).resolve().parents[1] / "models").rglob("*/*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            assert not [n for n in names if n.startswith(banned)], f"{path} imports {names}"
