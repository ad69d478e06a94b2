r"""Neural networks of the ncz learned image codec.

A mean-scale hyperprior (Ballé et al. 2018, "Variational image compression
with a scale hyperprior", ICLR; Minnen, Ballé & Toderici 2018, "Joint
autoregressive and hierarchical priors for learned image compression",
NeurIPS -- the "Mean & Scale Hyperprior" variant *without* the autoregressive
context model), made variable-rate with gain units (Cui et al. 2021,
"Asymmetric Gained Deep Image Compression With Continuous Rate Adaptation",
CVPR).

Data flow (``q`` is the continuous quality level in ``[0, L-1]``)::

                          gain(q)                      inv_gain(q)
     x ──g_a──► y_raw ──────×──────► y ─────────Q_μ────► ŷ ──×──► g_s ──► x̂
                                     │                   ▲
                                    h_a              (μ, σ)│ p(ŷ|ẑ) = N(μ, σ²) * U(-½, ½)
                                     │                   │
                                     ▼                   │
                                     z ──Q──► ẑ ──h_s────┘
                                              │
                                   p(ẑ) = factorized learned density
                                          ("EntropyBottleneck", Ballé 2018)

* ``g_a`` / ``g_s``: analysis / synthesis transforms, 4 stride-2 5x5
  convolutions each, with GDN / inverse GDN (Ballé, Laparra & Simoncelli
  2016, "Density modeling of images using a generalized normalization
  transformation"), total down-sampling 16.
* ``h_a`` / ``h_s``: hyper transforms (Minnen 2018 layout), down-sampling 4
  more, so an input must be a multiple of 64 pixels: see
  :func:`pad_to_multiple` / :func:`crop`.
* ``Q_μ``: quantization *around the predicted mean*: ``ŷ = round(y - μ) + μ``.
  The integer symbols that an entropy coder writes are ``round(y - μ)``,
  whose distribution is a zero-mean discretized Gaussian of scale ``σ``.
* Gain units: ``y = y_raw · gain(q)`` and the decoder sees
  ``ŷ · inv_gain(q)``. One positive per-channel vector pair per trained λ
  level; between levels the vectors are interpolated *exponentially*
  (``g = g_i^(1-t) · g_{i+1}^t``, i.e. linearly in log space), which Cui et
  al. show gives a smooth, monotone rate curve. Larger gain = finer
  effective quantization step = higher rate.

Training uses the usual continuous relaxation (Ballé et al. 2017, "End-to-end
optimized image compression"): the *rate* terms see additive uniform noise
(``y + U(-½,½)``, ``z + U(-½,½)``), while the *decoder inputs* see the rounded
values with a straight-through gradient ("mixed quantization", Minnen & Singh
2020, "Channel-wise autoregressive entropy models for learned image
compression"), which removes the train/test mismatch of feeding noisy latents
to ``g_s`` and ``h_s``.

Everything that is probability math (the factorized prior, the Gaussian
conditional, the gains) runs in float32 even when the transforms run under
bf16 autocast (:attr:`HyperpriorCodec.autocast_dtype`): bits are ``-log2`` of
small differences of CDFs, which bf16's 8-bit mantissa cannot resolve.

The helper methods :meth:`HyperpriorCodec.analysis`,
:meth:`~HyperpriorCodec.hyper_analysis`, :meth:`~HyperpriorCodec.hyper_synthesis`,
:meth:`~HyperpriorCodec.synthesis` and :meth:`EntropyBottleneck.cdf` /
:meth:`EntropyBottleneck.integer_pmf` / :meth:`EntropyBottleneck.support` are
pure functions of their inputs (no noise, no state) for the actual coding path.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import AnalysisTransform, HyperAnalysis, HyperSynthesis, SynthesisTransform, lower_bound, ste_round

__all__ = [
    "CodecConfig",
    "DEFAULT_LAMBDAS",
    "SCALE_BOUND",
    "LIKELIHOOD_BOUND",
    "EntropyBottleneck",
    "gaussian_likelihood",
    "GainUnits",
    "HyperpriorCodec",
    "pad_to_multiple",
    "crop",
    "bits_per_pixel",
]

#: λ list (CompressAI convention, loss = λ·255²·MSE + bpp), ascending = low to
#: high rate. These are CompressAI's quality levels 1..7; for a well-trained
#: mean-scale hyperprior they land at roughly 0.12, 0.19, 0.29, 0.44, 0.65,
#: 0.95 and 1.35 bpp on Kodak, so an under-trained model (which spends a bit
#: more rate) still covers the 0.15--1.2 bpp target band with margin.
DEFAULT_LAMBDAS: tuple[float, ...] = (0.0018, 0.0035, 0.0067, 0.0130, 0.0250, 0.0483, 0.0932)

#: Lower bound of the Gaussian scale σ (same value as CompressAI's
#: ``SCALES_MIN``): below ~0.11 a unit-width bin holds essentially all mass,
#: so smaller scales only cause numerical trouble.
SCALE_BOUND = 0.11

#: Lower bound of every likelihood, so ``-log2`` stays finite (≤ ~30 bits).
LIKELIHOOD_BOUND = 1e-9


@dataclass(frozen=True)
class CodecConfig:
    """Architecture of a :class:`HyperpriorCodec`; recorded in weights files.

    Attributes:
        N: channels of the hidden layers of g_a / g_s and of z.
        M: channels of y.
        lambdas: one λ per quality level, ascending (low rate first).
        scale_bound: lower bound of σ in the Gaussian conditional.
        likelihood_bound: lower bound of every likelihood.
        eb_filters: hidden widths of the per-channel CDF nets of the
            factorized prior (Ballé 2018 uses (3, 3, 3)).
        eb_init_scale: initial scale of the factorized prior's density.
        pad_multiple: spatial multiple the input must have (16 · 4 = 64).
        arch: architecture tag, bumped whenever the layer layout changes.
    """

    N: int = 128
    M: int = 192
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    scale_bound: float = SCALE_BOUND
    likelihood_bound: float = LIKELIHOOD_BOUND
    eb_filters: tuple[int, ...] = (3, 3, 3)
    eb_init_scale: float = 10.0
    pad_multiple: int = 64
    arch: str = "mean-scale-hyperprior+gain/v1"

    def __post_init__(self):
        # Accept lists (e.g. from JSON / msgpack) but store tuples so the
        # dataclass stays hashable and comparable.
        object.__setattr__(self, "lambdas", tuple(float(v) for v in self.lambdas))
        object.__setattr__(self, "eb_filters", tuple(int(v) for v in self.eb_filters))
        if len(self.lambdas) < 2:
            raise ValueError("need at least two λ levels")
        if any(b <= a for a, b in zip(self.lambdas, self.lambdas[1:])):
            raise ValueError("lambdas must be strictly ascending")

    @property
    def num_levels(self) -> int:
        return len(self.lambdas)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lambdas"] = list(self.lambdas)
        d["eb_filters"] = list(self.eb_filters)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CodecConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})



# --------------------------------------------------------------------------
# entropy models
# --------------------------------------------------------------------------


class EntropyBottleneck(nn.Module):
    r"""Factorized learned prior for z (Ballé et al. 2018, appendix 6.1).

    Each channel ``c`` has its own scalar CDF ``F_c(x) = sigmoid(f_c(x))``
    where ``f_c`` is a tiny 1→3→3→3→1 network whose matrices are kept
    positive (softplus) and whose gates ``a·tanh(·)`` have ``tanh(a) > -1``,
    so ``f_c`` is monotone increasing by construction. The probability of an
    integer symbol ``k`` (equivalently the density of ``z + U(-½,½)`` at ``k``,
    which is what training fits) is ``F_c(k + ½) - F_c(k - ½)``.

    No learned median/quantile offsets are used (so no auxiliary loss is
    needed): z is quantized as plain ``round(z)`` and the integer support per
    channel is found at table-building time with :meth:`support`.
    """

    def __init__(self, channels: int, filters: Sequence[int] = (3, 3, 3), init_scale: float = 10.0):
        super().__init__()
        self.channels = int(channels)
        self.filters = tuple(int(f) for f in filters)
        dims = (1,) + self.filters + (1,)
        scale = init_scale ** (1.0 / (len(self.filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(self.filters) + 1):
            init = math.log(math.expm1(1.0 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.empty(channels, dims[i + 1], 1).uniform_(-0.5, 0.5)))
            if i < len(self.filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))

    def logits_cdf(self, x: Tensor) -> Tensor:
        """``f_c(x)`` for ``x`` of shape ``(C, n)`` (any float dtype; parameters are cast to it)."""
        dt = x.dtype
        logits = x.unsqueeze(1)  # (C, 1, n)
        for i in range(len(self.matrices)):
            logits = torch.matmul(F.softplus(self.matrices[i].to(dt)), logits) + self.biases[i].to(dt)
            if i < len(self.factors):
                logits = logits + torch.tanh(self.factors[i].to(dt)) * torch.tanh(logits)
        return logits.squeeze(1)

    def cdf(self, x: Tensor) -> Tensor:
        """Per-channel CDF ``F_c(x)``; ``x`` has shape ``(C, n)``.

        Evaluate in float64 (pass a float64 ``x``) when tabulating
        quantized CDFs for the coder.
        """
        return torch.sigmoid(self.logits_cdf(x))

    def _pmf_flat(self, v: Tensor) -> Tensor:
        # v: (C, n). |σ(s·u) - σ(s·l)| with s = -sign(l + u) evaluates the
        # difference in the tail where it is small, avoiding 1 - 1 cancellation.
        lower = self.logits_cdf(v - 0.5)
        upper = self.logits_cdf(v + 0.5)
        sign = -torch.sign(lower + upper).detach()
        return torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))

    def likelihood(self, z: Tensor, bound: float = LIKELIHOOD_BOUND) -> Tensor:
        """``P(z)`` elementwise for ``z`` of shape ``(B, C, H, W)`` (noisy or integer), lower bounded."""
        B, C, H, W = z.shape
        v = z.float().permute(1, 0, 2, 3).reshape(C, -1)
        p = self._pmf_flat(v)
        p = p.reshape(C, B, H, W).permute(1, 0, 2, 3)
        return lower_bound(p, bound)

    @torch.no_grad()
    def integer_pmf(self, lo: int, hi: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """Probabilities of the integers ``lo..hi`` for every channel, shape ``(C, hi-lo+1)``.

        Not renormalized and without the tails: a coder adds escape/tail
        mass as it sees fit.
        """
        k = torch.arange(lo, hi + 1, dtype=dtype, device=self.biases[0].device)
        return self._pmf_flat(k.expand(self.channels, -1).contiguous())

    @torch.no_grad()
    def support(self, tail_mass: float = 1e-9, max_range: int = 1 << 15) -> tuple[Tensor, Tensor]:
        """Per-channel integer range ``[lo, hi]`` outside which less than ``tail_mass`` lies.

        Returns two int64 tensors of shape ``(C,)`` with ``F(lo - ½) ≤ tail/2``
        and ``1 - F(hi + ½) ≤ tail/2`` (clipped to ``±max_range``).
        """
        dev = self.biases[0].device
        r = 64
        while True:
            edges = torch.arange(-r, r + 2, dtype=torch.float64, device=dev) - 0.5  # k - 1/2 for k in [-r, r+1]
            logits = self.logits_cdf(edges.expand(self.channels, -1).contiguous())
            # F(k - 1/2) ≤ t/2 ⇔ logit ≤ logit(t/2); use logits to avoid 1 - F cancellation.
            t = math.log(tail_mass / 2) - math.log1p(-tail_mass / 2)
            below = logits <= t              # (C, 2r+2): F(k-½) small
            above = logits >= -t             # 1 - F(k-½) small
            ok = below[:, 0].all() and above[:, -1].all()
            if ok or r >= max_range:
                break
            r *= 2
        ks = torch.arange(-r, r + 2, device=dev)
        # lo: the largest k with F(k - ½) ≤ t/2;  hi: smallest k with 1 - F(k + ½) ≤ t/2.
        lo = torch.where(below, ks.expand_as(below), torch.full_like(below, -r, dtype=torch.long)).max(dim=1).values
        big = torch.full_like(above, r + 1, dtype=torch.long)
        hi = torch.where(above, ks.expand_as(above) - 1, big).min(dim=1).values
        return lo, hi


def _std_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-x * (2 ** -0.5))


def gaussian_likelihood(y_hat: Tensor, mean: Tensor, scale: Tensor,
                        scale_bound: float = SCALE_BOUND,
                        bound: float = LIKELIHOOD_BOUND) -> Tensor:
    """``P(ŷ)`` under ``N(mean, scale²) * U(-½, ½)``, i.e. the mass of the unit bin around ``ŷ``.

    Uses the symmetric form ``Φ((½ - |v|)/σ) - Φ((-½ - |v|)/σ)`` with
    ``v = ŷ - μ``, which evaluates the difference in the lower tail (no
    ``1 - 1`` cancellation). Always computed in float32 or wider.
    """
    dt = torch.promote_types(y_hat.dtype, torch.float32)
    v = torch.abs(y_hat.to(dt) - mean.to(dt))
    s = lower_bound(scale.to(dt), scale_bound)
    upper = _std_normal_cdf((0.5 - v) / s)
    lower = _std_normal_cdf((-0.5 - v) / s)
    return lower_bound(upper - lower, bound)


# --------------------------------------------------------------------------
# gain units
# --------------------------------------------------------------------------


class GainUnits(nn.Module):
    """Per-level, per-channel gain / inverse-gain vectors (Cui et al. 2021).

    Stored as logs (so they stay positive and exponential interpolation is
    linear in the stored parameters). Level ``i`` is initialized to
    ``gain_i = sqrt(λ_i / λ_ref)`` with ``λ_ref`` the geometric mean of the
    list: at high rate the optimal uniform quantizer step for
    ``λ·D + R`` scales as ``λ^(-1/2)``, so this start already orders and
    spaces the levels about right; ``inv_gain`` starts at ``1 / gain``.
    """

    def __init__(self, lambdas: Sequence[float], channels: int):
        super().__init__()
        lam = torch.tensor(list(lambdas), dtype=torch.float64)
        log_g = 0.5 * (torch.log(lam) - torch.log(lam).mean())
        self.log_gain = nn.Parameter(log_g.float()[:, None].repeat(1, channels))
        self.log_inv_gain = nn.Parameter(-log_g.float()[:, None].repeat(1, channels))

    @property
    def num_levels(self) -> int:
        return self.log_gain.shape[0]

    def _interp(self, table: Tensor, quality: float | Tensor) -> Tensor:
        L = table.shape[0]
        q = torch.as_tensor(quality, dtype=torch.float32, device=table.device)
        q = q.reshape(-1).clamp(0, L - 1)
        i0 = torch.floor(q).long().clamp(max=L - 2)
        t = (q - i0.to(q.dtype))[:, None]
        logv = (1 - t) * table[i0] + t * table[i0 + 1]  # (B, M)
        return torch.exp(logv)[:, :, None, None]  # (1 or B, M, 1, 1)

    def gain(self, quality: float | Tensor) -> Tensor:
        """Gain vector(s) for ``quality`` (float or ``(B,)`` tensor), shape ``(1|B, M, 1, 1)``."""
        return self._interp(self.log_gain, quality)

    def inv_gain(self, quality: float | Tensor) -> Tensor:
        """Inverse-gain vector(s), shape ``(1|B, M, 1, 1)``."""
        return self._interp(self.log_inv_gain, quality)


# --------------------------------------------------------------------------
# the codec
# --------------------------------------------------------------------------


def pad_to_multiple(x: Tensor, multiple: int = 64) -> tuple[Tensor, tuple[int, int]]:
    """Pad ``(B, C, H, W)`` at the bottom/right by edge replication to a multiple.

    Replication (rather than zeros) avoids a hard edge that would cost bits
    and ring into the image. Returns the padded tensor and the original
    ``(H, W)`` for :func:`crop`.
    """
    H, W = x.shape[-2:]
    ph = (-H) % multiple
    pw = (-W) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (H, W)


def crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Undo :func:`pad_to_multiple`: keep the top-left ``size = (H, W)``."""
    H, W = size
    return x[..., :H, :W]


