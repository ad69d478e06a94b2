"""``CodebookEmbedding``: an embedding that keeps only codebooks and codes in memory."""

from __future__ import annotations

import torch
from torch import nn

from ncz.format import UsageError

from .pq import reconstruct, reconstruct_table

__all__ = ["CodebookEmbedding"]


def _code_dtype(k: int) -> torch.dtype:
    return torch.uint8 if k <= 256 else torch.int16 if k <= 32768 else torch.int32


class CodebookEmbedding(nn.Module):
    """An embedding whose rows are looked up as sums of centroids: memory ≈ codebooks + codes.

    ``codebooks`` ``[S, M, K, d/M]`` is a trainable float32 parameter; ``codes``
    ``[V, S·M]`` is a buffer of the smallest integer type holding ``K`` values
    (uint8 up to 256). ``forward`` gives exactly the rows of the decoded table
    (:func:`reconstruct`), cast to ``dtype``. ``padding_idx`` is kept for
    compatibility (its row is whatever its codes say); ``max_norm`` renormalizes
    the looked-up rows (the stored table is not modified).
    """

    def __init__(self, codebooks: torch.Tensor, codes: torch.Tensor, *, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0, dtype: torch.dtype = torch.float32):
        super().__init__()
        if codebooks.dim() != 4:
            raise UsageError(f"codebooks must be [stages, M, K, d/M], got {list(codebooks.shape)}")
        s, m, k, sub = codebooks.shape
        codes = torch.as_tensor(codes).reshape(codes.shape[0], -1)
        if codes.shape[1] != s * m:
            raise UsageError(f"codes must be [V, {s * m}], got {list(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
            raise UsageError(f"codes must lie in 0..{k - 1}")
        self.codebooks = nn.Parameter(codebooks.detach().float().clone())
        self.register_buffer("codes", codes.to(_code_dtype(k)).contiguous())
        self.num_embeddings = int(codes.shape[0])
        self.embedding_dim = m * sub
        if padding_idx is not None and padding_idx < 0:
            padding_idx += self.num_embeddings
        self.padding_idx = padding_idx
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.dtype = dtype

    @property
    def stages(self) -> int:
        return self.codebooks.shape[0]

    @property
    def subspaces(self) -> int:
        return self.codebooks.shape[1]

    @property
    def centroids(self) -> int:
        return self.codebooks.shape[2]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = reconstruct(self.codebooks, self.codes[flat])
        if self.max_norm is not None:
            norms = rows.norm(p=self.norm_type, dim=1, keepdim=True)
            rows = rows * torch.where(norms > self.max_norm, self.max_norm / (norms + 1e-7), torch.ones_like(norms))
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def dense(self) -> torch.Tensor:
        """The whole table ``[V, d]`` (materialized; for export and checks)."""
        return reconstruct_table(self.codebooks, self.codes).to(self.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, M={self.subspaces}, K={self.centroids}, "
                f"stages={self.stages}" + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""))
