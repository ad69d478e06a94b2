"""ncz.models: weight compression into model archives, and AdaComp.

- checkpoints in: :func:`open_checkpoint` (safetensors, state_dict, HF folder; never unpickles)
- representations: lossless (raw / zstd / byte planes), quantized (+ entropy coding)
- archives: :func:`pack`, :func:`load_state_dict`, :func:`unpack`, :func:`describe`
- recipes and presets: :class:`Recipe`
- calibration on real inputs (GPTQ for linear layers, frequency-weighted embedding rows):
  :func:`calibrate`, :class:`Calibration`, ``pack(..., calibration=)``
- low-rank factors with joint rank selection (BSR): :func:`plan_lowrank`, :func:`stable_rank_penalty`
- shared dictionaries with sparse codes (DirNet): :func:`plan_dictionary`, :class:`DictionaryLinear`
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
from .calibration import Calibration, calibrate
from .checkpoint import TensorSource, open_checkpoint
from .dictionary import DictionaryLinear, encode_dictionary, encode_dictionary_group, plan_dictionary
from .embedding import CodebookEmbedding, encode_codebook, finetune_codebooks, packable_state_dict, product_quantize
from .lowrank import LowRankConv2d, LowRankLinear, plan_lowrank, select_ranks, stable_rank_penalty
from .recipe import PRESETS, TENSOR_CLASSES, Recipe, Rule, tiered

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
    "Calibration",
    "calibrate",
    "open_checkpoint",
    "PRESETS",
    "Recipe",
    "Rule",
    "TENSOR_CLASSES",
    "tiered",
    "CodebookEmbedding",
    "encode_codebook",
    "finetune_codebooks",
    "packable_state_dict",
    "product_quantize",
    "DictionaryLinear",
    "encode_dictionary",
    "encode_dictionary_group",
    "plan_dictionary",
    "LowRankLinear",
    "LowRankConv2d",
    "plan_lowrank",
    "select_ranks",
    "stable_rank_penalty",
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
