"""ncz.models: weight compression into model archives, and AdaComp.

- checkpoints in: :func:`open_checkpoint` (safetensors, state_dict, HF folder; never unpickles)
- archives: :func:`pack`, :func:`load_state_dict`, :func:`unpack`, :func:`describe`, :func:`load_into`
- recipes and presets: :class:`Recipe`
- sized by a task metric: :func:`pack_for_metric` (one global scale on a recipe's error targets)
- representations, listed once in :mod:`ncz.models.registry`: lossless (raw / zstd / byte
  planes), quantized (+ entropy coding), low-rank, dictionary, codebook
- calibration on real inputs (GPTQ for linear layers, frequency-weighted embedding rows):
  :func:`calibrate`, :class:`Calibration`, ``pack(..., calibration=)``
- low-rank factors with joint rank selection (BSR): :func:`plan_lowrank`, :func:`stable_rank_penalty`
- shared dictionaries with sparse codes (DirNet): :func:`plan_dictionary`, :class:`DictionaryLinear`
- product-quantized embeddings, task-aware: :class:`CodebookEmbedding`, :func:`finetune_codebooks`
- quantization-aware fine-tuning that rounds as the packer will: :class:`QuantAware`
- AdaComp residual gradient compression as a DDP communication hook: :func:`register_adacomp`.
  Gradients are not weights: :mod:`ncz.models.adacomp` (and ``torch.distributed`` with it) is
  imported on first access to one of its names, not by ``import ncz.models``.
"""

import importlib

from ncz.format.errors import AdaCompWireError

from .archive import (
    LoadReport,
    PackReport,
    TensorReport,
    describe,
    iter_tensors,
    load_into,
    load_state_dict,
    pack,
    unpack,
)
from .calibration import Calibration, calibrate
from .checkpoint import TensorSource, open_checkpoint
from .codebook import CodebookEmbedding, encode_codebook, product_quantize
from .dictionary import DictionaryLinear, encode_dictionary, encode_dictionary_group, plan_dictionary
from .embedding import finetune_codebooks, packable_state_dict
from .lowrank import LowRankConv2d, LowRankLinear, select_ranks, stable_rank_penalty
from .lowrank.plan import plan_lowrank
from .metric_search import MetricPackResult, MetricPoint, pack_for_metric
from .quant_aware import QuantAware
from .recipe import PRESETS, TENSOR_CLASSES, Recipe, Rule, tiered

# loaded by __getattr__ on first use
_ADACOMP = ("LAYER_TYPES", "AdaCompCompressor", "AdaCompConfig", "AdaCompState", "SparseMessage", "StepStats",
            "adacomp_hook", "decode_message", "encode_message", "register_adacomp")

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
    "pack_for_metric",
    "MetricPackResult",
    "MetricPoint",
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
    "QuantAware",
    "select_ranks",
    "stable_rank_penalty",
    "AdaCompWireError",
    *_ADACOMP,
]


def __getattr__(name: str):
    """AdaComp's names, importing :mod:`ncz.models.adacomp` the first time one is asked for."""
    if name in _ADACOMP:
        return getattr(importlib.import_module(f"{__name__}.adacomp"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
