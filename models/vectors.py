"""Golden vectors of the model-weight layouts (FORMAT.md §5.4) and of a calibration file.

``python -m ncz.tools.make_vectors`` registers these through :func:`register_vectors`.
Each vector is written section by section from small integer data chosen here, not
by the encoders, so it pins the layout and nothing else (encoders may change; a
changed vector is a version bump). Values are exact in float32 (small integers
times powers of two where a sum is involved), so every conforming decoder, on any
machine and whatever its summation order, produces the same bits; :func:`expected`
says which, computed from the §5.4 formulas without the decoders.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import numpy as np
import torch

from ncz.format import Codec, Kind, Writer

from .archive import ARCHIVE_TAG, iter_tensors
from .calibration import CALIBRATION_TAG, Calibration

__all__ = ["VECTOR_NAMES", "register_vectors", "decoded_tensors", "expected"]

Register = Callable[..., None]  # make_vectors.register(name, metadata, fill, decoded=...)


def _header(count: int, recipe: str, **extra) -> dict:
    return {"format": ARCHIVE_TAG, "tensors": count, "source": "ncz vectors", "recipe": recipe, **extra}


def _head(w: Writer, name: str, kind: Kind, dtype: str, shape: list[int], **params) -> None:
    w.add(name, b"", kind=kind, codec=Codec.RAW, params={"dtype": dtype, "shape": shape, "rel_error": 0.0, **params})


def _part(w: Writer, name: str, array: np.ndarray, codec: Codec = Codec.ANS) -> None:
    data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"))
    w.add(name, data.tobytes(), kind=Kind.PART, codec=codec,
          params={"dtype": str(array.dtype), "shape": list(array.shape)})


def _step_value(code: int) -> np.float32:
    """FORMAT.md §5.4: code c = 32e + f stands for ldexp(32 + f, e − 5)."""
    return np.float32(np.ldexp(np.float32(32 + (code & 31)), (code >> 5) - 5))


# --- lossless: TENSOR and BYTE_PLANES ---------------------------------------------------------

_SPECIAL = np.array([0x7FC00123, 0x80000000, 0x7F800000, 0xFF800000, 0x00000001, 0x3F800000,
                     0xBEAAAAAB, 0x42C80000, 0x00000000, 0x7F7FFFFF, 0x80800000, 0x40490FDB], np.uint32)


def _lossless(w: Writer) -> None:
    w.add("int", np.arange(-3, 3, dtype="<i2").tobytes(), kind=Kind.TENSOR, codec=Codec.RAW,
          params={"dtype": "int16", "shape": [2, 3], "rel_error": 0.0})
    w.add("half", np.array([1.5, -0.0, 65504, 6e-8], "<f2").tobytes(), kind=Kind.TENSOR, codec=Codec.ZSTD,
          params={"dtype": "float16", "shape": [4], "rel_error": 0.0}, options={"level": 19})
    planes = _SPECIAL.view(np.uint8).reshape(-1, 4)  # NaN payload, −0.0, ±inf, a subnormal, ...
    _head(w, "planes", Kind.BYTE_PLANES, "float32", [3, 4])
    _part(w, "planes#p0", planes[:, 0], Codec.RAW)  # uint8, raw
    _part(w, "planes#p1", planes[:, 1], Codec.ZSTD)  # uint8, zstd
    _part(w, "planes#p2", planes[:, 2].astype(np.int32), Codec.ANS)  # int32 symbols
    _part(w, "planes#p3", planes[:, 3].astype(np.int32), Codec.RANGE)  # any codec is allowed
    bf16 = np.array([0x3F80, 0xC000, 0x7F80, 0x0001], np.uint16).view(np.uint8).reshape(-1, 2)
    _head(w, "bf16", Kind.BYTE_PLANES, "bfloat16", [2, 2])
    _part(w, "bf16#p0", bf16[:, 0], Codec.RAW)
    _part(w, "bf16#p1", bf16[:, 1], Codec.RAW)


def _lossless_expected() -> dict[str, np.ndarray]:
    return {"int": np.arange(-3, 3, dtype="<i2").reshape(2, 3),
            "half": np.array([1.5, -0.0, 65504, 6e-8], "<f2"),
            "planes": _SPECIAL.reshape(3, 4),
            "bf16": np.array([0x3F80, 0xC000, 0x7F80, 0x0001], np.uint16).reshape(2, 2)}


# --- quantized ----------------------------------------------------------------------------------

_Q_TENSOR = np.array([[0, 1, -1, 2, -3, 7], [4, 0, 0, -12, 1, 1], [0, 0, 2, 2, -1, 5], [9, -9, 0, 1, 0, 0]], np.int32)
_Q_CHANNEL = np.array([[1, 2, 3, 4], [-1, 0, 1, 0], [100, -3, 0, 7]], np.int32)
_Q_GROUP = np.array([[1, -1, 2, -2, 3, 0, 0, 1], [0, 5, -5, 0, 1, 1, 1, 1]], np.int32)
_Q_ROWCOL = np.array([[3, -2, 0, 1], [0, 0, 4, -1], [2, 2, -2, 6]], np.int32)
_Q_PAIRED = np.array([1, -2, 30, 0, -1], np.int32)  # (1, −2) regular, (30, 0) escaped, (−1, pad 0)
_STEP_BASE = 0.1


def _pair_symbols(q: np.ndarray, k: int) -> np.ndarray:
    """§5.4 pair symbols, written out independently of the encoder."""
    flat = list(q) + [0] * (q.size % 2)
    zigzag = lambda x: (x << 1) ^ (x >> 63)  # noqa: E731
    out = []
    for a, b in zip(flat[0::2], flat[1::2]):
        h = k // 2
        if -h <= a < k - h and -h <= b < k - h:
            out.append((a + h) * k + (b + h))
        else:
            out.append(k * k + (zigzag(int(a)) << 15 | zigzag(int(b))))
    return np.array(out, np.int32)


_CHANNEL_CODES = np.array([[0], [16], [-32]], np.int32)  # 1, 1.5, 0.5
_GROUP_CODES = np.array([[0, 1], [-33, 40]], np.int32)
_ROW_CODES = np.array([[0], [-64], [31]], np.int32)
_COL_CODES = np.array([[0, 8, -32, 64]], np.int32)
_LEGACY_STEPS = np.array([[0.25], [0.125]], np.float32)


def _quantized(w: Writer) -> None:
    _head(w, "tensor", Kind.QUANTIZED, "float32", [4, 6], granularity="tensor", step_base=_STEP_BASE)
    _part(w, "tensor#q", _Q_TENSOR.reshape(-1))
    _part(w, "tensor#step", np.zeros((1, 1), np.int32), Codec.ZSTD)  # too predictable for ANS (§7.1)
    _head(w, "channel", Kind.QUANTIZED, "float16", [3, 4], granularity="channel", step_base=_STEP_BASE)
    _part(w, "channel#q", _Q_CHANNEL.reshape(-1), Codec.RAW)  # raw int32 indices: any codec is allowed
    _part(w, "channel#step", _CHANNEL_CODES)
    _head(w, "group", Kind.QUANTIZED, "float32", [2, 2, 4], granularity="group", group_size=4, step_base=_STEP_BASE)
    _part(w, "group#q", _Q_GROUP.reshape(-1))
    _part(w, "group#step", _GROUP_CODES)
    _head(w, "rowcol", Kind.QUANTIZED, "float32", [3, 4], granularity="rowcol", step_base=_STEP_BASE)
    _part(w, "rowcol#q", _Q_ROWCOL.reshape(-1))
    _part(w, "rowcol#step", _ROW_CODES)
    _part(w, "rowcol#colscale", _COL_CODES)
    _head(w, "paired", Kind.QUANTIZED, "float32", [5], granularity="tensor", step_base=_STEP_BASE, pair=4)
    _part(w, "paired#q", _pair_symbols(_Q_PAIRED, 4))
    _part(w, "paired#step", np.array([[32]], np.int32), Codec.RAW)  # 2.0
    _head(w, "legacy", Kind.QUANTIZED, "float32", [2, 3], granularity="channel")  # float32 steps, no step_base
    _part(w, "legacy#q", np.array([1, -2, 3, 4, 0, -4], np.int32))
    _part(w, "legacy#step", _LEGACY_STEPS, Codec.RAW)


def _quantized_expected() -> dict[str, np.ndarray]:
    base = np.float32(_STEP_BASE)
    values = np.vectorize(_step_value, otypes=[np.float32])

    def rows(codes: np.ndarray) -> np.ndarray:
        return (values(codes) * base).astype(np.float32)

    group_steps = np.repeat(rows(_GROUP_CODES), 4, axis=1)
    rowcol_steps = (rows(_ROW_CODES) * values(_COL_CODES)).astype(np.float32)
    return {
        "tensor": _Q_TENSOR.astype(np.float32) * rows(np.zeros((1, 1), np.int32)),
        "channel": (_Q_CHANNEL.astype(np.float32) * rows(_CHANNEL_CODES)).astype(np.float16),
        "group": (_Q_GROUP.astype(np.float32) * group_steps).reshape(2, 2, 4),
        "rowcol": _Q_ROWCOL.astype(np.float32) * rowcol_steps,
        "paired": _Q_PAIRED.astype(np.float32) * rows(np.array([[32]], np.int32)).reshape(()),
        "legacy": np.array([[1, -2, 3], [4, 0, -4]], np.float32) * _LEGACY_STEPS,
    }


# --- quantized, byte indices (format 1.2) ---------------------------------------------------------

_Q_BYTES = np.array([[3, -128, 0, 127], [-127, 1, -128, -2], [-128, 5, 0, 0]], np.int32)  # −128: escapes
_Q_ESCAPED = np.array([200, -40000, 128], np.int32)  # in order; beyond int16 too
_Q_PLAIN = np.array([1, -1, 0, 100, -100, 7], np.int32)  # no escape: no #qx


def _bytes_q(q: np.ndarray, escaped: np.ndarray) -> np.ndarray:
    """§5.4: the indices with every −128 byte replaced by the next escaped index."""
    out = q.reshape(-1).copy()
    out[out == -128] = escaped
    return out


def _quantized_bytes(w: Writer) -> None:
    _head(w, "escaped", Kind.QUANTIZED, "float32", [3, 4], granularity="channel", step_base=_STEP_BASE)
    _part(w, "escaped#q", _Q_BYTES.reshape(-1).astype(np.int8), Codec.ZSTD)
    _part(w, "escaped#qx", _Q_ESCAPED)
    _part(w, "escaped#step", _CHANNEL_CODES)
    _head(w, "plain", Kind.QUANTIZED, "bfloat16", [6], granularity="tensor", step_base=_STEP_BASE)
    _part(w, "plain#q", _Q_PLAIN.astype(np.int8), Codec.RAW)  # any codec is allowed
    _part(w, "plain#step", np.array([[-32]], np.int32), Codec.RAW)  # 0.5


def _quantized_bytes_expected() -> dict[str, np.ndarray]:
    base = np.float32(_STEP_BASE)
    values = np.vectorize(_step_value, otypes=[np.float32])
    steps = (values(_CHANNEL_CODES) * base).astype(np.float32)
    escaped = _bytes_q(_Q_BYTES, _Q_ESCAPED).reshape(3, 4).astype(np.float32) * steps
    plain = _Q_PLAIN.astype(np.float32) * np.float32(values(np.array([[-32]], np.int32))[0, 0] * base)
    bf16 = plain.view(np.uint32)  # round to nearest even, as torch casts
    bf16 = ((bf16 + np.uint32(0x7FFF) + ((bf16 >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return {"escaped": escaped, "plain": bf16}


# --- low rank -------------------------------------------------------------------------------------

_U = np.array([[1, -2], [3, 5], [-1, 1], [2, 2]], np.int32)
_U_STEP = np.array([0.5, 0.25], np.float32)
_V = np.array([[1, 7, -1, 2, 3, -3], [4, -4, 1, 6, 2, 1]], np.int32)
_V_STEP = np.array([1.0, 2.0], np.float32)
_U1 = np.array([[3], [-1], [2]], np.int32)
# no factor is 0: the order of the float32 product's sum is not specified, and with no zero factors
# the small dyadic values here sum exactly and never to a signed zero, whatever that order
_V1 = np.array([[1, 2, -2, 5, 3]], np.int32)


def _lowrank(w: Writer) -> None:
    _head(w, "conv", Kind.LOW_RANK, "float32", [4, 2, 1, 3], rank=2, view=[4, 6])
    _part(w, "conv#u", _U)
    _part(w, "conv#u_step", _U_STEP, Codec.RAW)
    _part(w, "conv#v", _V)
    _part(w, "conv#v_step", _V_STEP, Codec.ZSTD)
    _head(w, "linear", Kind.LOW_RANK, "bfloat16", [3, 5], rank=1, view=[3, 5])
    _part(w, "linear#u", _U1)
    _part(w, "linear#u_step", np.array([0.125], np.float32), Codec.RAW)
    _part(w, "linear#v", _V1)
    _part(w, "linear#v_step", np.array([4.0], np.float32), Codec.RAW)


def _lowrank_expected() -> dict[str, np.ndarray]:
    u = _U.astype(np.float32) * _U_STEP[None, :]
    v = _V.astype(np.float32) * _V_STEP[:, None]
    conv = (u.astype(np.float64) @ v.astype(np.float64)).astype(np.float32)  # exact: small dyadic values
    linear = (_U1 * 0.125).astype(np.float32) @ (_V1 * 4.0).astype(np.float32)
    bf16 = torch.from_numpy(linear.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return {"conv": conv.reshape(4, 2, 1, 3), "linear": bf16}


# --- dictionary -------------------------------------------------------------------------------------

_DICT = np.array([[2, 0, -1], [1, 3, 1]], np.int32)  # dim 2 × K 3, row-major
_DICT_STEP = np.float32(0.5)
# owner "a": float32 [4, 3] = 2 blocks × dim 2 rows, 3 columns → N = 6 coded columns
_A_ATOMS = [[0, 2], [1], [], [2], [0, 1], [1, 2]]
_A_VALUES = [[2, -1], [4], [], [3], [1, 1], [-2, 5]]
# "b": float16 [2, 5], one block, 5 columns, refers to "a"'s dictionary
_B_ATOMS = [[0], [], [0, 1, 2], [2], [1]]
_B_VALUES = [[-3], [], [1, 2, 3], [6], [-1]]


def _delta(atoms: list[list[int]]) -> np.ndarray:
    """§5.4: per column the first atom as is, then a_k − a_(k−1) − 1."""
    return np.array([a - (column[i - 1] + 1 if i else 0) for column in atoms for i, a in enumerate(column)], np.int32)


def _dictionary_parts(w: Writer, name: str, atoms: list[list[int]], values: list[list[int]], step: float) -> None:
    _part(w, f"{name}#count", np.array([len(c) for c in atoms], np.int32))
    _part(w, f"{name}#index", _delta(atoms))
    _part(w, f"{name}#value", np.array([v for c in values for v in c], np.int32))
    _part(w, f"{name}#step", np.array([[step]], np.float32), Codec.RAW)


# "c" owns a dictionary of its own: one column whose terms −47, 47, −3·2⁻⁵⁰, 5·2⁻⁵⁰ cancel, so only
# the specified order (left to right from the first term) gives 2⁻⁴⁹; adding the small terms to 47
# first gives 2⁻⁴⁷
_C_DICT = np.array([1 << 30, 1 << 30, 1, 1], np.int32)
_C_VALUES = np.array([-47 << 20, 47 << 20, -3, 5], np.int32)


def _dictionary(w: Writer) -> None:
    _head(w, "a", Kind.DICTIONARY, "float32", [4, 3], dictionary="a", atoms=3, dim=2, blocks=2, sparsity=2)
    _part(w, "a#dict", _DICT.reshape(-1))
    _part(w, "a#dict_step", np.array([[_DICT_STEP]], np.float32), Codec.RAW)
    _dictionary_parts(w, "a", _A_ATOMS, _A_VALUES, 0.25)
    _head(w, "b", Kind.DICTIONARY, "float16", [2, 5], dictionary="a", atoms=3, dim=2, blocks=1, sparsity=3)
    _dictionary_parts(w, "b", _B_ATOMS, _B_VALUES, 2.0)
    _head(w, "c", Kind.DICTIONARY, "float32", [1, 1], dictionary="c", atoms=4, dim=1, blocks=1, sparsity=4)
    _part(w, "c#dict", _C_DICT)
    _part(w, "c#dict_step", np.array([[2.0**-30]], np.float32), Codec.RAW)
    _part(w, "c#count", np.array([4], np.int32), Codec.RAW)
    _part(w, "c#index", np.zeros(4, np.int32), Codec.RAW)  # atoms 0, 1, 2, 3 delta-coded
    _part(w, "c#value", _C_VALUES)
    _part(w, "c#step", np.array([[2.0**-20]], np.float32), Codec.RAW)


def _column_sums(terms: list[list[np.ndarray]], dim: int) -> np.ndarray:
    """§5.4: each column's terms added in float64 from the first, left to right (+0 without terms)."""
    columns = []
    for column in terms:
        total = column[0] if column else np.zeros(dim)
        for term in column[1:]:
            total = total + term
        columns.append(total)
    return np.stack(columns, axis=1).astype(np.float32)  # dim × N


