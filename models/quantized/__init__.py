"""Uniform scalar quantization with entropy-coded indices (DeepCABAC's idea, order-0).

- :mod:`.steps`: steps ∝ RMS per tensor / row / group / row × column, their codes,
  and the search for a relative-error or bits target (:func:`quantize_codes`);
- :mod:`.calibrated`: GPTQ rounding and frequency-weighted rows with calibration
  statistics (same steps, same layout);
- :mod:`.rdoq`: indices chosen for error + λ·bits (opt-in ``rdoq``; same layout);
- :mod:`.pairs`: two indices as one ANS symbol on large tensors;
- :mod:`.format`: the ``QUANTIZED`` sections (FORMAT.md §5.4).

:data:`QUANTIZED` is the record :mod:`ncz.models.registry` lists.
"""

from ncz.format import Kind

from ..representation import Representation
from .calibrated import TensorCalibration, quantize_calibrated
from .format import QuantizedParts, check_quantized_head, decode_quantized, encode_quantized, read_quantized
from .pairs import pair_symbols, unpair_symbols
from .search import quantize, quantize_codes
from .steps import GRANULARITIES, Quantized, dequantize, step_codes, step_values

__all__ = [
    "GRANULARITIES",
    "QUANTIZED",
    "Quantized",
    "QuantizedParts",
    "TensorCalibration",
    "decode_quantized",
    "dequantize",
    "encode_quantized",
    "pair_symbols",
    "quantize",
    "quantize_calibrated",
    "quantize_codes",
    "read_quantized",
    "step_codes",
    "step_values",
    "unpair_symbols",
]

QUANTIZED = Representation("quantized", (Kind.QUANTIZED,), encode_quantized, decode_quantized, check_quantized_head,
                           uses_calibration=True)
