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

__all__ = ["IntegerLayer", "IntegerHyperSynthesis", "WEIGHT_BITS", "ACTIVATION_LIMIT"]

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
        for layer in self.layers:
            a = layer(a)
        raw_scale, mean = a.chunk(2, dim=1)  # same split as the float HyperSynthesis
        return mean.numpy(), raw_scale.numpy()

    # -- building from a trained float h_s ------------------------------------

    @classmethod
    @torch.no_grad()
    def from_float(cls, h_s: nn.Sequential, calibration: Sequence[torch.Tensor], headroom: float = 2.0) -> "IntegerHyperSynthesis":
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
            transposed = isinstance(conv, nn.ConvTranspose2d)
            w = conv.weight.detach().double().numpy()
            axis = 1 if transposed else 0
            reduce_axes = tuple(a for a in range(4) if a != axis)
            w_max = np.abs(w).max(axis=reduce_axes)
            w_step = np.where(w_max > 0, w_max / WEIGHT_LIMIT, 1.0)
            shape = [1, 1, 1, 1]
            shape[axis] = -1
            w_int = np.rint(w / w_step.reshape(shape)).astype(np.int32)
            last = i == len(convs) - 1
            out_step = 0.0 if last else max(peaks[i] * headroom, 1e-6) / ACTIVATION_LIMIT
            bias = conv.bias.detach().double().numpy() if conv.bias is not None else np.zeros(len(w_step))
            layers.append(IntegerLayer(
                transposed=transposed, weight=w_int, scale=(in_step * w_step).astype(np.float64), bias=bias,
                stride=conv.stride[0], padding=conv.padding[0],
                output_padding=conv.output_padding[0] if transposed else 0, leaky=leaky, out_step=float(out_step)))
            in_step = out_step
        return cls(layers)