def _dictionary_columns(atoms, values, step: float) -> np.ndarray:
    d_hat = (_DICT.astype(np.float32) * _DICT_STEP).astype(np.float64)
    return _column_sums([[np.float64(np.float32(v) * np.float32(step)) * d_hat[:, a] for a, v in zip(col, vals)]
                         for col, vals in zip(atoms, values)], 2)


def _dictionary_expected() -> dict[str, np.ndarray]:
    a = _dictionary_columns(_A_ATOMS, _A_VALUES, 0.25)  # 2 × 6: block j's column i at j·3 + i
    b = _dictionary_columns(_B_ATOMS, _B_VALUES, 2.0)
    d_hat = _C_DICT.astype(np.float32) * np.float32(2.0**-30)
    c_terms = [np.float64(np.float32(q) * np.float32(2.0**-20)) * np.array([d_hat[i]], np.float64)
               for i, q in enumerate(_C_VALUES)]
    c = _column_sums([c_terms], 1)
    assert c[0, 0] == np.float32(2.0**-49)
    return {"a": np.concatenate([a[:, :3], a[:, 3:]], axis=0), "b": b.astype(np.float16), "c": c.reshape(1, 1)}


# --- codebook ----------------------------------------------------------------------------------------

_CODES = np.array([[0, 1, 2, 0], [1, 1, 0, 0], [2, 0, 1, 2], [0, 0, 0, 1], [2, 2, 2, 2]], np.int32)
_BOOKS_Q = np.arange(24, dtype=np.int32).reshape(4, 6) - 12  # stages·M = 4 codebooks of K·d/M = 3·2
_BOOKS_STEPS = np.array([[0.5], [0.25], [0.125], [1.0]], np.float32)
_CODES16 = np.array([[1], [0], [1]], np.int32)
_BOOKS16 = np.array([[[[1.5, -2.0], [0.25, 8.0]]]], np.float16)  # [1, 1, 2, 2]


