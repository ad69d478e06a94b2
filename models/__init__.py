"""ncz.models: weight compression into model archives, and AdaComp.

- checkpoints in: :func:`open_checkpoint` (safetensors, state_dict, HF folder; never unpickles)
- representations: lossless (raw / zstd / byte planes), quantized (+ entropy coding)
- archives: :func:`pack`, :func:`load_state_dict`, :func:`unpack`, :func:`describe`
- recipes and presets: :class:`Recipe`
- AdaComp residual gradient compression as a DDP communication hook: :func:`register_adacomp`
- product-quantized embeddings, task-aware: :class:`CodebookEmbedding`, :func:`finetune_codebooks`
"""

from .adacomp import (
    LAYER_TYPES,
    AdaCompCompressor,
    AdaCompConfig,
    AdaCompState,
    AdaCompWireError,
    SparseMessage,
    StepStats,
    adacomp_hook,
    decode_message,
    encode_message,
    register_adacomp,
)
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
    "LAYER_TYPES",
    "AdaCompCompressor",
    "AdaCompConfig",
    "AdaCompState",
    "AdaCompWireError",
    "SparseMessage",
    "StepStats",
    "adacomp_hook",
    "decode_message",
    "encode_message",
    "register_adacomp",
]
