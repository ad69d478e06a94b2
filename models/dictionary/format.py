"""The ``DICTIONARY`` sections: writing a group's encoding, the head check and the decoder.

Layout (kind ``DICTIONARY``, FORMAT.md §5.4)
--------------------------------------------
The tensor's 2-D view is ``rows × cols`` with ``rows = shape[0]`` and
``cols = prod(shape[1:])``; it is cut into ``blocks`` row blocks of ``dim`` rows
(``rows = blocks · dim``). Its coded *columns* are, block-major, column ``i`` of
block ``j`` at position ``c = j·cols + i`` (``N = blocks · cols`` columns), each
a vector of length ``dim``. Decoding: ``W[j·dim:(j+1)·dim, i] = D̂ · ĉ_{j·cols+i}``.

Head params (besides ``dtype``/``shape`` of the original tensor):

==============  ====  =========================================================
``dictionary``  str   name of the head that owns the dictionary parts (the
                      encoder: the group's first tensor); an owner names
                      itself. A reference MUST name a ``DICTIONARY`` head that
                      names itself (no chains, hence no cycles)
``atoms``       int   K ≥ 1, atoms in the dictionary (equal to the owner's)
``dim``         int   atom length ≥ 1 (equal to the owner's)
``blocks``      int   ≥ 1, with ``shape[0] = blocks · dim``
``sparsity``    int   0 ≤ sparsity ≤ atoms: the most non-zeros of any column
==============  ====  =========================================================

Parts (``<head>#<part>``):

- owner only — ``#dict``: int32 ``[dim·K]`` (ANS), quantized dictionary,
  row-major ``dim × K``; ``#dict_step``: float32 ``[1, 1]``;
  ``D̂ = float32(q) · step``.
- ``#count``: int32 ``[N]`` (ANS), non-zeros of each column, ``0 ≤ n_c ≤ sparsity``.
- ``#index``: int32 ``[Σ n_c]`` (ANS), atom indices column by column, ascending
  within a column and delta-coded: the first index as is, then
  ``a_k − a_{k−1} − 1 ≥ 0``; every decoded index ``< K``.
- ``#value``: int32 ``[Σ n_c]`` (ANS), quantized code values in the same order;
  ``#step``: float32 ``[1, 1]``; value = ``float32(q) · step``.

Integer parts are written with ANS; a reader takes any codec. The decoder sums
each column's ``value · D̂[:, atom]`` terms in float64, left to right in stored
order from the first term, rounds to float32, then casts to ``dtype``. Everything is validated
(indices < K, counts vs. lengths, shapes, finite steps, dictionary references) and failures raise
:class:`ncz.format.FormatError` naming the file and the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ncz.format import Codec, FormatError, Kind, Reader, SectionInfo, encode_payload

from ..representation import (
    Encoded,
    PendingSection,
    dtype_name,
    part_name,
    read_part,
    symbol_payload,
    tensor_label,
    torch_dtype,
)

__all__ = ["TensorCode", "reconstruct", "delta_code", "dictionary_sections", "check_dictionary_head",
           "decode_dictionary", "decoded_parts"]


@dataclass
class TensorCode:
    """One tensor's sparse code as stored: column counts, atoms, quantized values."""

    counts: np.ndarray  # (N_t,) int
    atoms: np.ndarray  # (nnz,) ascending within a column
    q: np.ndarray  # (nnz,) int32
    step: np.ndarray  # (1, 1) float32
    rel_error: float