def _codebook(w: Writer) -> None:
    _head(w, "emb", Kind.CODEBOOK, "float32", [5, 4], M=2, K=3, stages=2, codebook="quantized")
    _part(w, "emb#codes", _CODES)
    _part(w, "emb#codebooks", _BOOKS_Q)
    _part(w, "emb#steps", _BOOKS_STEPS, Codec.RAW)
    _head(w, "emb16", Kind.CODEBOOK, "float16", [3, 2], M=1, K=2, stages=1, codebook="float16")
    _part(w, "emb16#codes", _CODES16)
    _part(w, "emb16#codebooks", _BOOKS16, Codec.RAW)


def _codebook_expected() -> dict[str, np.ndarray]:
    books = (_BOOKS_Q.astype(np.float32) * _BOOKS_STEPS).reshape(2, 2, 3, 2)  # [stages, M, K, d/M]
    rows = [sum((np.concatenate([books[s, m, _CODES[v, s * 2 + m]] for m in range(2)]) for s in range(2)),
                np.zeros(4, np.float32)) for v in range(5)]
    rows16 = [_BOOKS16[0, 0, _CODES16[v, 0]] for v in range(3)]
    return {"emb": np.stack(rows).astype(np.float32), "emb16": np.stack(rows16)}


# --- calibration file --------------------------------------------------------------------------------

