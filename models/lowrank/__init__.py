"""Low-rank weights: W ≈ U·V with quantized, entropy-coded factors, ranks chosen jointly (BSR).

After Eo, Kang & Rhee, "An effective low-rank compression with a joint rank
selection followed by a compression-friendly training", Neural Networks 2023
(arXiv:2111.15179, "BSR": Beam-search and Stable Rank). BSR's two ideas are here,
each in its own module:

- :mod:`.selection`: joint rank selection by beam search (:func:`select_ranks`);
- :mod:`.penalty`: compression-friendly training (:func:`stable_rank_penalty`);

and around them:

- :mod:`.svd`: matrix views, SVDs, truncation errors;
- :mod:`.format`: the ``LOW_RANK`` sections (FORMAT.md §5.4);
- :mod:`.modules`: ``LowRankLinear`` and ``LowRankConv2d``, what ``load_into``
  swaps in;
- :mod:`.plan`: :func:`plan_lowrank`, a recipe for a whole state dict. It builds a
  :class:`~ncz.models.Recipe`, which sits above the registry, so this package does
  not import it (``from ncz.models import plan_lowrank``).

:data:`LOW_RANK` is the record :mod:`ncz.models.registry` lists.
"""

from ncz.format import Kind

from ..representation import Representation
from .format import build_lowrank_module, check_lowrank_head, decode_lowrank, encode_lowrank
from .modules import LowRankConv2d, LowRankLinear
from .penalty import stable_rank_penalty
from .selection import ranks_proxy, select_ranks, uniform_ranks
from .svd import break_even_rank, factorize

__all__ = [
    "LOW_RANK",
    "LowRankConv2d",
    "LowRankLinear",
    "break_even_rank",
    "decode_lowrank",
    "encode_lowrank",
    "factorize",
    "ranks_proxy",
    "select_ranks",
    "stable_rank_penalty",
    "uniform_ranks",
]

LOW_RANK = Representation("lowrank", (Kind.LOW_RANK,), encode_lowrank, decode_lowrank, check_lowrank_head,
                          build_module=build_lowrank_module)
