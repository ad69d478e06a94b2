"""The AdaComp compressor: which gradient entries a worker sends, and error feedback.

Algorithm (one worker, one layer, one step; paper's Algorithm 1)
--------------------------------------------------------------
``g`` is this step's gradient, ``R`` the residue carried from earlier steps,
``L`` the bin length for the layer type.

1. ``G = R + g`` -- accumulate the gradient into the residue.
2. ``H = G + g`` -- the "self-adjusting" residue: boosted once more by the
   latest gradient, so entries whose fresh gradient agrees in sign with what is
   already owed are favoured, and entries being cancelled are held back.
3. Split ``G`` into consecutive bins of ``L`` elements (the last bin may be
   short) and compute ``g_max(bin) = max |G|`` over each bin.
4. Send element ``k`` iff ``|H[k]| >= g_max(bin(k))`` and ``G[k] != 0``.
   A quiet bin sends about one element, a bin where many entries are close to
   their maximum (high local activity) sends several: the compression rate
   adapts without a global threshold.
   *Addition over the paper* (``AdaCompConfig.always_send_bin_max``, default
   on): the arg-max of ``|G|`` in every non-zero bin is always sent as well.
   Under the paper's rule alone a bin can send nothing when the latest
   gradient opposes its largest residue; forcing the bin maximum guarantees
   every non-zero bin makes progress every step, at the cost of at most one
   extra element per bin.
5. Quantize the sent values to ``sign(G[k]) * scale`` with one shared scale per
   layer (per parameter tensor): ``scale = mean |G[k]|`` over the sent
   elements, stored as float32.
6. Error feedback: ``R_new = G - Q(G)`` on the sent entries and ``R_new = G``
   elsewhere. Hence ``Q(G) + R_new == R + g`` exactly up to float32 rounding:
   nothing is lost.

Bin lengths: the paper uses ``L_T = 50`` for convolutional layers and
``L_T = 500`` for fully-connected and LSTM layers (reporting ~40x and ~200x
end-to-end compression, respectively). Both, and the bin length for 1-D
tensors (biases, norms), are configurable in :class:`AdaCompConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F

from ncz.format import UsageError

__all__ = ["LAYER_TYPES", "layer_type_of", "AdaCompConfig", "SparseMessage", "AdaCompCompressor", "empty_message",
           "U32_MAX"]

#: Layer-type names used for bin lengths and statistics.
LAYER_TYPES: Final[tuple[str, ...]] = ("conv", "linear_lstm", "other")
U32_MAX: Final[int] = 0xFFFFFFFF  # numel is a u32 on the wire


def layer_type_of(param: torch.Tensor) -> str:
    """Classify a parameter for bin-length selection.

    ``ndim >= 3`` is a convolution kernel (1-D, 2-D or 3-D conv), ``ndim == 2``
    a fully-connected / recurrent / embedding matrix, anything else (biases,
    normalization scales, scalars) is ``"other"``.
    """
    if param.ndim >= 3:
        return "conv"
    if param.ndim == 2:
        return "linear_lstm"
    return "other"


# --------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaCompConfig:
    """Hyper-parameters of AdaComp; validated at construction.

    Attributes:
        bin_len_conv: bin length ``L_T`` for conv kernels (paper: 50).
        bin_len_linear_lstm: bin length for FC / LSTM / embedding matrices
            (paper: 500).
        bin_len_other: bin length for 1-D tensors (biases, norms). These are
            tiny, so a short bin costs little and keeps them accurate.
        warmup_steps: number of initial steps that use a plain all-reduce.
            At least 1 is recommended because DDP re-buckets after step 0.
        always_send_bin_max: also send the arg-max of every non-zero bin (see
            module docstring); guarantees per-bin progress.
        history_len: how many per-step statistics records to keep.
    """

    bin_len_conv: int = 50
    bin_len_linear_lstm: int = 500
    bin_len_other: int = 50
    warmup_steps: int = 1
    always_send_bin_max: bool = True
    history_len: int = 100_000

    def __post_init__(self) -> None:
        for name in ("bin_len_conv", "bin_len_linear_lstm", "bin_len_other"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UsageError(f"{name} must be an int, got {type(value).__name__}")
            if not 1 <= value <= 1 << 24:
                raise UsageError(f"{name} must be in [1, 2**24], got {value}")
        for name in ("warmup_steps", "history_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UsageError(f"{name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise UsageError(f"{name} must be >= 0, got {value}")
        if not isinstance(self.always_send_bin_max, bool):
            raise UsageError("always_send_bin_max must be a bool")

    def bin_len_for(self, layer_type: str) -> int:
        """Bin length for a layer type from :data:`LAYER_TYPES`."""
        if layer_type == "conv":
            return self.bin_len_conv
        if layer_type == "linear_lstm":
            return self.bin_len_linear_lstm
        if layer_type == "other":
            return self.bin_len_other
        raise UsageError(f"unknown layer type {layer_type!r}; expected one of {LAYER_TYPES}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdaCompConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UsageError(f"unknown AdaCompConfig fields: {sorted(unknown)}")
        return cls(**dict(data))


# --------------------------------------------------------------------------
# sparse message + compressor
# --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SparseMessage:
    """What one worker sends for one parameter tensor in one step.

    The dequantized dense update is ``u[indices[i]] = -scale if signs[i] else
    +scale`` (float32) and ``0`` elsewhere.

    Attributes:
        numel: length of the dense (flattened) tensor.
        indices: int64, strictly increasing, in ``[0, numel)``.
        signs: bool, same length as ``indices``; ``True`` means negative.
        scale: the shared magnitude, a float32-representable value ``>= 0``.
    """

    numel: int
    indices: np.ndarray
    signs: np.ndarray
    scale: float

    def __post_init__(self) -> None:
        idx = np.ascontiguousarray(self.indices, dtype=np.int64).reshape(-1)
        sgn = np.ascontiguousarray(self.signs, dtype=np.bool_).reshape(-1)
        object.__setattr__(self, "indices", idx)
        object.__setattr__(self, "signs", sgn)
        object.__setattr__(self, "scale", float(np.float32(self.scale)))
        if not 0 <= self.numel <= U32_MAX:
            raise UsageError(f"numel must be in [0, 2**32), got {self.numel}")
        if idx.shape != sgn.shape:
            raise UsageError(f"indices ({idx.size}) and signs ({sgn.size}) differ in length")
        if idx.size:
            if idx[0] < 0 or idx[-1] >= self.numel:
                raise UsageError(f"indices out of range [0, {self.numel})")
            if idx.size > 1 and not bool(np.all(np.diff(idx) > 0)):
                raise UsageError("indices must be strictly increasing")
        if not math.isfinite(self.scale) or self.scale < 0:
            raise UsageError(f"scale must be finite and >= 0, got {self.scale}")
        if idx.size == 0 and self.scale != 0.0:
            raise UsageError("an empty message must have scale 0")

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    def values(self) -> np.ndarray:
        """The dequantized sent values (float32), aligned with ``indices``."""
        s = np.float32(self.scale)
        return np.where(self.signs, -s, s).astype(np.float32)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SparseMessage):
            return NotImplemented
        return (
            self.numel == other.numel
            and self.scale == other.scale
            and np.array_equal(self.indices, other.indices)
            and np.array_equal(self.signs, other.signs)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable numpy payload


class AdaCompCompressor:
    """Single-process AdaComp selection/quantization on flat tensors.

    Stateless apart from its flag; the residue is owned by the caller and is
    updated in place so that the hook can keep one residue buffer per bucket.
    """

    def __init__(self, always_send_bin_max: bool = True) -> None:
        self.always_send_bin_max = always_send_bin_max

    def compress(self, grad_flat: torch.Tensor, residue: torch.Tensor, bin_len: int) -> SparseMessage:
        """Select and quantize ``residue + grad_flat``; update ``residue`` in place.

        Args:
            grad_flat: 1-D gradient slice (any float dtype; used as float32).
            residue: 1-D float32 residue of the same length, on the same
                device. On return it holds ``old_residue + grad - sent``.
            bin_len: ``L_T`` for this tensor.

        Returns:
            The :class:`SparseMessage` (indices/signs on the CPU).

        Raises:
            UsageError: on shape/dtype mismatch, a bad ``bin_len`` or a
                non-finite gradient (which would poison the residue forever).
        """
        if grad_flat.ndim != 1 or residue.ndim != 1 or grad_flat.numel() != residue.numel():
            raise UsageError(
                f"grad and residue must be 1-D of equal length, got {tuple(grad_flat.shape)} "
                f"and {tuple(residue.shape)}"
            )
        if residue.dtype != torch.float32:
            raise UsageError(f"residue must be float32, got {residue.dtype}")
        if isinstance(bin_len, bool) or not isinstance(bin_len, int) or bin_len < 1:
            raise UsageError(f"bin_len must be a positive int, got {bin_len!r}")
        n = residue.numel()
        if n == 0:
            return empty_message(0)
        g = grad_flat.detach().to(device=residue.device, dtype=torch.float32)
        # one fast reduction instead of an elementwise isfinite pass: NaN/inf
        # propagate into the sum (a finite float32 gradient whose sum overflows
        # is rejected too, which is just as unusable)
        if not math.isfinite(float(g.sum())):
            raise UsageError("non-finite gradient; AdaComp would keep it in the residue forever")

        residue.add_(g)  # G = R + g
        h = residue + g  # H = G + g (self-adjusting)
        n_bins = -(-n // bin_len)
        pad = n_bins * bin_len - n
        abs_g = residue.abs()
        abs_h = h.abs_()
        if pad:
            abs_g = F.pad(abs_g, (0, pad))  # padding is 0 -> never selected
            abs_h = F.pad(abs_h, (0, pad))
        abs_g_bins = abs_g.view(n_bins, bin_len)
        g_max, arg_max = abs_g_bins.max(dim=1)
        mask = abs_h.view(n_bins, bin_len) >= g_max.unsqueeze(1)
        mask &= abs_g_bins > 0
        if self.always_send_bin_max:
            rows = torch.arange(n_bins, device=residue.device)
            mask[rows, arg_max] |= g_max > 0
        idx = mask.view(-1).nonzero().squeeze(1)
        if idx.numel() == 0:
            return empty_message(n)
        vals = residue.index_select(0, idx)
        scale = vals.abs().mean()  # float32, shared by the whole tensor
        neg = vals < 0
        sent = torch.where(neg, -scale, scale)
        residue.index_copy_(0, idx, vals - sent)  # error feedback
        return SparseMessage(
            numel=n,
            indices=idx.cpu().numpy(),
            signs=neg.cpu().numpy(),
            scale=float(scale.item()),
        )

    @staticmethod
    def decompress(
        msg: SparseMessage,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Dense tensor of length ``msg.numel`` holding the dequantized update."""
        out = torch.zeros(msg.numel, dtype=dtype, device=device)
        if msg.nnz:
            idx = torch.from_numpy(msg.indices).to(out.device)
            out.index_put_((idx,), torch.from_numpy(msg.values()).to(device=out.device, dtype=dtype))
        return out

    @staticmethod
    def accumulate(dense: torch.Tensor, msg: SparseMessage) -> None:
        """``dense += decompress(msg)`` without materializing a dense temporary."""
        if msg.numel != dense.numel():
            raise UsageError(f"message numel {msg.numel} != tensor numel {dense.numel()}")
        if msg.nnz:
            idx = torch.from_numpy(msg.indices).to(dense.device)
            vals = torch.from_numpy(msg.values()).to(device=dense.device, dtype=dense.dtype)
            dense.index_put_((idx,), vals, accumulate=True)


def empty_message(numel: int) -> SparseMessage:
    return SparseMessage(numel=numel, indices=np.empty(0, np.int64), signs=np.empty(0, np.bool_), scale=0.0)