_HESSIAN = np.array([[4, 1, 0], [1, 2, 0.5], [0, 0.5, 1]], np.float32)
_ROWS = np.array([10, 0, 3, 1], np.float32)


def _calibration(w: Writer) -> None:
    w.add("hessian/fc.weight", _HESSIAN.tobytes(), kind=Kind.TENSOR, codec=Codec.RAW,
          params={"dtype": "float32", "shape": [3, 3], "rel_error": 0.0})
    w.add("rows/emb.weight", _ROWS.tobytes(), kind=Kind.TENSOR, codec=Codec.ZSTD, options={"level": 19},
          params={"dtype": "float32", "shape": [4], "rel_error": 0.0})


def _calibration_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """What :meth:`Calibration.load` makes of the file, named as in the file."""
    calibration = Calibration.load(path)
    out = {f"hessian/{k}": v for k, v in calibration.hessians.items()}
    out.update({f"rows/{k}": v for k, v in calibration.row_counts.items()})
    out["samples"] = torch.tensor(calibration.samples, dtype=torch.int64)
    return out


def _calibration_expected() -> dict[str, np.ndarray]:
    return {"hessian/fc.weight": _HESSIAN, "rows/emb.weight": _ROWS, "samples": np.array(12, np.int64)}


# --- registration -----------------------------------------------------------------------------------

