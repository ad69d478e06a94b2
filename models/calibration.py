"""Calibration: what a few batches of real inputs say about each weight's importance.

Data-free quantization treats every weight error alike. What a layer's user
sees is its *output* error, and for a linear layer y = W·x that is

    E = E‖ΔW·x‖² = tr(ΔW · H · ΔWᵀ),   H = E[x·xᵀ]   (the input's second moment),

so errors along input directions the data rarely excites cost nothing, and
errors along correlated directions can cancel. For an embedding table the
rows are looked up with the frequency of their tokens, so E = Σᵣ fᵣ·‖ΔWᵣ‖².

:func:`calibrate` runs a model on the caller's batches and collects, per
weight name (the model's ``state_dict`` names):

- ``hessians[name]``: H of every ``nn.Linear`` input (float32, in × in),
- ``row_counts[name]``: how often each row of every ``nn.Embedding`` is read
  (token ids, position ids, ...).

Padding is left out when the batch carries an ``attention_mask`` (positions
whose mask is 0 are not counted for any layer whose leading input dimensions
match the mask's).

The quantizer uses them (``pack(..., calibration=)``), with the *same* step
grid and on-disk layout as data-free quantization, so a calibrated archive
decodes with the same decoder: GPTQ rounding for linear weights, steps ∝
1/√(row importance) for embedding rows (:mod:`ncz.models.quantized.calibrated`).

On all-MiniLM-L6-v2 with 600 CLINC150 training queries, at equal bits, the
output-cosine drop falls 2.6-2.8x on the FFN input and attention-value
projections, and 2.3x on the word embeddings (bench/models.py).

Calibration files are model archives of their own (lossless float32 tensors
named ``hessian/<weight>`` and ``rows/<weight>``, header ``content`` =
``ncz-calibration/v1``): no pickles, checksummed like any archive.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ncz.format import InputError, UsageError
from ncz.format import open as open_archive

from .archive import iter_tensors, pack
from .quantized import TensorCalibration

__all__ = ["Calibration", "TensorCalibration", "calibrate", "CALIBRATION_TAG"]

CALIBRATION_TAG = "ncz-calibration/v1"


@dataclass
class Calibration:
    """Per-weight-name importance statistics (see the module docstring)."""

    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    row_counts: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: int = 0  # input rows seen (tokens, for a transformer)
    source: str = ""

    def for_tensor(self, name: str, shape: tuple[int, ...]) -> TensorCalibration | None:
        """Statistics that fit tensor ``name`` of ``shape`` (2-D view: rows × the rest), or None."""
        if len(shape) < 2:
            return None
        rows, cols = shape[0], math.prod(shape[1:])
        h = self.hessians.get(name)
        if h is not None and tuple(h.shape) == (cols, cols):
            return TensorCalibration(hessian=h.double().numpy())
        counts = self.row_counts.get(name)
        if counts is not None and tuple(counts.shape) == (rows,):
            return TensorCalibration(row_counts=counts.double().numpy())
        return None

    def save(self, path: str | os.PathLike[str]) -> None:
        tensors = {f"hessian/{k}": v.float().contiguous() for k, v in sorted(self.hessians.items())}
        tensors.update({f"rows/{k}": v.float().contiguous() for k, v in sorted(self.row_counts.items())})
        pack(tensors, path, recipe="lossless",
             metadata={"content": CALIBRATION_TAG, "samples": int(self.samples), "calibration_source": self.source})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        with open_archive(path) as reader:
            meta = reader.metadata
        if meta.get("content") != CALIBRATION_TAG:
            raise InputError(f"{path}: not a calibration file (header content {meta.get('content')!r}, "
                             f"expected {CALIBRATION_TAG!r})")
        samples = meta.get("samples", 0)
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise InputError(f"{path}: header samples must be a non-negative integer, got {samples!r}")
        out = cls(samples=samples, source=str(meta.get("calibration_source", "")))
        for name, tensor in iter_tensors(path):
            kind, _, weight = name.partition("/")
            if kind == "hessian" and tensor.dim() == 2 and tensor.shape[0] == tensor.shape[1]:
                out.hessians[weight] = tensor
            elif kind == "rows" and tensor.dim() == 1:
                out.row_counts[weight] = tensor
            else:
                raise InputError(f"{path}: calibration tensor {name!r} of shape {list(tensor.shape)} "
                                 f"is neither hessian/<name> (square) nor rows/<name> (1-D)")
        return out


@torch.no_grad()
def calibrate(model: torch.nn.Module, batches: Iterable[Any], *, source: str = "",
              progress: Callable[[int], None] | None = None) -> Calibration:
    """Run ``model`` on ``batches`` (each a dict of keyword arguments, a tuple of
    positional ones, or one tensor) and collect :class:`Calibration` statistics.

    Names are the model's ``state_dict`` names (``<module>.weight``), so pack the
    checkpoint saved from this model. The model runs in eval mode; its state is
    not changed.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    seen: dict[str, int] = {}
    mask_holder: list[torch.Tensor | None] = [None]

    def keep(x: torch.Tensor) -> torch.Tensor:
        """x without the padded positions, when its leading dims are the mask's."""
        mask = mask_holder[0]
        if mask is not None and x.dim() > mask.dim() and tuple(x.shape[:mask.dim()]) == tuple(mask.shape):
            return x[mask.bool()]
        return x

    def linear_hook(name: str):
        def hook(module, inputs, output):
            x = keep(inputs[0].detach())
            x = x.reshape(-1, x.shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            seen[name] = seen.get(name, 0) + x.shape[0]
        return hook

    def embedding_hook(name: str, rows: int):
        def hook(module, inputs, output):
            ids = inputs[0].detach()
            mask = mask_holder[0]
            if mask is not None and tuple(ids.shape) == tuple(mask.shape):
                ids = ids[mask.bool()]
            counts[name] = counts.get(name, torch.zeros(rows, dtype=torch.float64)) + torch.bincount(
                ids.reshape(-1).long(), minlength=rows).double()
        return hook

    handles = []
    for module_name, module in model.named_modules():
        weight = f"{module_name}.weight" if module_name else "weight"
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(linear_hook(weight)))
        elif isinstance(module, torch.nn.Embedding):
            handles.append(module.register_forward_hook(embedding_hook(weight, module.num_embeddings)))
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for index, batch in enumerate(batches):
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            mask_holder[0] = mask
            if isinstance(batch, Mapping):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)
            tokens += int(mask.sum()) if mask is not None else 0
            if progress:
                progress(index + 1)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not sums and not counts:
        raise UsageError("calibrate(): the model has no nn.Linear or nn.Embedding layer that saw data")
    hessians = {name: (total / max(seen[name], 1)).float() for name, total in sums.items()}
    return Calibration(hessians, {n: c.float() for n, c in counts.items()},
                       tokens or max(seen.values(), default=0), source)
