"""The public API is curated: __all__ is exactly what we mean to export."""

from __future__ import annotations

import importlib

import pytest

EXPECTED = {
    "ncz.format": {
        "ALIGNMENT", "MAGIC", "VERSION", "Limits", "Reader", "SectionInfo", "Writer", "atomic_write", "open",
        "open_bytes",
        "EncodedPayload", "encode_payload", "section_overhead",
        "Codec", "Kind", "SectionFlag", "NczError", "FormatError", "TruncatedError", "UnsupportedError",
        "VersionError", "ChecksumError", "LimitError", "StreamError", "InputError", "UsageError", "DensityError",
        "entropy", "Coder", "ModelId", "Family", "FrequencyTable", "ParametricGrid", "CategoricalModel",
        "ConditionalModel", "BitsBackStack",
    },
    "ncz.models": {
        "AdaCompCompressor", "AdaCompConfig", "AdaCompState", "AdaCompWireError", "Calibration", "calibrate",
        "CodebookEmbedding",
        "DictionaryLinear", "LAYER_TYPES", "LoadReport", "LowRankConv2d", "LowRankLinear", "MetricPackResult",
        "MetricPoint", "PRESETS", "PackReport",
        "Recipe", "Rule", "TENSOR_CLASSES", "tiered", "SparseMessage", "StepStats", "TensorReport", "TensorSource",
        "adacomp_hook",
        "decode_message", "describe", "encode_codebook", "encode_dictionary", "encode_dictionary_group",
        "encode_message", "finetune_codebooks", "iter_tensors", "load_into", "load_state_dict", "open_checkpoint",
        "pack", "pack_for_metric", "packable_state_dict", "plan_dictionary", "plan_lowrank", "product_quantize",
        "QuantAware",
        "register_adacomp",
        "select_ranks", "stable_rank_penalty", "unpack",
    },
    "ncz.codec": {
        "CodecConfig", "CodecRuntime", "HyperpriorCodec", "Pixels", "choose_quality", "decode_section",
        "default_weights_path", "encode_pixels", "export_codec", "load_codec", "read_image", "write_image",
        "write_image_section", "SGASchedule", "SGAProgress", "RefineResult", "refine_latents", "encode", "decode",
        "encode_images", "decode_images", "image_names", "ImageEncoder", "verify_section",
    },
}


def test_layers_import_one_way():
    """format imports nothing of ours; models never imports codec; codec reaches models only for weights."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    forbidden = {"format": ("ncz.codec", "ncz.models", "ncz.tools"), "models": ("ncz.codec", "ncz.tools"),
                 "codec": ("ncz.tools",), "tools": ()}
    third_party = ("constriction", "zstandard", "msgpack")
    for folder, banned in forbidden.items():
        for path in (root / folder).glob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                for name in names:
                    assert not name.startswith(banned), f"{path.name} imports {name}"
                    if folder != "format":
                        assert not name.startswith(third_party), f"{path.name} imports {name} (only ncz.format may)"


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_exports(module):
    mod = importlib.import_module(module)
    assert set(mod.__all__) == EXPECTED[module]
    for name in mod.__all__:
        assert getattr(mod, name) is not None


def test_error_tree():
    import ncz.format as nf

    for name in ["FormatError", "VersionError", "ChecksumError", "LimitError", "StreamError", "UsageError"]:
        assert issubclass(getattr(nf, name), nf.NczError)
    assert issubclass(nf.TruncatedError, nf.FormatError) and issubclass(nf.UnsupportedError, nf.FormatError)
