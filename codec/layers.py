"""The codec's building blocks: small ops, GDN, sub-pixel deconvolutions and the four transforms.

g_a / g_s (Ballé et al. 2018, "Variational image compression with a scale hyperprior": four 5×5
stride-2 convolutions with GDN between them) and h_a / h_s (the hyper-transforms of Minnen et al.
2018's mean-scale model); :func:`inference_transform` gives the coder's faster copies of g_a / g_s.
:mod:`ncz.codec.networks` assembles them into :class:`~ncz.codec.networks.HyperpriorCodec`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "lower_bound",
    "ste_round",
    "NonNegativeParametrizer",
    "GDN",
    "subpixel_kernel",
    "SubpixelDeconv",
    "inference_transform",
    "AnalysisTransform",
    "SynthesisTransform",
    "HyperAnalysis",
    "HyperSynthesis",
]


# --------------------------------------------------------------------------
# small ops
# --------------------------------------------------------------------------


class _LowerBound(torch.autograd.Function):
    """``max(x, bound)`` whose gradient still flows where it pushes ``x`` up.

    A plain ``clamp`` has zero gradient below the bound, so a unit stuck
    there (e.g. a scale < 0.11) could never recover. This is the trick of
    Ballé's ``tfc.lower_bound`` / CompressAI's ``LowerBound``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, bound: Tensor) -> Tensor:
        ctx.save_for_backward(x, bound)
        return torch.max(x, bound)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x, bound = ctx.saved_tensors
        pass_through = (x >= bound) | (grad_output < 0)
        return pass_through.to(grad_output.dtype) * grad_output, None


def lower_bound(x: Tensor, bound: float) -> Tensor:
    """Lower-bound ``x`` with the gradient-preserving rule of :class:`_LowerBound`."""
    b = torch.tensor(bound, dtype=x.dtype, device=x.device)
    if not torch.is_grad_enabled() or not x.requires_grad:
        return torch.max(x, b)
    return _LowerBound.apply(x, b)


def ste_round(x: Tensor) -> Tensor:
    """Round with a straight-through (identity) gradient."""
    return x + (torch.round(x) - x).detach()


class NonNegativeParametrizer(nn.Module):
    """Reparametrization ``v = max(p, sqrt(min + ε))² - ε`` keeping ``v ≥ min``.

    Used for GDN's β and γ (Ballé 2018, "Efficient nonlinear transforms for
    lossy image compression", PCS): optimizing the square root makes the
    effective step size scale with the value, so small β / γ entries are not
    overshot into negatives; the pedestal ``ε = (2⁻¹⁸)²`` keeps the bound's
    gradient well defined at zero. Same constants as Ballé's
    ``tensorflow_compression`` and CompressAI.
    """

    def __init__(self, minimum: float = 0.0, reparam_offset: float = 2 ** -18):
        super().__init__()
        self.minimum = float(minimum)
        self.reparam_offset = float(reparam_offset)
        self.pedestal = self.reparam_offset ** 2
        self.bound = (self.minimum + self.pedestal) ** 0.5

    def init(self, x: Tensor) -> Tensor:
        """Raw parameter value that reparametrizes to ``x``."""
        return torch.sqrt(torch.clamp(x + self.pedestal, min=self.pedestal))

    def forward(self, p: Tensor) -> Tensor:
        return lower_bound(p, self.bound) ** 2 - self.pedestal


# --------------------------------------------------------------------------
# GDN and transforms
# --------------------------------------------------------------------------