def _archive_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(path))


_VECTORS: dict[str, tuple[dict, Callable[[Writer], None], Callable, Callable[[], dict[str, np.ndarray]]]] = {
    "model-lossless": (_header(4, "lossless"), _lossless, _archive_tensors, _lossless_expected),
    "model-quantized": (_header(6, "vectors"), _quantized, _archive_tensors, _quantized_expected),
    "model-quantized-bytes": (_header(2, "vectors"), _quantized_bytes, _archive_tensors, _quantized_bytes_expected),
    "model-lowrank": (_header(2, "vectors"), _lowrank, _archive_tensors, _lowrank_expected),
    "model-dictionary": (_header(3, "vectors"), _dictionary, _archive_tensors, _dictionary_expected),
    "model-codebook": (_header(2, "vectors"), _codebook, _archive_tensors, _codebook_expected),
    "model-calibration": (_header(2, "lossless", content=CALIBRATION_TAG, samples=12, calibration_source="vectors"),
                          _calibration, _calibration_tensors, _calibration_expected),
}
VECTOR_NAMES = tuple(_VECTORS)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def decoded_tensors(name: str, data: bytes) -> dict[str, bytes]:
    """The little-endian bytes of every tensor the library decodes vector ``name`` to."""
    with tempfile.TemporaryDirectory() as folder:  # the model readers take paths
        path = os.path.join(folder, f"{name}.ncz")
        with open(path, "wb") as handle:
            handle.write(data)
        return {key: _tensor_bytes(tensor) for key, tensor in _VECTORS[name][2](path).items()}


def expected(name: str) -> dict[str, bytes]:
    """The bytes FORMAT.md §5.4 says vector ``name`` decodes to, computed without the decoders."""
    return {key: np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
            for key, array in _VECTORS[name][3]().items()}


def register_vectors(register: Register) -> None:
    """Add this layer's vectors to ``ncz.tools.make_vectors`` (its plugin hook)."""
    for name, (metadata, fill, _, _) in _VECTORS.items():
        register(name, metadata, fill, decoded=lambda data, name=name: decoded_tensors(name, data))

