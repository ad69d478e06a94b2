"""Product-quantized embedding tables: codebooks + per-row codes, kind ``CODEBOOK``.

- :mod:`.pq`: product quantization (k-means per subspace, residual stages);
- :mod:`.format`: the ``CODEBOOK`` sections (FORMAT.md §5.4);
- :mod:`.module`: :class:`CodebookEmbedding`, what ``load_into`` swaps in for an
  ``nn.Embedding``: only codebooks and codes stay in memory.

Training the codebooks with the task's loss is :mod:`ncz.models.embedding`.
:data:`CODEBOOK` is the record :mod:`ncz.models.registry` lists.
"""

from ncz.format import Kind

from ..representation import Representation
from .format import CODEBOOK_STORAGE, build_codebook_module, check_codebook_head, decode_codebook, encode_codebook
from .module import CodebookEmbedding
from .pq import product_quantize, reconstruct

__all__ = [
    "CODEBOOK",
    "CODEBOOK_STORAGE",
    "CodebookEmbedding",
    "decode_codebook",
    "encode_codebook",
    "product_quantize",
    "reconstruct",
]

CODEBOOK = Representation("codebook", (Kind.CODEBOOK,), encode_codebook, decode_codebook, check_codebook_head,
                          build_module=build_codebook_module)