class GDN(nn.Module):
    r"""Generalized divisive normalization (Ballé, Laparra & Simoncelli 2016).

    ``y_i = x_i / sqrt(β_i + Σ_j γ_ij x_j²)``; the inverse (IGDN, used in the
    synthesis transform) multiplies by the square root instead. GDN
    gaussianizes local joint statistics of image responses much better than
    pointwise nonlinearities, which is why Ballé et al. use it in all their
    transforms; it costs one 1x1 convolution per layer.

    β and γ are stored through :class:`NonNegativeParametrizer` (β ≥ 1e-6 so
    the denominator never vanishes, γ ≥ 0). Initialization β = 1,
    γ = 0.1·I as in Ballé's reference code.
    """

    def __init__(self, channels: int, inverse: bool = False, beta_min: float = 1e-6, gamma_init: float = 0.1):
        super().__init__()
        self.inverse = bool(inverse)
        self.beta_reparam = NonNegativeParametrizer(minimum=beta_min)
        self.gamma_reparam = NonNegativeParametrizer()
        self.beta = nn.Parameter(self.beta_reparam.init(torch.ones(channels)))
        self.gamma = nn.Parameter(self.gamma_reparam.init(gamma_init * torch.eye(channels)))

    def effective_params(self) -> tuple[Tensor, Tensor]:
        """The reparametrized (β, γ) actually used."""
        return self.beta_reparam(self.beta), self.gamma_reparam(self.gamma)

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        beta, gamma = self.effective_params()
        norm = F.conv2d(x * x, gamma.reshape(c, c, 1, 1), beta)
        return x * torch.sqrt(norm) if self.inverse else x * torch.rsqrt(norm)


def _conv(cin: int, cout: int, k: int = 5, stride: int = 2) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


def _deconv(cin: int, cout: int, k: int = 5, stride: int = 2) -> nn.ConvTranspose2d:
    # output_padding = stride - 1 makes the output exactly stride × input.
    return nn.ConvTranspose2d(cin, cout, k, stride=stride, padding=k // 2, output_padding=stride - 1)


def subpixel_kernel(weight: Tensor) -> Tensor:
    """The 3x3 kernel (4·out, in, 3, 3) of a 5x5 stride-2 transposed conv's weight (in, out, 5, 5)
    for conv(padding 1) + pixel_shuffle(2): output phase (a, b) reads input offset d ∈ {−1, 0, 1}
    with kernel tap 4 + a − 2(d + 1) (zero where that falls outside 0…4). Same dtype; every
    output is a sum of exactly the same products, so integer inputs give identical integers."""
    cin, cout = weight.shape[:2]
    kernel = torch.zeros(cout, 2, 2, cin, 3, 3, dtype=weight.dtype)
    for a in range(2):
        for t in range(3):
            ky = a + 4 - 2 * t
            if not 0 <= ky <= 4:
                continue
            for b in range(2):
                for u in range(3):
                    kx = b + 4 - 2 * u
                    if 0 <= kx <= 4:
                        kernel[:, a, b, :, t, u] = weight[:, :, ky, kx].T
    return kernel.reshape(4 * cout, cin, 3, 3).contiguous()


class SubpixelDeconv(nn.Module):
    """A 5x5 stride-2 transposed conv (padding 2, output padding 1) as one 3x3 conv to
    4x the channels followed by a pixel shuffle: the same function (each output phase
    (a, b) ∈ {0,1}² reads input taps d ∈ {−1, 0, 1} with kernel tap 4 + a − 2(d + 1)),
    but a dense convolution, which CPU kernels run ~1.4–1.7x faster than a transposed one.
    Inference only (built from a trained ``ConvTranspose2d``; see :func:`inference_transform`).
    """

    def __init__(self, deconv: nn.ConvTranspose2d):
        super().__init__()
        if (deconv.kernel_size, deconv.stride, deconv.padding, deconv.output_padding, deconv.groups) != \
                ((5, 5), (2, 2), (2, 2), (1, 1), 1):
            raise ValueError("SubpixelDeconv handles 5x5 stride-2 transposed convs with padding 2, output padding 1")
        kernel = subpixel_kernel(deconv.weight.detach().float())
        cin, cout = deconv.in_channels, deconv.out_channels
        self.conv = nn.Conv2d(cin, 4 * cout, 3, padding=1)
        self.conv.weight.data = kernel
        bias = deconv.bias.detach().float() if deconv.bias is not None else torch.zeros(cout)
        self.conv.bias.data = bias.repeat_interleave(4)
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_shuffle(self.conv(x), 2)


class _InferenceGDN(nn.Module):
    """GDN/IGDN with β, γ evaluated once (no reparametrization per call)."""

    def __init__(self, gdn: GDN):
        super().__init__()
        beta, gamma = gdn.effective_params()
        c = beta.numel()
        self.inverse = gdn.inverse
        self.register_buffer("beta", beta.detach().float().clone())
        self.register_buffer("gamma", gamma.detach().float().reshape(c, c, 1, 1).clone())

    def forward(self, x: Tensor) -> Tensor:
        norm = F.conv2d(x * x, self.gamma, self.beta)
        return x * norm.sqrt_() if self.inverse else x * norm.rsqrt_()


def inference_transform(transform: nn.Sequential) -> nn.Sequential:
    """A coding-only copy of ``g_a`` or ``g_s``: transposed convs as :class:`SubpixelDeconv`,
    GDNs with fixed parameters, channels-last (1.4x faster convolutions on CPU, float32
    throughout). Same function up to float rounding (|Δ| ~ 1e-6); the decoder always uses
    it, so decoded pixels do not depend on which form was trained."""
    layers = []
    for layer in transform:
        if isinstance(layer, nn.ConvTranspose2d):
            layers.append(SubpixelDeconv(layer))
        elif isinstance(layer, GDN):
            layers.append(_InferenceGDN(layer))
        elif isinstance(layer, nn.Conv2d):
            copy = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                             bias=layer.bias is not None)
            copy.load_state_dict(layer.state_dict())
            layers.append(copy.requires_grad_(False))
        else:
            raise ValueError(f"inference_transform: unexpected layer {type(layer).__name__}")
    return nn.Sequential(*layers).eval().to(memory_format=torch.channels_last)


