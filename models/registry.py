"""The one list of weight representations, and lookups over it.

Adding a representation: write its module or package (encoder, ``check_head``,
decoder, optionally a compact module, and a
:class:`~ncz.models.representation.Representation` record), add the record to
:data:`REPRESENTATIONS` below, specify its sections in docs/FORMAT.md §5.4 and
give it a golden vector in :mod:`ncz.models.vectors`. A new head kind also needs
its id in ``ncz.format`` (``Kind``, ``layout.REPRESENTATION_HEADS``; a record
whose kind the container does not check is refused). Recipes, ``pack``,
``load_state_dict``, ``load_into`` and ``describe`` then find it here.

Imports point one way: the archive and recipes depend on this module, this
module on the representations, and the representations on nothing above them.
"""

from __future__ import annotations

from ncz.format import UsageError

from .codebook import CODEBOOK
from .dictionary import DICTIONARY
from .lossless import LOSSLESS
from .lowrank import LOW_RANK
from .quantized import QUANTIZED
from .representation import Representation

__all__ = ["REPRESENTATIONS", "by_name", "for_kind", "names"]

REPRESENTATIONS: tuple[Representation, ...] = (LOSSLESS, QUANTIZED, LOW_RANK, DICTIONARY, CODEBOOK)

_BY_NAME = {rep.name: rep for rep in REPRESENTATIONS}
_BY_KIND = {int(kind): rep for rep in REPRESENTATIONS for kind in rep.kinds}
if len(_BY_NAME) != len(REPRESENTATIONS) or len(_BY_KIND) != sum(len(rep.kinds) for rep in REPRESENTATIONS):
    raise UsageError("two representations share a name or a head kind")  # caught by importing, i.e. every test


def names() -> list[str]:
    """What a recipe's ``representation`` may say."""
    return sorted(_BY_NAME)


def by_name(name: str) -> Representation:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UsageError(f"unknown representation {name!r} (known: {names()})") from None


def for_kind(kind: int) -> Representation | None:
    """The representation whose head has this kind, or None (a kind this build does not decode)."""
    return _BY_KIND.get(int(kind))