def reconstruct(D_hat: np.ndarray, counts: np.ndarray, atoms: np.ndarray, values: np.ndarray,
                 blocks: int, cols: int, shape: Sequence[int]) -> np.ndarray:
    """float32 tensor D̂·Ĉ in the tensor's shape: the decoder's exact arithmetic.

    Column c is Σ_j value_j · D̂[:, atom_j] over its own entries in float64, left to
    right in stored order starting from the first term (a column without entries
    is +0), then rounded to float32 (FORMAT.md §5.4). The loop runs over the entry
    position, all columns at once: numpy's own reductions (``add.reduceat``) do
    not add left to right, and their float32 results differed from the specified
    order on cancelling terms. Cost: non-zeros × dim; memory: the dense float64 view."""
    d, K = D_hat.shape
    N = counts.size
    Wt = np.zeros((N, d))
    if atoms.size:
        atom_rows = D_hat.T.astype(np.float64)  # K × d
        values64 = values.astype(np.float64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        by_count = np.argsort(-counts, kind="stable")  # the columns with more than k entries are a prefix
        longer_than = N - np.cumsum(np.bincount(counts))  # [k]: how many columns have more than k entries
        for k in range(longer_than.size - 1):
            columns = by_count[:longer_than[k]]
            entries = starts[columns] + k
            term = atom_rows[atoms[entries]] * values64[entries, None]
            if k == 0:
                Wt[columns] = term
            else:
                Wt[columns] += term
    W = Wt.T.reshape(d, blocks, cols).transpose(1, 0, 2).reshape(blocks * d, cols)
    return W.astype(np.float32).reshape(shape)


def delta_code(counts: np.ndarray, atoms: np.ndarray) -> np.ndarray:
    """Ascending atoms per column → first index, then gaps − 1."""
    out = atoms.astype(np.int64).copy()
    if atoms.size:
        first = np.zeros(atoms.size, bool)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        first[starts[counts > 0]] = True
        out[1:] = np.where(first[1:], atoms[1:], atoms[1:] - atoms[:-1] - 1)
    return out


def dictionary_sections(names: Sequence[str], tensors: Sequence[torch.Tensor], blocks: Sequence[int], dim: int,
                        atoms: int, q_dictionary: np.ndarray, dictionary_step: np.ndarray,
                        codes: Sequence[TensorCode]) -> list[Encoded]:
    """Head and parts of every tensor of a group; the first tensor owns the dictionary."""
    encoded = []
    owner = names[0]
    for i, (name, tensor, tensor_blocks, code) in enumerate(zip(names, tensors, blocks, codes)):
        params = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape), "dictionary": owner,
                  "atoms": atoms, "dim": dim, "blocks": tensor_blocks, "sparsity": int(code.counts.max(initial=0))}
        sections = [PendingSection(name, encode_payload(b"", Codec.RAW), Kind.DICTIONARY, params)]
        parts: list[tuple[str, np.ndarray, str, list[int]]] = []
        if i == 0:
            parts += [("dict", q_dictionary.reshape(-1), "int32", [q_dictionary.size]),
                      ("dict_step", dictionary_step, "float32", [1, 1])]
        delta = delta_code(code.counts, code.atoms)
        parts += [("count", code.counts, "int32", [code.counts.size]), ("index", delta, "int32", [delta.size]),
                  ("value", code.q, "int32", [code.q.size]), ("step", code.step, "float32", [1, 1])]
        for key, array, dtype, shape in parts:
            if dtype == "int32":
                payload = symbol_payload(array)
            else:
                payload = encode_payload(array.astype("<f4").tobytes(), Codec.RAW)
            sections.append(PendingSection(part_name(name, key), payload, Kind.PART,
                                           {"dtype": dtype, "shape": shape}))
        encoded.append(Encoded(name, f"dictionary/K{atoms}", sections, tensor.numel(), code.rel_error))
    return encoded


def _int_param(head: SectionInfo, label: str, key: str, low: int) -> int:
    value = head.params.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise FormatError(f"{label}: params.{key} must be an int ≥ {low}, got {value!r}")
    return value


def _owner(head: SectionInfo, reader: Reader) -> SectionInfo:
    """The head holding the dictionary ``head`` refers to (itself, or an owner naming itself)."""
    label, ref = tensor_label(reader, head), head.params.get("dictionary")
    if not isinstance(ref, str) or not ref:
        raise FormatError(f"{label}: params.dictionary must name the head holding the dictionary")
    if ref == head.name:
        return head
    if ref not in reader:
        raise FormatError(f"{reader.name}: {head.name!r} refers to dictionary {ref!r}, which the file lacks")
    owner = reader.info(ref)
    if owner.kind != Kind.DICTIONARY or owner.params.get("dictionary") != ref:
        raise FormatError(f"{reader.name}: {head.name!r} refers to {ref!r}, which does not hold its own "
                          "dictionary (references must point at a dictionary owner: no chains or cycles)")
    if owner.params.get("atoms") != head.params["atoms"] or owner.params.get("dim") != head.params["dim"]:
        raise FormatError(f"{reader.name}: {head.name!r} expects a {head.params['dim']}×{head.params['atoms']} "
                          f"dictionary but {ref!r} declares {owner.params.get('dim')}×{owner.params.get('atoms')}")
    return owner


