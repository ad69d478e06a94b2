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

Data flow in the DDP hook (:func:`adacomp_hook`)
-----------------------------------------------
For each gradient bucket DDP hands us:

* layer type per parameter from ``param.ndim``: ``>= 3`` -> ``"conv"``,
  ``2`` -> ``"linear_lstm"`` (Linear, LSTM, Embedding matrices), ``<= 1`` ->
  ``"other"`` (biases, norm scales);
* each parameter's slice of the flat bucket (slices follow parameter order) is
  compressed with its own bin length against the bucket's float32 residue
  (kept in :class:`AdaCompState`, keyed by bucket index);
* each slice becomes a :class:`SparseMessage`, serialized by
  :func:`encode_message`; the bucket payload frames the messages;
* payload sizes are exchanged with ``all_gather`` (int64), then the payloads,
  zero-padded to the largest, with a second ``all_gather`` (uint8, on the
  bucket's device so NCCL works too);
* every rank decodes every payload in rank order (so all replicas compute a
  bit-identical sum), sums the dequantized sparse updates densely, divides by
  the world size and writes the result into the bucket buffer;
* a completed :class:`torch.futures.Future` holding the buffer is returned.

The first ``warmup_steps`` steps use a plain all-reduce. Besides letting the
model leave its most chaotic phase uncompressed, at least one plain step keeps
residues from being keyed to DDP's initial bucket layout: DDP rebuilds its
buckets after the first iteration (the same reason PowerSGD requires
``start_powerSGD_iter > 1``).

Wire format of one message (:func:`encode_message`), little-endian
-----------------------------------------------------------------
=======  =============  ===================================================
offset   size (bytes)   field
=======  =============  ===================================================
0        1              tag: 0 = BITPACK, 1 = VARINT, 2 = RICE
1        4              ``numel``  u32, length of the dense slice
5        4              ``nnz``    u32, number of sent entries, ``<= numel``
9        4              ``scale``  f32, finite, ``>= 0``; ``0`` when nnz = 0
13       variable       index payload (depends on tag, below)
...      ceil(nnz/8)    sign bits, LSB-first; bit ``i`` = 1 iff entry ``i``
                        is negative; unused high bits of the last byte = 0
=======  =============  ===================================================

Indices are strictly increasing and coded as gaps ``d_0 = idx_0``,
``d_i = idx_i - idx_(i-1) - 1`` (all ``>= 0``, ``< numel``):

* ``BITPACK``: 1 byte width ``w`` in ``[0, 32]`` (= bit length of the largest
  gap), then ``ceil(nnz*w/8)`` bytes; gap ``i`` occupies bits
  ``[i*w, (i+1)*w)`` of the LSB-first bit stream. Unused bits are 0.
* ``VARINT``: ``nnz`` unsigned LEB128 varints (7 data bits per byte, high bit
  set on all but the last byte; at most 5 bytes; no over-long encodings).
* ``RICE``: 1 byte ``k`` in ``[0, 31]``; then the quotients ``d_i >> k`` in
  unary (``q`` zero bits followed by a one bit, LSB-first, the stream padded
  with zero bits to a byte boundary); then the remainders
  ``d_i & (2**k - 1)`` bit-packed at width ``k`` as in BITPACK.

The encoder computes the exact size of all three and emits the smallest
(ties: lowest tag). BITPACK wins for dense or uniform gaps (width 0 costs
nothing), VARINT when a few huge gaps would inflate a fixed width, RICE for
the geometric-looking gaps AdaComp typically produces. The message length is
implied by its contents; :func:`decode_message` rejects trailing bytes, so a
message is canonical and self-checking.

The bucket payload is ``u32 count`` followed by ``count`` frames of
``u32 length`` + message bytes.
"""

import dataclasses
import enum
import logging
import math
import struct
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

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

logger = logging.getLogger(__name__)

#: Layer-type names used for bin lengths and statistics.
LAYER_TYPES: Final[tuple[str, ...]] = ("conv", "linear_lstm", "other")

_HEADER = struct.Struct("<BIIf")  # tag, numel, nnz, scale
_U32 = struct.Struct("<I")
_U32_MAX: Final[int] = 0xFFFFFFFF
_MAX_VARINT_BYTES: Final[int] = 5
_STATE_VERSION: Final[int] = 1


class AdaCompWireError(ValueError):
    """A byte string is not a valid AdaComp message or bucket payload."""


class WireEncoding(enum.IntEnum):
    """Index-gap encodings; the value is the tag byte on the wire."""

    BITPACK = 0
    VARINT = 1
    RICE = 2


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
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if not 1 <= value <= 1 << 24:
                raise ValueError(f"{name} must be in [1, 2**24], got {value}")
        for name in ("warmup_steps", "history_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not isinstance(self.always_send_bin_max, bool):
            raise TypeError("always_send_bin_max must be a bool")

    def bin_len_for(self, layer_type: str) -> int:
        """Bin length for a layer type from :data:`LAYER_TYPES`."""
        if layer_type == "conv":
            return self.bin_len_conv
        if layer_type == "linear_lstm":
            return self.bin_len_linear_lstm
        if layer_type == "other":
            return self.bin_len_other
        raise ValueError(f"unknown layer type {layer_type!r}; expected one of {LAYER_TYPES}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AdaCompConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown AdaCompConfig fields: {sorted(unknown)}")
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
        if not 0 <= self.numel <= _U32_MAX:
            raise ValueError(f"numel must be in [0, 2**32), got {self.numel}")
        if idx.shape != sgn.shape:
            raise ValueError(f"indices ({idx.size}) and signs ({sgn.size}) differ in length")
        if idx.size:
            if idx[0] < 0 or idx[-1] >= self.numel:
                raise ValueError(f"indices out of range [0, {self.numel})")
            if idx.size > 1 and not bool(np.all(np.diff(idx) > 0)):
                raise ValueError("indices must be strictly increasing")
        if not math.isfinite(self.scale) or self.scale < 0:
            raise ValueError(f"scale must be finite and >= 0, got {self.scale}")
        if idx.size == 0 and self.scale != 0.0:
            raise ValueError("an empty message must have scale 0")

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
            ValueError: on shape/dtype mismatch, a bad ``bin_len`` or a
                non-finite gradient (which would poison the residue forever).
        """
        if grad_flat.ndim != 1 or residue.ndim != 1 or grad_flat.numel() != residue.numel():
            raise ValueError(
                f"grad and residue must be 1-D of equal length, got {tuple(grad_flat.shape)} "
                f"and {tuple(residue.shape)}"
            )
        if residue.dtype != torch.float32:
            raise ValueError(f"residue must be float32, got {residue.dtype}")
        if isinstance(bin_len, bool) or not isinstance(bin_len, int) or bin_len < 1:
            raise ValueError(f"bin_len must be a positive int, got {bin_len!r}")
        n = residue.numel()
        if n == 0:
            return _empty_message(0)
        g = grad_flat.detach().to(device=residue.device, dtype=torch.float32)
        # one fast reduction instead of an elementwise isfinite pass: NaN/inf
        # propagate into the sum (a finite float32 gradient whose sum overflows
        # is rejected too, which is just as unusable)
        if not math.isfinite(float(g.sum())):
            raise ValueError("non-finite gradient; AdaComp would keep it in the residue forever")

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
            return _empty_message(n)
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
            raise ValueError(f"message numel {msg.numel} != tensor numel {dense.numel()}")
        if msg.nnz:
            idx = torch.from_numpy(msg.indices).to(dense.device)
            vals = torch.from_numpy(msg.values()).to(device=dense.device, dtype=dense.dtype)
            dense.index_put_((idx,), vals, accumulate=True)


def _empty_message(numel: int) -> SparseMessage:
    return SparseMessage(numel=numel, indices=np.empty(0, np.int64), signs=np.empty(0, np.bool_), scale=0.0)


# --------------------------------------------------------------------------
# wire format
# --------------------------------------------------------------------------


def _bit_length(values: np.ndarray) -> np.ndarray:
    """Per-element bit length of non-negative integers < 2**52 (0 -> 0)."""
    return np.frexp(values.astype(np.float64))[1].astype(np.int64)


def _gaps(indices: np.ndarray) -> np.ndarray:
    gaps = np.empty(indices.size, dtype=np.int64)
    if indices.size:
        gaps[0] = indices[0]
        gaps[1:] = np.diff(indices) - 1
    return gaps


def _pack_fixed(values: np.ndarray, width: int) -> bytes:
    if width == 0 or values.size == 0:
        return b""
    shifts = np.arange(width, dtype=np.uint64)
    bits = ((values.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def _unpack_fixed(buf: np.ndarray, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`_pack_fixed`; ``buf`` must be exactly the packed bytes."""
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    nbits = count * width
    bits = np.unpackbits(buf, bitorder="little")
    if bits[nbits:].any():
        raise AdaCompWireError("non-zero padding bits in a bit-packed field")
    weights = np.left_shift(np.uint64(1), np.arange(width, dtype=np.uint64))
    vals = (bits[:nbits].reshape(count, width).astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
    return vals.astype(np.int64)


def _varint_lengths(gaps: np.ndarray) -> np.ndarray:
    return np.maximum(1, -(-_bit_length(gaps) // 7))


def _encode_varint(gaps: np.ndarray) -> bytes:
    if gaps.size == 0:
        return b""
    lens = _varint_lengths(gaps)
    owner = np.repeat(np.arange(gaps.size), lens)
    starts = np.cumsum(lens) - lens
    pos = np.arange(int(lens.sum())) - np.repeat(starts, lens)
    payload = (gaps[owner] >> (7 * pos)) & 0x7F
    cont = (pos < lens[owner] - 1).astype(np.int64) << 7
    return (payload | cont).astype(np.uint8).tobytes()


def _rice_sizes(gaps: np.ndarray) -> tuple[int, int]:
    """(best k, payload bytes incl. the k byte) for Rice coding ``gaps``."""
    nnz = gaps.size
    max_k = min(31, int(_bit_length(gaps).max())) if nnz else 0
    best_k, best = 0, None
    for k in range(max_k + 1):
        unary_bits = int((gaps >> k).sum()) + nnz
        size = 1 + -(-unary_bits // 8) + -(-(nnz * k) // 8)
        if best is None or size < best:
            best_k, best = k, size
    assert best is not None
    return best_k, best


def _encode_rice(gaps: np.ndarray, k: int) -> bytes:
    q = gaps >> k
    ones = np.cumsum(q + 1) - 1  # position of each terminating 1 bit
    total_bits = int(ones[-1]) + 1 if gaps.size else 0
    bits = np.zeros(total_bits, dtype=np.uint8)
    bits[ones] = 1
    unary = np.packbits(bits, bitorder="little").tobytes()
    rem = _pack_fixed(gaps & ((1 << k) - 1), k)
    return bytes([k]) + unary + rem


def encoded_sizes(msg: SparseMessage) -> dict[WireEncoding, int]:
    """Exact encoded length in bytes of ``msg`` under each encoding."""
    gaps = _gaps(msg.indices)
    nnz = gaps.size
    fixed = _HEADER.size + -(-nnz // 8)
    width = int(_bit_length(gaps).max()) if nnz else 0
    return {
        WireEncoding.BITPACK: fixed + 1 + -(-(nnz * width) // 8),
        WireEncoding.VARINT: fixed + int(_varint_lengths(gaps).sum()),
        WireEncoding.RICE: fixed + _rice_sizes(gaps)[1],
    }


def encode_message(msg: SparseMessage, encoding: WireEncoding | None = None) -> bytes:
    """Serialize ``msg``; with ``encoding=None`` the smallest encoding is used.

    See the module docstring for the byte layout.
    """
    gaps = _gaps(msg.indices)
    nnz = gaps.size
    if encoding is None:
        sizes = encoded_sizes(msg)
        encoding = min(sizes, key=lambda e: (sizes[e], int(e)))
    encoding = WireEncoding(encoding)
    if encoding is WireEncoding.BITPACK:
        width = int(_bit_length(gaps).max()) if nnz else 0
        body = bytes([width]) + _pack_fixed(gaps, width)
    elif encoding is WireEncoding.VARINT:
        body = _encode_varint(gaps)
    else:
        body = _encode_rice(gaps, _rice_sizes(gaps)[0])
    signs = np.packbits(msg.signs.astype(np.uint8), bitorder="little").tobytes()
    return _HEADER.pack(int(encoding), msg.numel, nnz, msg.scale) + body + signs


def _need(buf: np.ndarray, pos: int, count: int, what: str) -> None:
    if count < 0 or pos + count > buf.size:
        raise AdaCompWireError(
            f"truncated message: {what} needs {count} bytes at offset {pos}, only {buf.size - pos} left"
        )


def _decode_varint(region: np.ndarray, nnz: int) -> tuple[np.ndarray, int]:
    terminators = np.flatnonzero((region & 0x80) == 0)
    if terminators.size < nnz:
        raise AdaCompWireError(f"truncated message: {terminators.size} of {nnz} varints present")
    if nnz == 0:
        return np.zeros(0, np.int64), 0
    ends = terminators[:nnz]
    end = int(ends[-1]) + 1
    starts = np.concatenate(([0], ends[:-1] + 1))
    lens = ends - starts + 1
    if int(lens.max()) > _MAX_VARINT_BYTES:
        raise AdaCompWireError(f"varint longer than {_MAX_VARINT_BYTES} bytes")
    if bool(np.any((lens > 1) & (region[ends] == 0))):
        raise AdaCompWireError("over-long varint encoding")
    seg = region[:end].astype(np.int64)
    owner = np.repeat(np.arange(nnz), lens)
    pos = np.arange(end) - np.repeat(starts, lens)
    parts = ((seg & 0x7F) << (7 * pos)).astype(np.float64)  # < 2**35: exact in float64
    vals = np.bincount(owner, weights=parts, minlength=nnz).astype(np.int64)
    return vals, end


def _decode_rice(region: np.ndarray, nnz: int) -> tuple[np.ndarray, int]:
    if region.size < 1:
        raise AdaCompWireError("truncated message: missing Rice parameter byte")
    k = int(region[0])
    if k > 31:
        raise AdaCompWireError(f"Rice parameter k={k} > 31")
    if nnz == 0:
        return np.zeros(0, np.int64), 1
    bits = np.unpackbits(region[1:], bitorder="little")
    ones = np.flatnonzero(bits)
    if ones.size < nnz:
        raise AdaCompWireError(f"truncated message: {ones.size} of {nnz} unary codes present")
    last = int(ones[nnz - 1])
    unary_bytes = last // 8 + 1
    if ones.size > nnz and int(ones[nnz]) < unary_bytes * 8:
        raise AdaCompWireError("non-zero padding bits after the unary quotients")
    q = np.diff(np.concatenate(([-1], ones[:nnz]))) - 1
    rem_bytes = -(-(nnz * k) // 8)
    start = 1 + unary_bytes
    _need(region, start, rem_bytes, "Rice remainders")
    rem = _unpack_fixed(region[start : start + rem_bytes], nnz, k)
    if int(q.max()) >= 1 << (32 - k):  # gaps must fit in u32; also keeps the shift in int64
        raise AdaCompWireError("Rice quotient too large")
    return (q.astype(np.int64) << k) | rem, start + rem_bytes


def decode_message(data: bytes | bytearray | memoryview, expected_numel: int | None = None) -> SparseMessage:
    """Parse and validate one message produced by :func:`encode_message`.

    Args:
        data: exactly one message (no trailing bytes).
        expected_numel: if given, the message must describe a tensor of this
            length (the hook passes the local parameter size, so a peer with a
            different model is caught before anything is allocated).

    Raises:
        AdaCompWireError: truncated input, unknown tag, ``nnz > numel``,
            indices out of bounds, bad scale, non-canonical padding or varints,
            trailing bytes.
    """
    raw = bytes(data)
    buf = np.frombuffer(raw, dtype=np.uint8)
    _need(buf, 0, _HEADER.size, "header")
    tag, numel, nnz, scale = _HEADER.unpack_from(raw, 0)
    try:
        encoding = WireEncoding(tag)
    except ValueError:
        raise AdaCompWireError(f"unknown encoding tag {tag}") from None
    if expected_numel is not None and numel != expected_numel:
        raise AdaCompWireError(f"message numel {numel} != expected {expected_numel}")
    if nnz > numel:
        raise AdaCompWireError(f"nnz {nnz} > numel {numel}")
    if not math.isfinite(scale) or scale < 0:
        raise AdaCompWireError(f"scale must be finite and >= 0, got {scale}")
    if nnz == 0 and scale != 0:
        raise AdaCompWireError("empty message with non-zero scale")
    sign_bytes = -(-nnz // 8)
    pos = _HEADER.size
    # cheap lower bound before any allocation proportional to nnz
    _need(buf, pos, sign_bytes, "sign bits")
    region = buf[pos : buf.size - sign_bytes]
    if encoding is WireEncoding.BITPACK:
        _need(region, 0, 1, "bit width")
        width = int(region[0])
        if width > 32:
            raise AdaCompWireError(f"bit width {width} > 32")
        nbytes = -(-(nnz * width) // 8)
        _need(region, 1, nbytes, "bit-packed gaps")
        gaps = _unpack_fixed(region[1 : 1 + nbytes], nnz, width)
        used = 1 + nbytes
    elif encoding is WireEncoding.VARINT:
        if region.size < nnz:
            raise AdaCompWireError(f"truncated message: {nnz} varints need >= {nnz} bytes")
        gaps, used = _decode_varint(region, nnz)
    else:
        gaps, used = _decode_rice(region, nnz)
    if used != region.size:
        raise AdaCompWireError(
            f"message length mismatch: index payload is {used} bytes but {region.size} precede the sign bits"
        )
    if nnz:
        if int(gaps.min()) < 0 or int(gaps.max()) >= numel:
            raise AdaCompWireError(f"index gap out of range for numel {numel}")
        # gaps < 2**32 and nnz < 2**32, so this uint64 sum cannot overflow
        last = int(gaps.astype(np.uint64).sum(dtype=np.uint64)) + nnz - 1
        if last >= numel:
            raise AdaCompWireError(f"index {last} out of range [0, {numel})")
        indices = np.cumsum(gaps + 1) - 1
    else:
        indices = gaps
    sign_buf = buf[buf.size - sign_bytes :]
    sign_bits = np.unpackbits(sign_buf, bitorder="little")
    if sign_bits[nnz:].any():
        raise AdaCompWireError("non-zero padding bits after the sign bits")
    return SparseMessage(numel=numel, indices=indices, signs=sign_bits[:nnz].astype(np.bool_), scale=scale)


def _frame(messages: Sequence[bytes]) -> bytes:
    parts = [_U32.pack(len(messages))]
    for m in messages:
        parts.append(_U32.pack(len(m)))
        parts.append(m)
    return b"".join(parts)


def _unframe(payload: bytes, expected_count: int) -> list[bytes]:
    if len(payload) < 4:
        raise AdaCompWireError("truncated bucket payload: missing message count")
    (count,) = _U32.unpack_from(payload, 0)
    if count != expected_count:
        raise AdaCompWireError(f"bucket payload has {count} messages, expected {expected_count}")
    out: list[bytes] = []
    pos = 4
    for i in range(count):
        if pos + 4 > len(payload):
            raise AdaCompWireError(f"truncated bucket payload at frame {i}")
        (length,) = _U32.unpack_from(payload, pos)
        pos += 4
        if pos + length > len(payload):
            raise AdaCompWireError(f"truncated bucket payload inside frame {i}")
        out.append(payload[pos : pos + length])
        pos += length
    if pos != len(payload):
        raise AdaCompWireError(f"{len(payload) - pos} trailing bytes after the last frame")
    return out


# --------------------------------------------------------------------------
# DDP communication hook
# --------------------------------------------------------------------------


@dataclass
class LayerBytes:
    """Byte counters for one layer type.

    ``dense_bytes`` is what a plain fp32 all-reduce would contribute per
    worker (4 * numel); ``wire_bytes`` is this worker's encoded messages
    including the 4-byte frame per message; ``numel`` and ``sent`` count
    elements (``sent`` = number of transmitted entries).
    """

    dense_bytes: int = 0
    wire_bytes: int = 0
    numel: int = 0
    sent: int = 0

    def add(self, other: "LayerBytes") -> None:
        self.dense_bytes += other.dense_bytes
        self.wire_bytes += other.wire_bytes
        self.numel += other.numel
        self.sent += other.sent

    @property
    def compression_rate(self) -> float:
        """Dense fp32 bytes / wire bytes (``nan`` if nothing was sent)."""
        return self.dense_bytes / self.wire_bytes if self.wire_bytes else float("nan")


@dataclass
class StepStats:
    """Per-step statistics, aggregated over the buckets of one step.

    ``payload_bytes`` is the exact bucket payloads this worker produced
    (message frames + the 4-byte count per bucket); ``gathered_bytes`` what it
    actually pushed through ``all_gather`` (payload zero-padded to the largest
    peer payload, plus the 8-byte length exchange) -- an artefact of using
    equal-size all-gather rather than a variable-size collective.
    """

    step: int
    warmup: bool
    by_type: dict[str, LayerBytes] = field(default_factory=lambda: {t: LayerBytes() for t in LAYER_TYPES})
    payload_bytes: int = 0
    gathered_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "warmup": self.warmup,
            "payload_bytes": self.payload_bytes,
            "gathered_bytes": self.gathered_bytes,
            "by_type": {t: dataclasses.asdict(b) for t, b in self.by_type.items()},
        }


class AdaCompState:
    """Per-worker state of :func:`adacomp_hook`.

    Holds the float32 residue of every bucket (keyed by ``bucket.index()``),
    the step counter, the configuration and the statistics used for logging.

    Attributes:
        config: the :class:`AdaCompConfig`.
        process_group: group for the collectives (``None`` = default group).
        step: number of completed optimizer steps seen by the hook.
        residues: bucket index -> flat float32 residue on the bucket's device.
        totals: cumulative :class:`LayerBytes` per layer type over compressed
            (post warm-up) steps; the AdaComp compression rate.
        warmup_bytes: dense bytes sent during warm-up.
        history: recent :class:`StepStats` (at most ``config.history_len``).
        bucket_stats: bucket index -> latest per-bucket :class:`StepStats`.
        residue_resets: how often a residue was dropped because the bucket
            layout under an index changed (should stay 0, see warm-up).
    """

    def __init__(self, config: AdaCompConfig | None = None, process_group: dist.ProcessGroup | None = None) -> None:
        self.config = config if config is not None else AdaCompConfig()
        self.process_group = process_group
        self.compressor = AdaCompCompressor(self.config.always_send_bin_max)
        self.step = 0
        self.residues: dict[int, torch.Tensor] = {}
        self._layouts: dict[int, tuple[int, ...]] = {}
        self.totals: dict[str, LayerBytes] = {t: LayerBytes() for t in LAYER_TYPES}
        self.warmup_bytes = 0
        self.payload_bytes = 0
        self.gathered_bytes = 0
        self.history: deque[StepStats] = deque(maxlen=self.config.history_len)
        self.bucket_stats: dict[int, StepStats] = {}
        self.residue_resets = 0
        self._current: StepStats | None = None

    # ---- statistics -------------------------------------------------------

    def compression_rate(self) -> dict[str, float]:
        """Dense fp32 bytes / wire bytes per layer type, plus ``"total"``.

        Only compressed (post warm-up) steps count; layer types never seen
        report ``nan``.
        """
        out = {t: b.compression_rate for t, b in self.totals.items()}
        total = LayerBytes()
        for b in self.totals.values():
            total.add(b)
        out["total"] = total.compression_rate
        return out

    def bytes_sent(self) -> int:
        """Everything this worker contributed: warm-up dense bytes + payloads."""
        return self.warmup_bytes + self.payload_bytes

    def _step_record(self) -> StepStats:
        if self._current is None or self._current.step != self.step:
            self._current = StepStats(step=self.step, warmup=self.step < self.config.warmup_steps)
        return self._current

    def _finish_bucket(self, bucket: dist.GradBucket) -> None:
        if bucket.is_last():
            if self._current is not None:
                self.history.append(self._current)
            self._current = None
            self.step += 1

    # ---- residues ---------------------------------------------------------

    def _residue_for(self, index: int, layout: tuple[int, ...], device: torch.device) -> torch.Tensor:
        res = self.residues.get(index)
        if res is not None and self._layouts.get(index) not in (None, layout):
            self.residue_resets += 1
            warnings.warn(
                f"AdaComp: bucket {index} changed layout (DDP re-bucketed after residues were "
                "created); dropping its residue. Use warmup_steps >= 1 to avoid this.",
                RuntimeWarning,
                stacklevel=3,
            )
            res = None
        numel = sum(layout)
        if res is None or res.numel() != numel:
            res = torch.zeros(numel, dtype=torch.float32, device=device)
        elif res.device != device:
            res = res.to(device)
        self.residues[index] = res
        self._layouts[index] = layout
        return res

    # ---- checkpointing ----------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Residues (cloned to CPU), layouts, step and cumulative counters."""
        return {
            "version": _STATE_VERSION,
            "config": self.config.to_dict(),
            "step": self.step,
            "residues": {int(k): v.detach().cpu().clone() for k, v in self.residues.items()},
            "layouts": {int(k): list(v) for k, v in self._layouts.items()},
            "totals": {t: dataclasses.asdict(b) for t, b in self.totals.items()},
            "warmup_bytes": self.warmup_bytes,
            "payload_bytes": self.payload_bytes,
            "gathered_bytes": self.gathered_bytes,
            "residue_resets": self.residue_resets,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output. The current ``config`` is kept.

        Residues stay on the CPU until the hook first touches their bucket,
        then move to the bucket's device.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported AdaCompState version {state.get('version')!r}")
        residues = {int(k): torch.as_tensor(v, dtype=torch.float32).reshape(-1).clone() for k, v in state["residues"].items()}
        layouts = {int(k): tuple(int(x) for x in v) for k, v in state["layouts"].items()}
        for k, res in residues.items():
            if k in layouts and sum(layouts[k]) != res.numel():
                raise ValueError(f"residue of bucket {k} has {res.numel()} elements, layout says {sum(layouts[k])}")
        totals = {t: LayerBytes(**dict(state["totals"][t])) for t in LAYER_TYPES}
        self.step = int(state["step"])
        self.residues = residues
        self._layouts = layouts
        self.totals = totals
        self.warmup_bytes = int(state["warmup_bytes"])
        self.payload_bytes = int(state["payload_bytes"])
        self.gathered_bytes = int(state["gathered_bytes"])
        self.residue_resets = int(state["residue_resets"])
        self._current = None

    def __getstate__(self) -> dict[str, Any]:
        # process groups cannot be pickled (DDP may pickle hook state)
        d = dict(self.__dict__)
        d["process_group"] = None
        return d


def _bucket_layout(bucket: dist.GradBucket) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    params = list(bucket.parameters())
    layout = tuple(int(p.numel()) for p in params)
    if sum(layout) != bucket.buffer().numel():
        raise RuntimeError(
            f"bucket {bucket.index()}: parameters cover {sum(layout)} elements but the buffer has "
            f"{bucket.buffer().numel()}"
        )
    return params, layout


def _local_payload(state: AdaCompState, bucket: dist.GradBucket) -> tuple[bytes, dict[str, LayerBytes]]:
    """Compress this worker's bucket; returns the framed payload and byte counts."""
    buf = bucket.buffer()
    params, layout = _bucket_layout(bucket)
    residue = state._residue_for(bucket.index(), layout, buf.device)
    by_type = {t: LayerBytes() for t in LAYER_TYPES}
    messages: list[bytes] = []
    offset = 0
    for p, n in zip(params, layout, strict=True):
        ltype = layer_type_of(p)
        msg = state.compressor.compress(
            buf[offset : offset + n], residue[offset : offset + n], state.config.bin_len_for(ltype)
        )
        enc = encode_message(msg)
        messages.append(enc)
        by_type[ltype].add(LayerBytes(dense_bytes=4 * n, wire_bytes=len(enc) + 4, numel=n, sent=msg.nnz))
        offset += n
    return _frame(messages), by_type


def _aggregate(bucket: dist.GradBucket, payloads: Sequence[bytes]) -> torch.Tensor:
    """Decode all workers' payloads (in rank order), average, write the bucket."""
    buf = bucket.buffer()
    _, layout = _bucket_layout(bucket)
    acc = torch.zeros(buf.numel(), dtype=torch.float32, device=buf.device)
    for payload in payloads:
        frames = _unframe(payload, len(layout))
        offset = 0
        for frame, n in zip(frames, layout, strict=True):
            msg = decode_message(frame, expected_numel=n)
            AdaCompCompressor.accumulate(acc[offset : offset + n], msg)
            offset += n
    acc.div_(len(payloads))
    buf.copy_(acc)
    return buf


def _all_gather_bytes(payload: bytes, device: torch.device, group: dist.ProcessGroup | None) -> tuple[list[bytes], int]:
    """Variable-size all-gather via (lengths, zero-padded bytes); returns payloads and bytes pushed."""
    world = dist.get_world_size(group)
    length = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    sizes = [int(t.item()) for t in lengths]
    max_len = max(sizes)
    local = torch.zeros(max_len, dtype=torch.uint8)
    if payload:
        local[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    local = local.to(device)
    gathered = [torch.empty(max_len, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    out = [bytes(t[:s].cpu().numpy().tobytes()) for t, s in zip(gathered, sizes, strict=True)]
    return out, max_len + 8


def _completed(value: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(value)
    return fut


def adacomp_hook(state: AdaCompState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook running AdaComp on every gradient bucket.

    Register with ``ddp_model.register_comm_hook(state, adacomp_hook)`` or
    :func:`register_adacomp`. Works with gloo (CPU) and NCCL (the byte tensors
    live on the bucket's device). The collectives are blocking, so the returned
    future is already completed.
    """
    group = state.process_group
    buf = bucket.buffer()
    record = state._step_record()
    if state.step < state.config.warmup_steps:
        # plain all-reduce; counted as dense bytes
        params, layout = _bucket_layout(bucket)
        for p, n in zip(params, layout, strict=True):
            record.by_type[layer_type_of(p)].add(LayerBytes(dense_bytes=4 * n, wire_bytes=4 * n, numel=n, sent=n))
        record.payload_bytes += 4 * buf.numel()
        record.gathered_bytes += 4 * buf.numel()
        state.warmup_bytes += 4 * buf.numel()
        dist.all_reduce(buf, group=group)
        buf.div_(dist.get_world_size(group))
        state.bucket_stats[bucket.index()] = StepStats(step=state.step, warmup=True)
        state._finish_bucket(bucket)
        return _completed(buf)

    payload, by_type = _local_payload(state, bucket)
    payloads, gathered = _all_gather_bytes(payload, buf.device, group)
    result = _aggregate(bucket, payloads)

    bucket_record = StepStats(step=state.step, warmup=False, by_type=by_type)
    bucket_record.payload_bytes = len(payload)
    bucket_record.gathered_bytes = gathered
    state.bucket_stats[bucket.index()] = bucket_record
    for t, b in by_type.items():
        record.by_type[t].add(b)
        state.totals[t].add(b)
    record.payload_bytes += len(payload)
    record.gathered_bytes += gathered
    state.payload_bytes += len(payload)
    state.gathered_bytes += gathered
    state._finish_bucket(bucket)
    return _completed(result)


def register_adacomp(
    ddp_model: torch.nn.parallel.DistributedDataParallel,
    config: AdaCompConfig | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> AdaCompState:
    """Create an :class:`AdaCompState`, register :func:`adacomp_hook`, return the state.

    ``process_group`` defaults to the DDP model's group.
    """
    group = process_group if process_group is not None else getattr(ddp_model, "process_group", None)
    state = AdaCompState(config, group)
    ddp_model.register_comm_hook(state, adacomp_hook)
    logger.info("AdaComp registered: %s", state.config)
    return state

