"""ncz.models: weight compression into model archives, and AdaComp.

- checkpoints in: :func:`open_checkpoint` (safetensors, state_dict, HF folder; never unpickles)
- representations: lossless (raw / zstd / byte planes), quantized (+ entropy coding)
- archives: :func:`pack`, :func:`load_state_dict`, :func:`unpack`, :func:`describe`
- recipes and presets: :class:`Recipe`
- product-quantized embeddings, task-aware: :class:`CodebookEmbedding`, :func:`finetune_codebooks`
"""

from .archive import LoadReport, PackReport, TensorReport, describe, iter_tensors, load_into, load_state_dict, pack, unpack
from .checkpoint import TensorSource, open_checkpoint
from .embedding import CodebookEmbedding, encode_codebook, finetune_codebooks, packable_state_dict, product_quantize
from .recipe import PRESETS, Recipe, Rule

__all__ = [
    "PackReport",
    "TensorReport",
    "describe",
    "iter_tensors",
    "load_state_dict",
    "load_into",
    "LoadReport",
    "pack",
    "unpack",
    "TensorSource",
    "open_checkpoint",
    "PRESETS",
    "Recipe",
    "Rule",
    "CodebookEmbedding",
    "encode_codebook",
    "finetune_codebooks",
    "packable_state_dict",
    "product_quantize",
]
