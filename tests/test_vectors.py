"""Golden conformance vectors: never skipped. A change here means a version bump.

The container vectors pin FORMAT.md §4–§7; the vectors registered by the layers above
(``make_vectors.PLUGINS``: every model-weight representation of §5.4 and a calibration
file; an image section of each codec architecture, §5.3, with its tiny weights) also pin
what their layer decodes them to, by sha256. The image vectors and their weights are built
once (the encoder runs in float32): their bytes are not reproduced, only decoded."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

import ncz.format as nf
from ncz.codec import vectors as codec_vectors
from ncz.models import vectors as model_vectors
from ncz.tools import make_vectors
from tests.conftest import VECTORS

make_vectors._load_plugins()
NAMES = sorted(p.stem for p in VECTORS.glob("*.ncz"))
LAYER_NAMES = sorted(make_vectors.DECODED)
MODEL_NAMES = sorted(model_vectors.VECTOR_NAMES)
IMAGE_NAMES = sorted(codec_vectors.IMAGES)


def test_every_registered_vector_is_committed():
    assert NAMES, "tests/vectors is empty"
    assert set(NAMES) == set(make_vectors.VECTORS)


@pytest.mark.parametrize("name", NAMES)
def test_writer_reproduces_vector_bytes(name):
    if name in make_vectors.BUILT_ONCE:
        pytest.skip(f"{name} is built once, not reproduced: {make_vectors.BUILT_ONCE[name]}")
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


def test_make_vectors_check_passes_and_writing_keeps_built_once_vectors(tmp_path, capsys):
    assert make_vectors.main(["--check", "--out", str(VECTORS)]) == 0
    assert "not rebuilt" in capsys.readouterr().err
    for name in make_vectors.BUILT_ONCE:  # a write run must not rebuild them (another CPU gives other bytes)
        for path in VECTORS.glob(f"{name}.*"):
            (tmp_path / path.name).write_bytes(path.read_bytes())
    assert make_vectors.main(["--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in VECTORS.iterdir())
    for path in VECTORS.iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


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

    kinds = {int(k) for name in MODEL_NAMES for k in _head_kinds(VECTORS / f"{name}.ncz")}
    assert kinds >= {int(k) for rep in registry.REPRESENTATIONS for k in rep.kinds}
    assert "model-calibration" in MODEL_NAMES


def _head_kinds(path) -> set[int]:
    with nf.open(path) as reader:
        return {info.kind for info in reader.sections if info.kind != nf.Kind.PART}


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_layer_decodes_vector_to_committed_hashes(name):
    expected = json.loads((VECTORS / f"{name}.json").read_text())["decoded"]
    decoded = make_vectors.decode_layer(name, (VECTORS / f"{name}.ncz").read_bytes(), VECTORS)
    assert {key: hashlib.sha256(value).hexdigest() for key, value in decoded.items()} == expected


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_vector_tensors_follow_the_spec(name):
    """The library decodes each model vector to the values FORMAT.md §5.4's formulas give
    (computed without the decoders)."""
    decoded = make_vectors.decode_layer(name, (VECTORS / f"{name}.ncz").read_bytes(), VECTORS)
    assert decoded == model_vectors.expected(name)


# --- image sections (§5.3) --------------------------------------------------------------------------


def test_every_codec_architecture_has_an_image_vector():
    from ncz.codec.architectures import ARCHITECTURES
    from ncz.codec.weights import load_codec

    archs = {load_codec(VECTORS / f"{codec_vectors.IMAGES[name][0]}.ncz").config.arch for name in IMAGE_NAMES}
    assert archs == set(ARCHITECTURES)
    assert set(codec_vectors.WEIGHTS.values()) == set(ARCHITECTURES)


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_image_vector_names_the_committed_weights(name):
    """Each image section names its weights by the first 16 bytes of their sha256 (§5.3): the
    committed tiny weights must be those bytes, or the vector would decode with other weights."""
    weights = VECTORS / f"{codec_vectors.IMAGES[name][0]}.ncz"
    with nf.open(VECTORS / f"{name}.ncz") as reader:
        named = [info.params["weights"] for info in reader.sections if info.kind == nf.Kind.IMAGE]
    assert named and all(n == hashlib.sha256(weights.read_bytes()).digest()[:16] for n in named)


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_image_vector_decodes_to_committed_latents_and_pixels(name):
    """ŷ comes from the integer networks: exact on every machine. The pixels come from g_s in float32:
    exact on one machine, within one level across CPUs (docs/CODEC.md); a difference fails either way,
    with a message that says which, measured against the committed PNG of the expected pixels."""
    expected = json.loads((VECTORS / f"{name}.json").read_text())["decoded"]
    data = (VECTORS / f"{name}.ncz").read_bytes()
    decoded = {key: hashlib.sha256(value).hexdigest()
               for key, value in codec_vectors.decoded_image(data, VECTORS, name).items()}
    for key in sorted(k for k in expected if not k.endswith("/pixels")):
        assert decoded[key] == expected[key], f"{key} differs: the integer decoding changed (a format break)"
    for key in sorted(k for k in expected if k.endswith("/pixels")):
        if decoded[key] != expected[key]:
            pytest.fail(_pixel_difference(name, data, key.split("/")[0]))


def _pixel_difference(name: str, data: bytes, section: str) -> str:
    got = codec_vectors.decoded_pixels(data, VECTORS, name)[section]
    want = codec_vectors.expected_pixels(VECTORS / f"{name}.png")
    if got.rgb.shape != want.rgb.shape:
        return f"{name}: decoded shape {got.rgb.shape}, expected {want.rgb.shape}"
    diff = np.abs(got.rgb.astype(np.int16) - want.rgb.astype(np.int16))
    summary = f"{name}: {int((diff > 0).sum())} of {diff.size} pixel values differ, by at most {int(diff.max())}"
    if diff.max() <= 1:
        return (f"{summary} level: within the one level another CPU's float32 g_s may give (docs/CODEC.md); "
                "ŷ matched, so only the synthesis rounding differs, but the vector pins the pixels exactly")
    return f"{summary} levels: beyond float rounding, the synthesis changed"


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_committed_png_holds_the_pinned_pixels(name):
    """The PNG the pixel message measures against is the pixels the JSON pins (and the alpha, losslessly)."""
    expected = json.loads((VECTORS / f"{name}.json").read_text())["decoded"]
    png = codec_vectors.expected_pixels(VECTORS / f"{name}.png")
    assert hashlib.sha256(png.rgb.tobytes()).hexdigest() == expected["image/pixels"]
    assert (png.alpha is None) == ("image/alpha" not in expected)
    if png.alpha is not None:
        assert hashlib.sha256(png.alpha.tobytes()).hexdigest() == expected["image/alpha"]


def test_image_vectors_cover_alpha_grayscale_odd_sizes_and_the_context():
    """What the two image vectors were chosen to exercise."""
    from ncz.codec.weights import load_codec

    seen = set()
    for name in IMAGE_NAMES:
        with nf.open(VECTORS / f"{name}.ncz") as reader:
            for info in reader.sections:
                if info.kind == nf.Kind.IMAGE:
                    p = info.params
                    seen |= {f"channels={p['channels']}"}
                    seen |= {"odd side"} if p["width"] % 2 or p["height"] % 2 else set()
                    seen |= {"fractional quality"} if p["quality"] % 1 else set()
                    seen |= {"alpha"} if f"{info.name}#alpha" in reader else set()
    assert {"channels=1", "channels=3", "odd side", "alpha", "fractional quality"} <= seen
    context = load_codec(VECTORS / "codec-tiny-checkerboard.ncz").int_context
    assert np.any(context.params[-1].weight != 0)  # a zero last layer would leave the context unpinned
