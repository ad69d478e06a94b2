"""``DictionaryLinear``: a linear layer that keeps the shared dictionary and the sparse codes."""

from __future__ import annotations

import warnings
import weakref

import numpy as np
import torch
from torch import nn

from ncz.format import InputError, Reader, SectionInfo, UsageError

from .format import decode_dictionary, decoded_parts

__all__ = ["DictionaryLinear", "build_dictionary_linear"]


class DictionaryLinear(nn.Module):
    """``y = x · (D·C)ᵀ + b`` without the dense weight.

    ``D`` (``dim × K``, a Parameter that modules of one group share) and the sparse
    codes of the ``blocks`` row blocks, kept as a CSR matrix ``(blocks·K) × in``
    (int32 row pointers and columns, values a Parameter). Forward computes
    ``z = C · xᵀ`` (sparse, ``nnz`` multiply-adds per input row) then ``D · z``
    per block (``blocks·K·dim``): cheaper than the dense ``rows·in`` product
    whenever the codes are sparse and K is small, and the memory is the
    compressed size. The CSR wrapper is rebuilt per call (no copy of the data),
    so gradients reach both ``dictionary`` and ``values``.
    """

    def __init__(self, dictionary: torch.Tensor | nn.Parameter, counts: torch.Tensor, atoms: torch.Tensor,
                 values: torch.Tensor, *, blocks: int, in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        dim, K = dictionary.shape
        counts = torch.as_tensor(counts, dtype=torch.int64)
        atoms = torch.as_tensor(atoms, dtype=torch.int64)
        if counts.numel() != blocks * in_features or not int(counts.sum()) == atoms.numel() == values.numel():
            raise UsageError("DictionaryLinear: counts, atoms and values do not agree")
        column = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        block, col_in = column // in_features, column % in_features
        row = block * K + atoms
        order = torch.argsort(row * in_features + col_in, stable=True)
        crow = torch.zeros(blocks * K + 1, dtype=torch.int64)
        crow[1:] = torch.cumsum(torch.bincount(row, minlength=blocks * K), 0)
        self.in_features = in_features
        self.out_features = blocks * dim
        self.blocks = blocks
        self.dictionary = dictionary if isinstance(dictionary, nn.Parameter) else nn.Parameter(dictionary)
        self.register_buffer("crow", crow.to(torch.int32))
        self.register_buffer("col", col_in[order].to(torch.int32))
        self.values = nn.Parameter(torch.as_tensor(values)[order].to(self.dictionary.dtype).clone())
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias)

    def _codes(self) -> torch.Tensor:
        dim, K = self.dictionary.shape
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            return torch.sparse_csr_tensor(self.crow, self.col, self.values, (self.blocks * K, self.in_features),
                                           check_invariants=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim, K = self.dictionary.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.dictionary.dtype)
        z = (self._codes() @ x2.T).T.reshape(-1, self.blocks, K)  # batch × blocks × K
        y = (z @ self.dictionary.T).reshape(-1, self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The ``out × in`` weight (materialised; for inspection and tests)."""
        dim, K = self.dictionary.shape
        C = self._codes().to_dense().reshape(self.blocks, K, self.in_features)
        return (self.dictionary @ C).reshape(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        dim, K = self.dictionary.shape
        return (f"in_features={self.in_features}, out_features={self.out_features}, atoms={K}, blocks={self.blocks}, "
                f"nnz={self.values.numel()}, bias={self.bias is not None}")


# one Parameter per (open reader, dictionary owner), so a group's modules share D
_SHARED: weakref.WeakKeyDictionary[Reader, dict[str, nn.Parameter]] = weakref.WeakKeyDictionary()


def build_dictionary_linear(head: SectionInfo, reader: Reader, original: nn.Module) -> nn.Module:
    """``load_into`` hook: an ``nn.Linear`` becomes a :class:`DictionaryLinear`;
    any other owner keeps its class and gets the dense weight."""
    shape = head.params.get("shape")
    weight = getattr(original, "weight", None)
    if not isinstance(weight, torch.Tensor) or list(weight.shape) != shape:
        raise InputError(f"{reader.name}: {head.name!r} has shape {shape}, the model expects "
                         f"{list(weight.shape) if isinstance(weight, torch.Tensor) else None}")
    if not isinstance(original, nn.Linear):
        with torch.no_grad():
            weight.copy_(decode_dictionary(head, reader).to(weight.dtype))
        return original
    D_hat, counts, idx, values, blocks, cols = decoded_parts(head, reader)
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    shared = _SHARED.setdefault(reader, {})
    key = f"{head.params['dictionary']}:{dtype}"
    if key not in shared:
        shared[key] = nn.Parameter(torch.from_numpy(np.ascontiguousarray(D_hat)).to(dtype))
    return DictionaryLinear(shared[key], torch.from_numpy(counts), torch.from_numpy(idx),
                            torch.from_numpy(values).to(dtype), blocks=blocks, in_features=cols,
                            bias=original.bias)

