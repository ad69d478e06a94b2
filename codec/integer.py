"""Integer hyper-synthesis: the part of the decoder that must agree bit for bit.

The means and scales of y come from h_s(ẑ). If encoder and decoder compute them
with float convolutions, a different CPU, BLAS or thread count changes the last
bits, a scale lands on the other side of a grid boundary, and the entropy
decoder desynchronizes — the failure that breaks learned codecs across
machines (Ballé, Johnston & Minnen 2019, "Integer networks for data
compression"). Here h_s runs on integers:

    ẑ (int) ─► conv with int weights ─► exact int accumulator
           ─► × per-channel scale + bias (one IEEE multiply, one add) ─► LeakyReLU
           ─► requantize: floor(v / step + ½) clipped to ±(2^15 − 1) ─► next layer ...
           ─► last layer: (mean, raw scale) as float64

Convolutions run in float64 on integer-valued operands: every product and
partial sum is an integer below 2^53, so the result is exact in any summation
order (BLAS blocking, threads, SIMD width). Everything after is elementwise IEEE
arithmetic (correctly rounded, no transcendental functions), so it is identical
on every conforming machine. The scale then reaches the coder only through the
comparisons of the fixed grid (FORMAT.md §7.3).

Weights are quantized post-training: 8-bit per output channel; activation
steps are calibrated on training latents with headroom and stored with the
weights, so decoding never recomputes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ncz.format import InputError

__all__ = ["IntegerLayer", "IntegerHyperSynthesis", "IntegerContext", "quantize_conv", "requantize",
           "WEIGHT_BITS", "ACTIVATION_LIMIT"]

WEIGHT_BITS = 8  # per output channel; h_s outputs move by ~0.1% of σ vs float (measured), rate cost negligible
WEIGHT_LIMIT = (1 << (WEIGHT_BITS - 1)) - 1  # 127
ACTIVATION_LIMIT = (1 << 15) - 1
LEAKY_SLOPE = 0.01  # nn.LeakyReLU's default, as in the float h_s
EXACT_LIMIT = 1 << 53


@dataclass(frozen=True)
class IntegerLayer:
    """One conv or transposed conv with integer weights."""

    transposed: bool
    weight: np.ndarray  # int32; conv: (out, in, k, k); transposed: (in, out, k, k)
    scale: np.ndarray  # float64 (out,): input step × weight step
    bias: np.ndarray  # float64 (out,)
    stride: int
    padding: int
    output_padding: int
    leaky: bool  # LeakyReLU after this layer
    out_step: float  # step of the requantized output (0 for the last layer)

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1] if self.transposed else self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[0] if self.transposed else self.weight.shape[1]

    def validate(self, where: str) -> None:
        w = self.weight
        if w.ndim != 4 or w.shape[2] != w.shape[3] or w.shape[2] > 7:
            raise InputError(f"{where}: integer weight must be (a, b, k, k) with k ≤ 7, got {list(w.shape)}")
        if np.abs(w).max(initial=0) > WEIGHT_LIMIT:
            raise InputError(f"{where}: integer weights exceed ±{WEIGHT_LIMIT}")
        if self.scale.shape != (self.out_channels,) or self.bias.shape != (self.out_channels,):
            raise InputError(f"{where}: scale/bias must have {self.out_channels} entries")
        if not (np.isfinite(self.scale).all() and np.isfinite(self.bias).all() and (self.scale > 0).all()):
            raise InputError(f"{where}: scales must be finite and positive, biases finite")
        taps = self.in_channels * w.shape[2] * w.shape[3]
        if taps * WEIGHT_LIMIT * ACTIVATION_LIMIT >= EXACT_LIMIT:
            raise InputError(f"{where}: layer too wide for exact float64 accumulation")
        if not (self.out_step >= 0 and np.isfinite(self.out_step)) or (self.leaky and self.out_step == 0):
            raise InputError(f"{where}: hidden layers need a positive output step")

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        """``a``: float64 tensor of integers. Returns float64 (integers unless last)."""
        w = torch.from_numpy(self.weight.astype(np.float64))
        if self.transposed:
            acc = F.conv_transpose2d(a, w, stride=self.stride, padding=self.padding, output_padding=self.output_padding)
        else:
            acc = F.conv2d(a, w, stride=self.stride, padding=self.padding)
        out = acc * torch.from_numpy(self.scale)[None, :, None, None]
        out = out + torch.from_numpy(self.bias)[None, :, None, None]
        if self.leaky:
            out = torch.where(out >= 0, out, out * LEAKY_SLOPE)
        if self.out_step > 0:
            out = torch.floor(out / self.out_step + 0.5).clamp_(-ACTIVATION_LIMIT, ACTIVATION_LIMIT)
        return out


#: rows per band when the integer nets run over a large grid: bands bound the float64 activations
#: (a 67-megapixel image would need GBs at once); integer results do not depend on the banding.
BAND_ROWS = 32


def by_row_bands(fn, inputs: Sequence[torch.Tensor], *, band: int, halo: int, scale: int = 1) -> torch.Tensor:
    """``fn(*inputs, first_row)`` computed over bands of ``band`` input rows with ``halo`` rows of context.

    ``first_row``: the band's first row in the whole grid. ``scale``: output rows per input row.
    Exact for integer networks whose receptive field is within ``halo`` input rows (each band's
    kept rows see exactly the inputs the whole-grid call would).
    """
    rows = inputs[0].shape[2]
    if rows <= band + 2 * halo:
        return fn(*inputs, 0)
    parts = []
    for top in range(0, rows, band):
        bottom = min(rows, top + band)
        t, b = max(0, top - halo), min(rows, bottom + halo)
        out = fn(*(v[:, :, t:b] for v in inputs), t)
        parts.append(out[:, :, (top - t) * scale:(bottom - t) * scale])
    return torch.cat(parts, dim=2)


def requantize(v: torch.Tensor, step: float) -> torch.Tensor:
    """Float64 values to the integer grid of ``step`` (round half up, clipped): one IEEE division each."""
    return torch.floor(v / step + 0.5).clamp_(-ACTIVATION_LIMIT, ACTIVATION_LIMIT)


def quantize_conv(conv: nn.Module, in_step: float, leaky: bool, out_peak: float | None, *,
                  weight: torch.Tensor | None = None, input_steps: np.ndarray | None = None) -> IntegerLayer:
    """An :class:`IntegerLayer` for a trained (transposed) convolution.

    ``in_step``: step of the integer input; ``input_steps`` instead gives one
    step per input channel (inputs concatenated from differently scaled
    sources), folded into the float weights before they are quantized.
    ``out_peak``: the largest output magnitude to represent (None: the last
    layer, float output). ``weight`` overrides ``conv.weight`` (e.g. a masked kernel).
    Weights: 8 bits per output channel.
    """
    transposed = isinstance(conv, nn.ConvTranspose2d)
    w = (conv.weight if weight is None else weight).detach().double().numpy()
    if input_steps is not None:
        in_axis = 0 if transposed else 1
        shape = [1, 1, 1, 1]
        shape[in_axis] = -1
        w = w * np.asarray(input_steps, np.float64).reshape(shape)
        in_step = 1.0
    axis = 1 if transposed else 0
    reduce_axes = tuple(a for a in range(4) if a != axis)
    w_max = np.abs(w).max(axis=reduce_axes)
    w_step = np.where(w_max > 0, w_max / WEIGHT_LIMIT, 1.0)
    shape = [1, 1, 1, 1]
    shape[axis] = -1
    w_int = np.rint(w / w_step.reshape(shape)).astype(np.int32)
    out_step = 0.0 if out_peak is None else max(out_peak, 1e-6) / ACTIVATION_LIMIT
    bias = conv.bias.detach().double().numpy() if conv.bias is not None else np.zeros(len(w_step))
    return IntegerLayer(
        transposed=transposed, weight=w_int, scale=(in_step * w_step).astype(np.float64), bias=bias,
        stride=conv.stride[0], padding=conv.padding[0],
        output_padding=conv.output_padding[0] if transposed else 0, leaky=leaky, out_step=float(out_step))


class IntegerHyperSynthesis:
    """h_s on integers; see the module docstring. Output: (mean, raw scale) float64."""

    def __init__(self, layers: Sequence[IntegerLayer]):
        self.layers = tuple(layers)
        for i, layer in enumerate(self.layers):
            layer.validate(f"h_s layer {i}")
        for a, b in zip(self.layers, self.layers[1:]):
            if a.out_channels != b.in_channels:
                raise InputError("h_s layers do not chain (channel counts differ)")
        if self.layers[-1].out_step != 0 or self.layers[-1].out_channels % 2:
            raise InputError("the last h_s layer must output 2·M float channels")

    @torch.no_grad()
    def __call__(self, z_hat: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        a = torch.as_tensor(np.asarray(z_hat), dtype=torch.float64)
        if a.dim() == 3:
            a = a[None]
        a = a.clamp(-ACTIVATION_LIMIT, ACTIVATION_LIMIT)
        a = by_row_bands(self._run, [a], band=BAND_ROWS // 4, halo=2, scale=4)
        raw_scale, mean = a.chunk(2, dim=1)  # same split as the float HyperSynthesis
        return mean.numpy(), raw_scale.numpy()

    def _run(self, a: torch.Tensor, first_row: int = 0) -> torch.Tensor:
        for layer in self.layers:
            a = layer(a)
        return a

    # -- building from a trained float h_s ------------------------------------

    @classmethod
    @torch.no_grad()
    def from_float(cls, h_s: nn.Sequential, calibration: Sequence[torch.Tensor],
                   headroom: float = 2.0) -> IntegerHyperSynthesis:
        """Quantize a trained float h_s (conv / deconv / LeakyReLU sequence).

        ``calibration``: integer ẑ tensors (B, N, h, w) from training images;
        activation steps cover ``headroom`` × the largest value seen.
        """
        convs: list[tuple[nn.Module, bool]] = []
        for module in h_s:
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                convs.append((module, False))
            elif isinstance(module, nn.LeakyReLU):
                if not convs or abs(module.negative_slope - LEAKY_SLOPE) > 1e-12:
                    raise ValueError("unsupported LeakyReLU placement or slope")
                convs[-1] = (convs[-1][0], True)
            else:
                raise ValueError(f"unsupported layer in h_s: {type(module).__name__}")
        # float activations of each layer on the calibration set, to size the steps
        peaks = [0.0] * len(convs)
        for z in calibration:
            x = z.double()
            for i, (conv, leaky) in enumerate(convs):
                w = conv.weight.double()
                b = conv.bias.double() if conv.bias is not None else None
                if isinstance(conv, nn.ConvTranspose2d):
                    x = F.conv_transpose2d(x, w, b, conv.stride, conv.padding, conv.output_padding)
                else:
                    x = F.conv2d(x, w, b, conv.stride, conv.padding)
                if leaky:
                    x = F.leaky_relu(x, LEAKY_SLOPE)
                peaks[i] = max(peaks[i], float(x.abs().max()))
        layers = []
        in_step = 1.0  # ẑ is integer
        for i, (conv, leaky) in enumerate(convs):
            last = i == len(convs) - 1
            layers.append(quantize_conv(conv, in_step, leaky, None if last else peaks[i] * headroom))
            in_step = layers[-1].out_step
        return cls(layers)


class IntegerContext:
    """The checkerboard context residual (:mod:`ncz.codec.context`) on integers.

    Inputs are float64 values that encoder and decoder hold identically (ŷ of
    the anchors, and the integer h_s's μ and σ_raw); each is requantized with
    its calibrated step, then the masked 5×5 convolution and the 1×1 layers
    run as :class:`IntegerLayer` s. The first 1×1 layer reads the three
    inputs concatenated; their different steps are folded into its weights.
    Output: ``(Δμ, Δσ_raw)`` float64, added to the hyperprior's by the caller.
    """

    def __init__(self, context: IntegerLayer, params: Sequence[IntegerLayer], steps: Sequence[float]):
        self.context = context
        self.params = tuple(params)
        self.steps = tuple(float(v) for v in steps)  # ŷ, μ, σ_raw
        if len(self.steps) != 3 or not all(np.isfinite(v) and v > 0 for v in self.steps):
            raise InputError("context: input steps must be 3 finite positive numbers")
        context.validate("context layer")
        for i, layer in enumerate(self.params):
            layer.validate(f"context parameter layer {i}")
        channels = context.in_channels
        if context.out_channels + 2 * channels != self.params[0].in_channels or context.out_step <= 0:
            raise InputError("context layers do not chain (channel counts or steps)")
        for a, b in zip(self.params, self.params[1:]):
            if a.out_channels != b.in_channels:
                raise InputError("context parameter layers do not chain (channel counts differ)")
        if self.params[-1].out_step != 0 or self.params[-1].out_channels != 2 * channels:
            raise InputError("the last context layer must output 2·M float channels")

    @torch.no_grad()
    def __call__(self, y_anchor_hat: np.ndarray, mean: np.ndarray,
                 raw_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        def batch(v: np.ndarray) -> torch.Tensor:
            t = torch.as_tensor(np.asarray(v), dtype=torch.float64)
            return t[None] if t.dim() == 3 else t

        halo = self.context.weight.shape[2] // 2
        a = by_row_bands(self._run, [batch(y_anchor_hat), batch(mean), batch(raw_scale)], band=BAND_ROWS, halo=halo)
        d_scale, d_mean = a.chunk(2, dim=1)
        return d_mean.numpy(), d_scale.numpy()

    def _run(self, y_anchor_hat: torch.Tensor, mean: torch.Tensor, raw_scale: torch.Tensor,
             first_row: int = 0) -> torch.Tensor:
        """(Δσ, Δμ) at the non-anchors of the band starting at grid row ``first_row`` (0 at anchors).

        Only the non-anchors need the context, and only the masked kernel's taps at odd offsets are
        non-zero, so the masked convolution runs as one product over those taps at those positions
        (a quarter of a dense convolution's work; exact integers, so the same result).
        """
        y_step, mean_step, scale_step = self.steps
        _, channels, height, width = y_anchor_hat.shape
        rows = torch.arange(height)[:, None] + first_row
        rest = ((rows + torch.arange(width)[None, :]) % 2 == 1).reshape(-1)
        layer, k = self.context, self.context.weight.shape[2]
        taps = [(dy, dx) for dy in range(k) for dx in range(k) if (dy + dx - 2 * (k // 2)) % 2]
        padded = F.pad(requantize(y_anchor_hat, y_step), (k // 2,) * 4)
        columns = torch.cat([padded[0, :, dy:dy + height, dx:dx + width].reshape(channels, -1)[:, rest]
                             for dy, dx in taps])  # (taps · M, positions)
        weight = torch.from_numpy(np.concatenate([layer.weight[:, :, dy, dx] for dy, dx in taps], axis=1)
                                  .astype(np.float64))  # (2M, taps · M)
        ctx = (weight @ columns) * torch.from_numpy(layer.scale)[:, None] + torch.from_numpy(layer.bias)[:, None]
        ctx = requantize(ctx, layer.out_step)[None, :, None, :]  # (1, 2M, 1, positions): 1×1 layers follow
        def at_rest(v: torch.Tensor, step: float) -> torch.Tensor:
            return requantize(v[0].reshape(channels, -1)[:, rest], step)[None, :, None, :]
        a = torch.cat([ctx, at_rest(mean, mean_step), at_rest(raw_scale, scale_step)], dim=1)
        for param_layer in self.params:
            a = param_layer(a)
        out = torch.zeros((1, a.shape[1], height * width), dtype=torch.float64)
        out[0, :, rest] = a[0, :, 0]
        return out.reshape(1, -1, height, width)

    def dense(self, y_anchor_hat: np.ndarray, mean: np.ndarray, raw_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The same function as a dense convolution over every position (the reference the fast path
        is tested against; anchors' outputs are not used)."""
        def batch(v):
            return torch.as_tensor(np.asarray(v), dtype=torch.float64)[None]
        y_step, mean_step, scale_step = self.steps
        ctx = self.context(requantize(batch(y_anchor_hat), y_step))
        a = torch.cat([ctx, requantize(batch(mean), mean_step), requantize(batch(raw_scale), scale_step)], dim=1)
        for layer in self.params:
            a = layer(a)
        d_scale, d_mean = a.chunk(2, dim=1)
        return d_mean.numpy(), d_scale.numpy()

    @classmethod
    @torch.no_grad()
    def from_float(cls, model: nn.Module, calibration: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   headroom: float = 2.0) -> IntegerContext:
        """Quantize a trained :class:`~ncz.codec.context.CheckerboardContext`.

        ``calibration``: ``(ŷ_anchor, μ, σ_raw)`` float tensors from training
        images (ŷ zero at non-anchors); steps cover ``headroom`` × the peaks.
        """
        convs = [m for m in model.params if isinstance(m, nn.Conv2d)]
        peak_y = peak_m = peak_s = peak_ctx = 0.0
        peaks = [0.0] * len(convs)
        weight = model.masked_context_weight().double()
        for y_a, mean, raw in calibration:
            y_a, mean, raw = y_a.double(), mean.double(), raw.double()
            ctx = F.conv2d(y_a, weight, model.context.bias.double(), padding=model.context.padding)
            peak_y, peak_m, peak_s = (max(peak_y, float(y_a.abs().max())), max(peak_m, float(mean.abs().max())),
                                      max(peak_s, float(raw.abs().max())))
            peak_ctx = max(peak_ctx, float(ctx.abs().max()))
            a = torch.cat([ctx, mean, raw], dim=1)
            for i, conv in enumerate(convs):
                a = F.conv2d(a, conv.weight.double(), conv.bias.double())
                if i < len(convs) - 1:
                    a = F.leaky_relu(a, LEAKY_SLOPE)
                peaks[i] = max(peaks[i], float(a.abs().max()))
        steps = [max(p * headroom, 1e-6) / ACTIVATION_LIMIT for p in (peak_y, peak_m, peak_s)]
        context = quantize_conv(model.context, steps[0], False, peak_ctx * headroom, weight=weight.float())
        channels = model.context.in_channels
        input_steps = np.concatenate([np.full(2 * channels, context.out_step), np.full(channels, steps[1]),
                                      np.full(channels, steps[2])])
        layers = []
        for i, conv in enumerate(convs):
            last = i == len(convs) - 1
            layers.append(quantize_conv(conv, layers[-1].out_step if layers else 1.0, not last,
                                        None if last else peaks[i] * headroom,
                                        input_steps=input_steps if i == 0 else None))
        return cls(context, layers, steps)
