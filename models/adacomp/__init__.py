"""AdaComp: adaptive residual gradient compression as a DDP communication hook.

Reference
---------
Chia-Yu Chen, Jungwook Choi, Daniel Brand, Ankur Agrawal, Wei Zhang, Kailash
Gopalakrishnan. "AdaComp: Adaptive Residual Gradient Compression for
Data-Parallel Distributed Training". AAAI 2018 (arXiv:1712.02679).

Why
---
Data-parallel training exchanges a dense fp32 gradient per step. AdaComp sends
only a few, coarsely quantized entries per step and keeps everything it did not
send in a local *residue* (error feedback), so no gradient mass is ever dropped;
it is only delayed. Unlike global top-k it needs no sort: the selection is local
to fixed-size bins, and the number of entries sent per bin adapts by itself to
how "active" that part of the layer is.


Gradients are not weights: this package shares no code path with the weight
representations and is loaded only when used (``import ncz.models`` does not
import it; the AdaComp names of ``ncz.models`` load it on first access).

- :mod:`.compressor`: the selection rule and error feedback (paper's Algorithm 1);
- :mod:`.wire`: the byte format of a message and of a bucket payload (FORMAT.md §9);
- :mod:`.hook`: the DDP communication hook, its state and statistics.
"""

from ncz.format.errors import AdaCompWireError

from .compressor import LAYER_TYPES, AdaCompCompressor, AdaCompConfig, SparseMessage, layer_type_of
from .hook import AdaCompState, LayerBytes, StepStats, adacomp_hook, register_adacomp
from .wire import WireEncoding, decode_message, encode_message, encoded_sizes

__all__ = [
    "AdaCompConfig",
    "AdaCompCompressor",
    "AdaCompState",
    "AdaCompWireError",
    "LAYER_TYPES",
    "LayerBytes",
    "SparseMessage",
    "StepStats",
    "WireEncoding",
    "adacomp_hook",
    "decode_message",
    "encode_message",
    "encoded_sizes",
    "layer_type_of",
    "register_adacomp",
]
