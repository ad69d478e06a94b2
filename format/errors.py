"""The one exception tree of ncz.

Every error that untrusted input can cause is an :class:`NczError`; the CLI maps
it to a single line and exit code 1. Library code raises, never prints or exits.

::

    NczError                      root: catch this to handle any bad input
    ├── FormatError               bytes that break a MUST of docs/FORMAT.md, including a
    │   │                         model-weight section whose params or parts break §5.4
    │   ├── TruncatedError        the file or a stream ends early
    │   ├── UnsupportedError      unknown critical kind/codec, or a feature not built here
    │   └── AdaCompWireError      an AdaComp gradient message or bucket payload breaks §9
    │                             (also a ValueError, as it was before it joined the tree)
    ├── VersionError              major version this reader does not implement
    ├── ChecksumError             a section, header or table fails its xxh3-64
    ├── LimitError                a declared size exceeds a reader cap (checked before allocating)
    ├── StreamError               an entropy-coded stream is corrupt, padded or short
    ├── InputError                an input is unusable or unsafe although no .ncz rule is broken:
    │                             not .ncz bytes (image, checkpoint, recipe file), or a sound
    │                             .ncz of the wrong content (not a model archive, a tensor the
    │                             model has no place for)
    └── UsageError                the caller asked for something impossible (bad argument,
        │                         bad option, a recipe naming no representation)
        └── DensityError          an entropy-coded section would hold more symbols per byte
                                  than FORMAT.md §7.1 allows (store it with another codec)

Each message names the file (when known), the field, and what was expected, so
that ``str(exc)`` alone is a useful one-line diagnostic. Causes are chained with
``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
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
    "AdaCompWireError",
]


class NczError(Exception):
    """Root of all ncz errors."""


class FormatError(NczError):
    """The bytes violate a MUST rule of docs/FORMAT.md."""


class TruncatedError(FormatError):
    """The file, a section or a stream ends before its declared end."""


class UnsupportedError(FormatError):
    """A critical section uses a kind or codec this reader does not know."""


class VersionError(NczError):
    """The file's major version is not one this reader implements."""


class ChecksumError(NczError):
    """Stored bytes do not match their xxh3-64 checksum."""


class LimitError(NczError):
    """A declared size exceeds a reader limit; raised before any allocation."""


class StreamError(NczError):
    """An entropy-coded stream is corrupt: wrong length, padding, or impossible symbols."""


class InputError(NczError):
    """An input is unusable or unsafe without breaking a rule of FORMAT.md: it is not .ncz
    bytes (an image, a checkpoint, a recipe file), or a sound .ncz holds the wrong content."""


class UsageError(NczError, ValueError):
    """An API was called with arguments that can never work."""


class DensityError(UsageError):
    """Symbols too predictable for an entropy-coded section (FORMAT.md §7.1): a writer
    catches it and stores the data with another codec (e.g. ZSTD)."""


class AdaCompWireError(FormatError, ValueError):
    """Bytes that are not a valid AdaComp message or bucket payload (FORMAT.md §9). A
    ValueError too: AdaComp raised ValueError subclasses before it joined this tree."""