def check_dictionary_head(head: SectionInfo, reader: Reader) -> None:
    """Params of a ``DICTIONARY`` head and its reference (FORMAT.md §5.4), before any part is read."""
    label, shape = tensor_label(reader, head), head.params.get("shape")
    if not isinstance(shape, list) or len(shape) < 2:
        raise FormatError(f"{label}: a dictionary-coded tensor has ≥ 2 dimensions, got shape {shape!r}")
    atoms = _int_param(head, label, "atoms", 1)
    dim = _int_param(head, label, "dim", 1)
    blocks = _int_param(head, label, "blocks", 1)
    sparsity = _int_param(head, label, "sparsity", 0)
    if sparsity > atoms:
        raise FormatError(f"{label}: sparsity {sparsity} exceeds the {atoms} atoms")
    if shape[0] != blocks * dim:
        raise FormatError(f"{label}: shape[0]={shape[0]} is not blocks×dim={blocks}×{dim}")
    _owner(head, reader)


def _step(reader: Reader, head: SectionInfo, key: str) -> np.float32:
    step = read_part(reader, head, key, dtype="float32")
    if step.size != 1 or not np.isfinite(step).all():
        raise FormatError(f"{reader.name}: {part_name(head.name, key)!r} must hold one finite float32 step")
    return np.float32(step.reshape(()))


def _dictionary_of(head: SectionInfo, reader: Reader) -> np.ndarray:
    """The decoded dictionary D̂ (dim × K, float32) that ``head`` refers to."""
    owner, atoms, dim = _owner(head, reader), head.params["atoms"], head.params["dim"]
    q = read_part(reader, owner, "dict", dtype="int32")
    if q.size != dim * atoms:
        raise FormatError(f"{reader.name}: {part_name(owner.name, 'dict')!r} has {q.size} entries, expected "
                          f"{dim}×{atoms}")
    return q.reshape(dim, atoms).astype(np.float32) * _step(reader, owner, "dict_step")


def decoded_parts(head: SectionInfo, reader: Reader):
    """Validated (D̂, counts, atoms, values, blocks, cols) of a DICTIONARY head."""
    check_dictionary_head(head, reader)
    label, shape = tensor_label(reader, head), head.params["shape"]
    atoms, blocks, sparsity = head.params["atoms"], head.params["blocks"], head.params["sparsity"]
    cols = math.prod(shape[1:])  # exact (the container capped the dense size)
    counts = read_part(reader, head, "count", dtype="int32")
    if counts.size != blocks * cols:
        raise FormatError(f"{reader.name}: {head.name!r} has {counts.size} column counts, expected {blocks * cols}")
    if counts.size and (counts.min() < 0 or counts.max() > sparsity):
        raise FormatError(f"{label}: column counts must lie in 0..{sparsity}")
    nnz = int(counts.astype(np.int64).sum())
    delta = read_part(reader, head, "index", dtype="int32")
    q = read_part(reader, head, "value", dtype="int32")
    if delta.size != nnz or q.size != nnz:
        raise FormatError(f"{label}: counts sum to {nnz} but there are {delta.size} indices and {q.size} values")
    if nnz and delta.min() < 0:
        raise FormatError(f"{label}: negative atom index or gap in its index part")
    # undo the delta coding: index = running sum of (gap + 1) within the column, the first as is
    steps = delta.astype(np.int64) + 1
    starts = np.concatenate([[0], np.cumsum(counts.astype(np.int64))[:-1]])[counts > 0]
    steps[starts] = delta[starts].astype(np.int64)
    running = np.cumsum(steps)
    base = np.zeros(nnz, np.int64)
    base[starts] = running[starts] - steps[starts]
    base = np.maximum.accumulate(base) if nnz else base  # running sum before the column's first entry
    idx = running - base
    if nnz and idx.max() >= atoms:
        raise FormatError(f"{label}: atom index {int(idx.max())} ≥ K={atoms}")
    D_hat = _dictionary_of(head, reader)
    values = q.astype(np.float32) * _step(reader, head, "step")
    return D_hat, counts.astype(np.int64), idx, values, blocks, cols


def decode_dictionary(head: SectionInfo, reader: Reader) -> torch.Tensor:
    D_hat, counts, idx, values, blocks, cols = decoded_parts(head, reader)
    w = reconstruct(D_hat, counts, idx, values, blocks, cols, head.params["shape"])
    return torch.from_numpy(np.ascontiguousarray(w)).to(torch_dtype(head.params["dtype"]))