class AnalysisTransform(nn.Sequential):
    """g_a: 3 → N → N → N → M channels, each a 5x5 stride-2 conv (÷16), GDN between."""

    def __init__(self, N: int, M: int):
        super().__init__(
            _conv(3, N), GDN(N),
            _conv(N, N), GDN(N),
            _conv(N, N), GDN(N),
            _conv(N, M),
        )


class SynthesisTransform(nn.Sequential):
    """g_s: mirror of g_a with transposed convs (×16) and inverse GDN."""

    def __init__(self, N: int, M: int):
        super().__init__(
            _deconv(M, N), GDN(N, inverse=True),
            _deconv(N, N), GDN(N, inverse=True),
            _deconv(N, N), GDN(N, inverse=True),
            _deconv(N, 3),
        )


class HyperAnalysis(nn.Sequential):
    """h_a (Minnen 2018): 3x3 conv, then two 5x5 stride-2 convs (÷4), LeakyReLU.

    Takes the signed y (not |y| as in Ballé 2018) because h_s must predict
    the mean as well as the scale.
    """

    def __init__(self, N: int, M: int):
        super().__init__(
            _conv(M, N, 3, 1), nn.LeakyReLU(inplace=True),
            _conv(N, N), nn.LeakyReLU(inplace=True),
            _conv(N, N),
        )


class HyperSynthesis(nn.Sequential):
    """h_s (Minnen 2018): two 5x5 stride-2 transposed convs, then a 3x3 conv to 2·M.

    The output is split into (mean, raw scale); the raw scale is lower
    bounded by :data:`SCALE_BOUND` in :meth:`HyperpriorCodec.hyper_synthesis`.
    """

    def __init__(self, N: int, M: int):
        super().__init__(
            _deconv(N, M), nn.LeakyReLU(inplace=True),
            _deconv(M, M * 3 // 2), nn.LeakyReLU(inplace=True),
            _conv(M * 3 // 2, 2 * M, 3, 1),
        )
