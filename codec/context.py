r"""Checkerboard context model on top of the mean-scale hyperprior.

He, Zheng, Sun, Wang & Qin 2021 ("Checkerboard Context Model for Efficient
Learned Image Compression", CVPR): split the latent grid into *anchors*
(``(row + col)`` even) and *non-anchors*. Anchors are coded with the
hyperprior alone; every non-anchor is surrounded by decoded anchors, so a
context network reads them and sharpens its mean and scale. Both halves
decode in one parallel pass each (unlike a raster autoregressive context),
which keeps decoding fast.

Here the context is a *residual* on the hyperprior's parameters, and its
last layer starts at zero, so a trained hyperprior turns into a
checkerboard model without losing anything on the first step::

    ẑ ─h_s─► (μ, σ_raw) ─────────────────────────────┬───► anchors: N(μ, σ)
                  │                                  │
    ŷ_anchor ─masked 5×5 conv─► ctx (2M) ──┐          │
                  └──────────(μ, σ_raw)────┴─ cat ─► 1×1 convs ─► (Δμ, Δσ)
                                                               │
                                    non-anchors: N(μ + Δμ, σ_raw + Δσ) ◄┘

The masked convolution keeps only taps at odd offsets ``dy + dx`` (the
anchors around a non-anchor); its input is zero at non-anchors anyway. The
coder runs an integer copy (:mod:`ncz.codec.integer`), so the parameters of
non-anchors are bit-exact like those of the anchors.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import ste_round
from .networks import CodecConfig, HyperpriorCodec

__all__ = ["CheckerboardContext", "CheckerboardCodec", "ContextSurrogate", "anchor_mask", "CHECKERBOARD_ARCH"]

CHECKERBOARD_ARCH = "checkerboard-hyperprior+gain/v1"


def anchor_mask(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """``(1, 1, H, W)`` float mask, 1 at anchors (``(row + col)`` even), 0 at non-anchors."""
    rows = torch.arange(height, device=device)[:, None]
    cols = torch.arange(width, device=device)[None, :]
    return ((rows + cols) % 2 == 0).float()[None, None]


def _context_kernel_mask(k: int) -> Tensor:
    offsets = torch.arange(k) - k // 2
    return ((offsets[:, None] + offsets[None, :]) % 2 != 0).float()


class CheckerboardContext(nn.Module):
    """Context residual ``(Δμ, Δσ_raw)`` for non-anchors from decoded anchors and the hyperprior.

    ``hidden``: widths of the 1×1 entropy-parameter layers (He et al. and
    CompressAI use 10/3·M and 8/3·M).
    """

    def __init__(self, M: int, hidden: tuple[int, ...] = (), kernel: int = 5):
        super().__init__()
        hidden = tuple(hidden) or (M * 10 // 3, M * 8 // 3)
        self.context = nn.Conv2d(M, 2 * M, kernel, padding=kernel // 2)
        self.register_buffer("kernel_mask", _context_kernel_mask(kernel)[None, None], persistent=False)
        widths = (4 * M,) + hidden
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Conv2d(a, b, 1), nn.LeakyReLU(inplace=True)]
        last = nn.Conv2d(widths[-1], 2 * M, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.params = nn.Sequential(*layers, last)

    def masked_context_weight(self) -> Tensor:
        return self.context.weight * self.kernel_mask

    def forward(self, y_anchor_hat: Tensor, mean: Tensor, raw_scale: Tensor) -> tuple[Tensor, Tensor]:
        """``(Δμ, Δσ_raw)`` everywhere (the caller applies them to non-anchors only)."""
        ctx = F.conv2d(y_anchor_hat, self.masked_context_weight(), self.context.bias,
                       padding=self.context.padding)
        delta = self.params(torch.cat([ctx, mean, raw_scale], dim=1))
        d_scale, d_mean = delta.chunk(2, dim=1)  # the same order as h_s's split
        return d_mean, d_scale


class CheckerboardCodec(HyperpriorCodec):
    """:class:`HyperpriorCodec` whose non-anchor latents are coded with a checkerboard context."""

    ARCH = CHECKERBOARD_ARCH

    def __init__(self, config: CodecConfig):
        super().__init__(config)
        self.context_model = CheckerboardContext(config.M)

    def hyper_params(self, z_hat: Tensor) -> tuple[Tensor, Tensor]:
        """``(μ, σ_raw)`` of h_s without the lower bound (the coder's integer h_s outputs these)."""
        params = self._run(self.h_s, z_hat)
        raw_scale, mean = params.chunk(2, dim=1)
        return mean, raw_scale

    def context_params(self, y_anchor_hat: Tensor, mean: Tensor, raw_scale: Tensor) -> tuple[Tensor, Tensor]:
        """Parameters of every latent: the hyperprior's at anchors, context-refined at non-anchors."""
        anchors = anchor_mask(*mean.shape[-2:], device=mean.device)
        d_mean, d_scale = self._run_context(y_anchor_hat * anchors, mean, raw_scale)
        keep = 1.0 - anchors
        return mean + d_mean * keep, raw_scale + d_scale * keep

    def _run_context(self, y_anchor_hat: Tensor, mean: Tensor, raw_scale: Tensor) -> tuple[Tensor, Tensor]:
        if self.autocast_dtype is None:
            return self.context_model(y_anchor_hat, mean, raw_scale)
        with torch.autocast(device_type=mean.device.type, dtype=self.autocast_dtype):
            d_mean, d_scale = self.context_model(y_anchor_hat, mean, raw_scale)
        return d_mean.float(), d_scale.float()

    def forward(self, x: Tensor, quality: float | Tensor):
        """As :meth:`HyperpriorCodec.forward`, with the context on non-anchors (two-pass decode order)."""
        y = self.analysis(x, quality)
        z = self.hyper_analysis(y)
        quantize = ste_round if self.training else torch.round
        if self.training:
            lik_z = self.z_likelihood(z + torch.empty_like(z).uniform_(-0.5, 0.5))
            z_hat = ste_round(z)
        else:
            z_hat = torch.round(z)
            lik_z = self.z_likelihood(z_hat)
        mean, raw_scale = self.hyper_params(z_hat)
        y_anchor_hat = quantize(y - mean) + mean
        mean, raw_scale = self.context_params(y_anchor_hat, mean, raw_scale)
        y_hat = quantize(y - mean) + mean
        y_rate = y + torch.empty_like(y).uniform_(-0.5, 0.5) if self.training else y_hat
        lik_y = self.y_likelihood(y_rate, mean, raw_scale)
        x_hat = self.synthesis(y_hat, quality)
        return x_hat, {"y": lik_y, "z": lik_z}


class ContextSurrogate(nn.Module):
    """Differentiable stand-in for the integer context (:class:`~ncz.codec.integer.IntegerContext`).

    The same integer weights times their scales, with the requantizations replaced by divisions
    (the coder rounds there; the surrogate stays smooth), so encoder-side optimization (SGA) sees
    the context the coder will use, up to the activation steps. Returns ``(Δμ, Δσ_raw)`` at every
    position; the caller applies them to non-anchors.
    """

    def __init__(self, integer_context):
        super().__init__()
        from .integer import LEAKY_SLOPE

        self.slope = LEAKY_SLOPE
        self.steps = integer_context.steps
        ctx = integer_context.context
        as_tensor = lambda v: torch.as_tensor(v, dtype=torch.float32)  # noqa: E731
        self.layers = [(ctx, as_tensor(ctx.weight), as_tensor(ctx.scale)[None, :, None, None],
                        as_tensor(ctx.bias)[None, :, None, None])]
        self.layers += [(layer, as_tensor(layer.weight), as_tensor(layer.scale)[None, :, None, None],
                         as_tensor(layer.bias)[None, :, None, None]) for layer in integer_context.params]

    def to_device(self, device: torch.device | str) -> ContextSurrogate:
        """Moves the surrogate's constant tensors (plain attributes, not parameters) to ``device``."""
        self.layers = [(layer, weight.to(device), scale.to(device), bias.to(device))
                       for layer, weight, scale, bias in self.layers]
        return self

    def forward(self, y_anchor_hat: Tensor, mean: Tensor, raw_scale: Tensor) -> tuple[Tensor, Tensor]:
        y_step, mean_step, scale_step = self.steps
        a = y_anchor_hat / y_step
        for index, (layer, weight, scale, bias) in enumerate(self.layers):
            a = F.conv2d(a, weight, padding=layer.padding) * scale + bias
            if layer.leaky:
                a = F.leaky_relu(a, self.slope)
            if layer.out_step > 0:
                a = a / layer.out_step
            if index == 0:  # after the masked convolution: the hyperprior's parameters join
                a = torch.cat([a, mean / mean_step, raw_scale / scale_step], dim=1)
        d_scale, d_mean = a.chunk(2, dim=1)
        return d_mean, d_scale