def bits_per_pixel(likelihoods: dict[str, Tensor], num_pixels: int, per_sample: bool = False) -> Tensor:
    """``Σ -log2 P / num_pixels`` over all likelihood tensors (per sample if asked)."""
    total = None
    for lik in likelihoods.values():
        bits = -torch.log2(lik.float())
        bits = bits.flatten(1).sum(1) if per_sample else bits.sum()
        total = bits if total is None else total + bits
    return total / num_pixels


class HyperpriorCodec(nn.Module):
    """Mean-scale hyperprior with gain units; see the module docstring.

    ``quality`` everywhere is a float (or a ``(B,)`` tensor, one per sample)
    in ``[0, num_levels - 1]``; integer values are the trained λ levels
    ``config.lambdas``, fractional ones interpolate.

    Set :attr:`autocast_dtype` (e.g. ``torch.bfloat16``) to run the four
    transforms under autocast; all entropy-model math stays float32.
    """

    def __init__(self, config: CodecConfig | None = None, **overrides):
        super().__init__()
        if config is None:
            config = CodecConfig(**overrides)
        elif overrides:
            raise TypeError("pass either a config or keyword overrides, not both")
        self.config = config
        N, M = config.N, config.M
        self.g_a = AnalysisTransform(N, M)
        self.g_s = SynthesisTransform(N, M)
        self.h_a = HyperAnalysis(N, M)
        self.h_s = HyperSynthesis(N, M)
        self.entropy_bottleneck = EntropyBottleneck(N, config.eb_filters, config.eb_init_scale)
        self.gains = GainUnits(config.lambdas, M)
        #: dtype for autocast of the transforms (None = off). Runtime only,
        #: not part of the architecture.
        self.autocast_dtype: torch.dtype | None = None

    # -- plumbing ---------------------------------------------------------

    @property
    def num_levels(self) -> int:
        return self.config.num_levels

    def _run(self, net: nn.Module, x: Tensor) -> Tensor:
        """Run a transform, under autocast if configured; return float32."""
        if self.autocast_dtype is None:
            return net(x)
        with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
            out = net(x)
        return out.float()

    # -- pure helpers for the coding path ---------------------------------

    def analysis(self, x: Tensor, quality: float | Tensor) -> Tensor:
        """``y = g_a(x) · gain(q)``; ``x`` in [0, 1], H and W multiples of 64."""
        return self._run(self.g_a, x) * self.gains.gain(quality)

    def hyper_analysis(self, y: Tensor) -> Tensor:
        """``z = h_a(y)`` (y already gained)."""
        return self._run(self.h_a, y)

    def hyper_synthesis(self, z_hat: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, scale) = h_s(ẑ)``, scale lower bounded by ``config.scale_bound``."""
        params = self._run(self.h_s, z_hat)
        raw_scale, mean = params.chunk(2, dim=1)
        return mean, lower_bound(raw_scale, self.config.scale_bound)

    def synthesis(self, y_hat: Tensor, quality: float | Tensor) -> Tensor:
        """``x̂ = g_s(ŷ · inv_gain(q))`` (not clamped)."""
        return self._run(self.g_s, y_hat * self.gains.inv_gain(quality))

    @staticmethod
    def quantize_around(y: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(symbols, ŷ)`` with ``symbols = round(y - μ)`` and ``ŷ = symbols + μ``."""
        s = torch.round(y - mean)
        return s, s + mean

    def z_likelihood(self, z_hat: Tensor) -> Tensor:
        return self.entropy_bottleneck.likelihood(z_hat, self.config.likelihood_bound)

    def y_likelihood(self, y_hat: Tensor, mean: Tensor, scale: Tensor) -> Tensor:
        return gaussian_likelihood(y_hat, mean, scale, self.config.scale_bound, self.config.likelihood_bound)

    def lambda_for(self, quality: float | Tensor) -> Tensor:
        """λ for (possibly fractional) quality, log-linear between levels."""
        lam = torch.log(torch.tensor(self.config.lambdas, dtype=torch.float64))
        q = torch.as_tensor(quality, dtype=torch.float64).clamp(0, self.num_levels - 1)
        i0 = torch.floor(q).long().clamp(max=self.num_levels - 2)
        t = q - i0.double()
        return torch.exp((1 - t) * lam[i0] + t * lam[i0 + 1]).float()

    # -- training / estimation forward ------------------------------------

    def forward(self, x: Tensor, quality: float | Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Return ``(x̂, {"y": P(ŷ), "z": P(ẑ)})``.

        Training mode: rate terms on ``y + U``/``z + U``; ``g_s`` and ``h_s``
        get STE-rounded latents (mixed quantization). Eval mode: everything
        rounded, i.e. the likelihoods are exactly what an ideal entropy
        coder would pay. ``x`` must be padded to a multiple of 64.
        """
        y = self.analysis(x, quality)
        z = self.hyper_analysis(y)
        if self.training:
            z_noisy = z + torch.empty_like(z).uniform_(-0.5, 0.5)
            lik_z = self.z_likelihood(z_noisy)
            z_hat = ste_round(z)
            mean, scale = self.hyper_synthesis(z_hat)
            y_noisy = y + torch.empty_like(y).uniform_(-0.5, 0.5)
            lik_y = self.y_likelihood(y_noisy, mean, scale)
            y_hat = ste_round(y - mean) + mean
        else:
            z_hat = torch.round(z)
            lik_z = self.z_likelihood(z_hat)
            mean, scale = self.hyper_synthesis(z_hat)
            _, y_hat = self.quantize_around(y, mean)
            lik_y = self.y_likelihood(y_hat, mean, scale)
        x_hat = self.synthesis(y_hat, quality)
        return x_hat, {"y": lik_y, "z": lik_z}
