"""The public API is curated: __all__ is exactly what we mean to export."""

from __future__ import annotations

import importlib

import pytest

EXPECTED = {
    "ncz.format": {
        "ALIGNMENT", "MAGIC", "VERSION", "Limits", "Reader", "SectionInfo", "Writer", "open", "open_bytes",
        "EncodedPayload", "encode_payload",
        "Codec", "Kind", "SectionFlag", "NczError", "FormatError", "TruncatedError", "UnsupportedError",
        "VersionError", "ChecksumError", "LimitError", "StreamError", "InputError", "UsageError",
        "entropy", "Coder", "ModelId", "Family", "FrequencyTable", "ParametricGrid", "CategoricalModel",
        "ConditionalModel", "BitsBackStack",
    },
}


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
