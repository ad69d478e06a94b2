"""ncz.format: the .ncz container, its section codecs and the entropy coders.

This package is the only one that imports constriction, zstandard and msgpack.
docs/FORMAT.md is the normative byte layout; the names below map onto it:

- prelude, header, table, footer ........ :mod:`ncz.format.container`
- ``Kind``, ``Codec``, ``SectionFlag`` ... :mod:`ncz.format.enums`
- raw / zstd section codecs ............. :mod:`ncz.format.section_codecs`
- canonical msgpack ..................... :mod:`ncz.format.canonical`
- xxh3-64 checksums ..................... :mod:`ncz.format.checksum`
- range / ANS codecs, models, bits-back .. :mod:`ncz.format.entropy`
- integer tables and parametric grids ... :mod:`ncz.format.entropy_tables`
- the constriction adapter .............. :mod:`ncz.format.constriction_adapter`

The exception tree is drawn in :mod:`ncz.format.errors`.
"""

from . import entropy  # registers the RANGE and ANS section codecs
from .container import (
    ALIGNMENT,
    MAGIC,
    VERSION,
    EncodedPayload,
    Limits,
    Reader,
    SectionInfo,
    Writer,
    atomic_write,
    encode_payload,
    open,
    open_bytes,
    section_overhead,
)
from .entropy import BitsBackStack, CategoricalModel, Coder, ConditionalModel, ModelId
from .entropy_tables import Family, FrequencyTable, ParametricGrid
from .enums import Codec, Kind, SectionFlag
from .errors import (
    ChecksumError,
    DensityError,
    FormatError,
    InputError,
    LimitError,
    NczError,
    StreamError,
    TruncatedError,
    UnsupportedError,
    UsageError,
    VersionError,
)

__all__ = [
    "ALIGNMENT",
    "MAGIC",
    "VERSION",
    "Limits",
    "Reader",
    "SectionInfo",
    "Writer",
    "atomic_write",
    "EncodedPayload",
    "encode_payload",
    "section_overhead",
    "open",
    "open_bytes",
    "Codec",
    "Kind",
    "entropy",
    "Coder",
    "ModelId",
    "Family",
    "FrequencyTable",
    "ParametricGrid",
    "CategoricalModel",
    "ConditionalModel",
    "BitsBackStack",
    "SectionFlag",
    "NczError",
    "FormatError",
    "TruncatedError",
    "UnsupportedError",
    "VersionError",
    "ChecksumError",
    "LimitError",
    "StreamError",
    "InputError",
    "UsageError",
    "DensityError",
]
