"""Golden conformance vectors: never skipped. A change here means a version bump.

The container vectors pin FORMAT.md §4–§7; the vectors registered by the layers above
(``make_vectors.PLUGINS``: every model-weight representation of §5.4 and a calibration
file) also pin what their layer decodes them to, by sha256."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

import ncz.format as nf
from ncz.tools import make_vectors
from tests.conftest import VECTORS

make_vectors._load_plugins()
NAMES = sorted(p.stem for p in VECTORS.glob("*.ncz"))
LAYER_NAMES = sorted(make_vectors.DECODED)


def test_every_registered_vector_is_committed():
    assert NAMES, "tests/vectors is empty"
    assert set(NAMES) == set(make_vectors.VECTORS)


@pytest.mark.parametrize("name", NAMES)
def test_writer_reproduces_vector_bytes(name):
    assert make_vectors.build(name) == (VECTORS / f"{name}.ncz").read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_reader_decodes_vector(name):
    expected = json.loads((VECTORS / f"{name}.json").read_text())
    path = VECTORS / f"{name}.ncz"
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == expected["file_sha256"]
    with nf.open(path) as reader:
        reader.verify()
        assert list(reader.version) == expected["version"]
        assert sorted(reader.metadata) == expected["metadata_keys"]
        assert len(reader.sections) == len(expected["sections"])
        for info, want in zip(reader.sections, expected["sections"]):
            assert (info.name, info.kind, info.codec, info.critical) == (
                want["name"], want["kind"], want["codec"], want["critical"])
            if want["decoded_sha256"] is not None:
                assert hashlib.sha256(reader.read(info.name)).hexdigest() == want["decoded_sha256"]


def test_conditional_vector_streams_decode():
    from ncz.format import entropy
    from ncz.format.entropy_tables import Family

    means, scales = make_vectors.vector_mean_scale(2000)
    expected = make_vectors.vector_latents(2000)
    with nf.open(VECTORS / "entropy.ncz") as reader:
        for family in Family:
            model = entropy.ConditionalModel.from_mean_scale(family, means, scales)
            assert np.array_equal(entropy.read_conditional(reader, f"y-{family.name.lower()}", model), expected)


def test_every_weight_representation_and_calibration_has_a_vector():
    from ncz.models import registry

    kinds = {int(k) for name in LAYER_NAMES for k in _head_kinds(VECTORS / f"{name}.ncz")}
    assert kinds >= {int(k) for rep in registry.REPRESENTATIONS for k in rep.kinds}
    assert "model-calibration" in LAYER_NAMES


def _head_kinds(path) -> set[int]:
    with nf.open(path) as reader:
        return {info.kind for info in reader.sections if info.kind != nf.Kind.PART}


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_layer_decodes_vector_to_committed_tensors(name):
    """The library decodes each model vector to the tensors whose sha256 the JSON pins, and those
    are the values FORMAT.md §5.4's formulas give (computed without the decoders)."""
    from ncz.models import vectors

    expected = json.loads((VECTORS / f"{name}.json").read_text())["decoded"]
    decoded = make_vectors.DECODED[name]((VECTORS / f"{name}.ncz").read_bytes())
    assert {key: hashlib.sha256(value).hexdigest() for key, value in decoded.items()} == expected
    assert decoded == vectors.expected(name)
