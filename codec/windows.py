r"""The analysis and synthesis transforms over a whole image, in overlapping windows.

Why: an image is ONE latent grid (no tiles, so no seams), but running g_s on
a 4000×3000 image at once would need ~6 GB of activations. Each window
computes a block of latents (or pixels) from its block plus a halo of
``HALO`` latents on every side, then keeps only its own block::

    latent grid   ┌─────────┬─────────┐       window of block B:
                  │  B      │         │       B plus HALO latents around it
                  ├─────────┼─────────┤       (clipped at the image border),
                  │         │         │       transformed, cropped back to B
                  └─────────┴─────────┘

Every output depends only on inputs within the receptive field: a latent of
g_a reads pixels within ±30 of its 16×16 cell (four 5×5 stride-2 layers),
and a pixel of g_s reads latents within ±2 of its own (four 3×3 sub-pixel
layers). A halo of 4 latents covers both with room to spare, so a window's
block equals the whole-image computation up to float rounding
(tests/test_tiling.py compares them). Image borders see the same zero padding
as the whole-image transform because windows are clipped there, never padded.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

__all__ = ["WINDOW", "HALO", "STRIDE", "blocks", "analyze", "synthesize"]

STRIDE = 16   # pixels per latent
WINDOW = 64   # latents per block side (1024 pixels): bounds g_s's activations (~0.7 GB at 1152²)
HALO = 4      # latents of context on each side (the receptive fields need 2)


def blocks(height: int, width: int, window: int = WINDOW) -> Iterator[tuple[int, int, int, int]]:
    """``(top, left, bottom, right)`` latent blocks of a ``height × width`` grid, raster order."""
    for top in range(0, height, window):
        for left in range(0, width, window):
            yield top, left, min(top + window, height), min(left + window, width)


def _with_halo(top: int, left: int, bottom: int, right: int, height: int, width: int) -> tuple[int, int, int, int]:
    return max(0, top - HALO), max(0, left - HALO), min(height, bottom + HALO), min(width, right + HALO)


@torch.no_grad()
def analyze(g_a: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *,
            progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """``g_a(x)`` for a padded image ``x`` (1, 3, H, W), H and W multiples of 16, window by window."""
    height, width = x.shape[2] // STRIDE, x.shape[3] // STRIDE
    parts = list(blocks(height, width))
    y = None
    for index, (top, left, bottom, right) in enumerate(parts):
        t, lt, b, r = _with_halo(top, left, bottom, right, height, width)
        window = g_a(x[:, :, t * STRIDE:b * STRIDE, lt * STRIDE:r * STRIDE])
        if y is None:
            y = torch.empty((1, window.shape[1], height, width), dtype=torch.float32)
        y[:, :, top:bottom, left:right] = window[:, :, top - t:bottom - t, left - lt:right - lt]
        if progress:
            progress(index + 1, len(parts))
    return y


@torch.no_grad()
def synthesize(g_s: Callable[[torch.Tensor], torch.Tensor], y_hat: torch.Tensor, size: tuple[int, int], *,
               progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """8-bit pixels ``(h, w, 3)`` of ``g_s(ŷ)`` cropped to ``size``, window by window.

    ``y_hat``: (1, M, H/16, W/16) float32, already multiplied by the inverse gain.
    """
    h, w = size
    height, width = y_hat.shape[2:]
    out = np.empty((h, w, 3), np.uint8)
    parts = [p for p in blocks(height, width) if p[0] * STRIDE < h and p[1] * STRIDE < w]
    for index, (top, left, bottom, right) in enumerate(parts):
        t, lt, b, r = _with_halo(top, left, bottom, right, height, width)
        x_hat = g_s(y_hat[:, :, t:b, lt:r])
        y0, x0 = (top - t) * STRIDE, (left - lt) * STRIDE
        rows, cols = min(bottom * STRIDE, h) - top * STRIDE, min(right * STRIDE, w) - left * STRIDE
        block = x_hat[0, :, y0:y0 + rows, x0:x0 + cols].clamp_(0, 1)
        out[top * STRIDE:top * STRIDE + rows, left * STRIDE:left * STRIDE + cols] = \
            (block.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
        if progress:
            progress(index + 1, len(parts))
    return out
