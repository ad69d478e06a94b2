"""Shared dictionary + sparse codes (DirNet), kind ``DICTIONARY``.

Zhang et al., "DirNet: Dimensionality Reduction via a Shared Dictionary for
Compressing Neural Networks" (and "Learning Compact RNNs with shared dictionary
and sparse codes"): the matrices of a *group* (the four gate blocks of an LSTM
weight, every FFN projection of one shape, ...) are written as ``W ≈ D·C`` with
one learned dictionary ``D`` (``dim × K``, unit-norm atoms) shared by the whole
group and a sparse code ``C`` per matrix: every column of ``W`` is a combination
of a few atoms. The dictionary is paid once for the group, so the more matrices
share it the cheaper each one gets; the code costs ~(index + value) bits per
non-zero. Atoms and sparsity adapt to one budget, as in DirNet.

- :mod:`.omp`: batched OMP (sparse coding over a dictionary);
- :mod:`.learning`: dictionary learning (MOD alternating with OMP);
- :mod:`.budget`: one budget for a group: atoms, sparsity, value steps
  (:func:`encode_dictionary_group`);
- :mod:`.format`: the ``DICTIONARY`` sections (FORMAT.md §5.4);
- :mod:`.module`: :class:`DictionaryLinear`, what ``load_into`` swaps in for an
  ``nn.Linear``: it keeps ``D`` (shared between the modules of a group) and the
  sparse codes and never materialises the dense weight;
- :mod:`.plan`: :func:`plan_dictionary`, the groups of a whole state dict.

:data:`DICTIONARY` is the record :mod:`ncz.models.registry` lists.
"""

from ncz.format import Kind

from ..representation import Representation
from .budget import encode_dictionary, encode_dictionary_group
from .format import check_dictionary_head, decode_dictionary
from .learning import learn_dictionary
from .module import DictionaryLinear, build_dictionary_linear
from .omp import SparseCodes, omp
from .plan import plan_dictionary

__all__ = [
    "DICTIONARY",
    "DictionaryLinear",
    "SparseCodes",
    "decode_dictionary",
    "encode_dictionary",
    "encode_dictionary_group",
    "learn_dictionary",
    "omp",
    "plan_dictionary",
]

DICTIONARY = Representation("dictionary", (Kind.DICTIONARY,), encode_dictionary, decode_dictionary,
                            check_dictionary_head, build_module=build_dictionary_linear)
