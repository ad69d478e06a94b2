"""Encoder-side latent refinement: stochastic Gumbel annealing (SGA).

Why: the analysis transform g_a is *amortized* inference — one network pass
guesses latents for any image. For one given image, the latents that minimize
the real objective ``R(ŷ, ẑ) + λ·D(x, g_s(ŷ))`` are usually elsewhere
(the amortization gap), and the gap is largest for a model trained briefly.
Yang, Bamler & Mandt 2020 ("Improving Inference for Neural Image
Compression", NeurIPS) close it per image by gradient descent on the latents
themselves, with rounding replaced by a stochastic relaxation whose
temperature is annealed toward zero so that the optimum found is one of
*rounded* latents. Only the encoder changes: the file is an ordinary image
section and any ncz decoder reads it.

Data flow of one iteration (all differentiable; ``y`` and, if the schedule
says so, ``z`` are the free variables, initialized from g_a and h_a)::

    z ──sga──► z̃ ──h_s──► (μ, σ)      rate_z = −log2 P_z(z̃)
    y ──(y − μ)──sga──► + μ ──► ỹ      rate_y = −log2 N(ỹ; μ, σ) * U(−½, ½)
    ỹ ──g_s·inv_gain(q)──► x̃            loss = (rate_z + rate_y)/pixels + λ·255²·MSE(x̃, x)

``sga(v)`` draws between ``floor(v)`` and ``ceil(v)`` from a relaxed
(Gumbel-softmax) two-way choice with logits ``−atanh(distance)/τ`` at
temperature τ (as the paper's code: the logits are divided by τ once more
inside the relaxed categorical); at large τ a soft average, as ``τ → 0`` hard
rounding to the nearer integer. y is relaxed around the mean, as the coder
quantizes it (``round(y − μ) + μ``).

The default schedule (:meth:`SGASchedule.default`, tuned in docs/CODEC.md)
refines y only: z stays h_a's, so μ and σ are the exact coded ones from the
integer h_s, computed once; with y and z together, as in the paper
(:meth:`SGASchedule.paper`), h_s inside the loop is a float surrogate of the
integer h_s (the same integer weights times their scales, without the
requantization), so the means and scales the optimizer sees are the coded
ones up to the activation steps. The step size decays (cosine) while τ
anneals: with noisy gradients Adam's normalized steps otherwise random-walk
the latents away from what the annealing found. g_s runs in bfloat16 with a
hand-written backward for its inverse GDNs (see :class:`_GradientSynthesis`).

Every decision is taken on what the file will hold: latents are *evaluated*
by coding them with the architecture's latent coder (real payload bytes) and
reconstructing the 8-bit pixels a decoder will show, at the start (g_a's
latents), at a few points of the annealing phase and at the end; the best of
those is returned. So a refinement never returns latents that code worse than
g_a's, and a time budget can stop it at any point with the best latents so far.
With checkerboard weights the loop relaxes y as the coder quantizes it: the
anchors around the hyperprior mean, then the non-anchors around the mean the
context gives from the relaxed anchors, and their rate under the context's
scales (:class:`_Relaxation`, through
:class:`~ncz.codec.context.ContextSurrogate`, the context's differentiable
copy); so the optimizer sees the rate the file will pay.

Encoder output is deterministic for given weights, image, quality, schedule
and torch thread count (seeded noise), unless a time budget cuts the schedule
short (then it depends on the machine's speed); the decoded pixels of the
resulting file are bit-exact everywhere as for any ncz file.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ncz.format import UsageError

from .context import ContextSurrogate, anchor_mask
from .integer import LEAKY_SLOPE
from .layers import SubpixelDeconv, lower_bound
from .networks import gaussian_likelihood
from .weights import CodecRuntime

__all__ = ["SGASchedule", "SGAProgress", "RefineResult", "refine_latents", "DEFAULT_ITERATIONS"]

#: iterations of ``SGASchedule.default()`` (``--effort sga``): 56–58 s for a 768×512 image on 2 idle cores
DEFAULT_ITERATIONS = 200


@dataclass(frozen=True)
class SGASchedule:
    """How one SGA run goes: iterations, Adam step size, temperature, variables, time budget.

    Progress ``p`` runs from 0 to 1 over the iterations (or over ``time_budget``
    seconds, whichever is ahead). The temperature is held at ``tau_max`` until
    ``p = warmup``, then decays exponentially to ``tau_min`` at ``p = 1`` (the
    paper's shape: 0.5 for 700 of 2,000 iterations, then ``exp(−10⁻³ t)``).
    The learning rate follows a half cosine from ``lr`` down to
    ``lr · lr_end`` (``lr_end = 1``: constant, as in the paper).

    ``optimize_z``: refine the hyper-latents z as well as y (the paper does;
    each step then also runs h_s forward and backward). ``time_budget``:
    seconds for one :func:`refine_latents` call, including its evaluations;
    the schedule is compressed to fit and the best latents so far are kept.
    ``checks``: how many times the coded cost is evaluated during the
    annealing phase, the last at the end.
    """

    iterations: int
    lr: float = 0.03
    tau_max: float = 0.5
    tau_min: float = 0.15
    warmup: float = 0.3
    lr_end: float = 0.1
    optimize_z: bool = False
    time_budget: float | None = None
    checks: int = 4

    def __post_init__(self) -> None:
        if not (isinstance(self.iterations, int) and 1 <= self.iterations <= 100_000):
            raise UsageError(f"SGA iterations must be an integer in 1..100000, got {self.iterations!r}")
        if not (self.lr > 0 and 0 < self.tau_min <= self.tau_max and 0 <= self.warmup < 1 and 0 < self.lr_end <= 1):
            raise UsageError("SGA schedule needs lr > 0, 0 < tau_min <= tau_max, 0 <= warmup < 1, 0 < lr_end <= 1")
        if self.time_budget is not None and not (self.time_budget > 0 and math.isfinite(self.time_budget)):
            raise UsageError(f"SGA time budget must be a positive number of seconds, got {self.time_budget!r}")
        if not (isinstance(self.checks, int) and 1 <= self.checks <= 100):
            raise UsageError(f"SGA checks must be an integer in 1..100, got {self.checks!r}")

    @classmethod
    def default(cls) -> SGASchedule:
        """The ``--effort sga`` schedule: most of the paper's gain in a fraction of its time (docs/CODEC.md).

        ``SGASchedule(n)`` is the same schedule stretched to ``n`` iterations."""
        return cls(DEFAULT_ITERATIONS)

    @classmethod
    def paper(cls, iterations: int = 2000) -> SGASchedule:
        """Yang, Bamler & Mandt 2020: Adam at 5·10⁻³ on y and z, ``τ = min(0.5, 0.5·exp(−10⁻³·(t − 700)))``
        over 2,000 iterations (τ ends at 0.136). Other counts stretch the same shape: τ held for 35 % of the
        iterations, then decaying by 10⁻³·2000/iterations per iteration."""
        if not (isinstance(iterations, int) and iterations >= 2):
            raise UsageError(f"the paper's SGA schedule needs at least 2 iterations, got {iterations!r}")
        hold = 0.35 * iterations
        decay = 0.001 * 2000 / iterations
        return cls(iterations, lr=0.005, tau_max=0.5, tau_min=0.5 * math.exp(-decay * (iterations - 1 - hold)),
                   warmup=hold / (iterations - 1), lr_end=1.0, optimize_z=True, checks=1)

    def progress(self, t: float) -> float:
        """Progress ``p`` of iteration ``t`` in ``0 .. iterations − 1``."""
        return min(1.0, t / (self.iterations - 1)) if self.iterations > 1 else 1.0

    def temperature(self, t: float) -> float:
        """τ for iteration ``t`` in ``0 .. iterations − 1``."""
        return self.temperature_at(self.progress(t))

    def temperature_at(self, p: float) -> float:
        """τ at progress ``p``."""
        if p <= self.warmup:
            return self.tau_max
        frac = min(1.0, (p - self.warmup) / (1.0 - self.warmup))
        return self.tau_max * math.exp(frac * math.log(self.tau_min / self.tau_max))

    def learning_rate_at(self, p: float) -> float:
        """Adam's step size at progress ``p``."""
        return self.lr * (self.lr_end + (1.0 - self.lr_end) * 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0))))

    def check_points(self) -> list[float]:
        """Progress values at which the coded cost is evaluated before the end (the end always is)."""
        return [self.warmup + (1.0 - self.warmup) * i / self.checks for i in range(1, self.checks)]


@dataclass(frozen=True)
class SGAProgress:
    """One step of a refinement, for progress displays.

    ``loss`` is the relaxed objective of this step; ``bpp`` and ``psnr`` are
    those of the latents that would be coded if refinement stopped now (the
    best evaluated so far: real payload bytes, 8-bit pixels).
    """

    step: int
    total: int
    fraction: float  # of the schedule: iterations or time budget, whichever is ahead
    temperature: float
    loss: float  # bits/pixel + λ·255²·MSE of this step's relaxed latents
    bpp: float  # payload bits per pixel of the best latents so far (the file adds its container)
    psnr: float  # dB, of their 8-bit reconstruction
    elapsed: float  # seconds since refine_latents started


@dataclass(frozen=True)
class RefineResult:
    """Latents to code and their coded losses before and after (payload bits/pixel + λ·255²·MSE of 8-bit pixels).

    ``bpp``/``psnr``: of the returned latents; ``steps``: iterations run;
    ``evaluations``: ``(step, coded loss)`` of every evaluation, g_a's latents
    first (step 0); ``pixels``: the (h, w, 3) uint8 reconstruction of the
    returned latents, as a decoder shows them when they are coded alone.
    """

    y: Tensor
    z: Tensor
    loss_before: float
    loss_after: float
    bpp: float = math.nan
    psnr: float = math.nan
    steps: int = 0
    evaluations: tuple[tuple[int, float], ...] = ()
    pixels: np.ndarray | None = None

    @property
    def improved(self) -> bool:
        return self.loss_after < self.loss_before


def sga_round(v: Tensor, tau: float, generator: torch.Generator, eps: float = 1e-5) -> Tensor:
    """One relaxed-rounding sample of ``v`` (see the module docstring).

    The two-way Gumbel-softmax ``softmax((l + g) / τ)[ceil]`` is computed as
    ``sigmoid((l_ceil − l_floor + g_ceil − g_floor) / τ)``, the difference of two
    Gumbel variables being one logistic variable: the same distribution, a
    third of the time (a softmax over a last axis of 2 is slow on CPU).
    """
    lo = torch.floor(v)
    frac = v - lo
    logit = (torch.atanh(frac.clamp(eps, 1 - eps)) - torch.atanh((1 - frac).clamp(eps, 1 - eps))) / tau
    u = torch.rand(v.shape, generator=generator, dtype=v.dtype, device=v.device).clamp_(1e-7, 1 - 1e-7)
    return lo.detach() + torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / tau)


class _FloatHyperSynthesis(torch.nn.Module):
    """Differentiable stand-in for :class:`~ncz.codec.integer.IntegerHyperSynthesis`."""

    def __init__(self, runtime: CodecRuntime, device: torch.device | str = "cpu"):
        super().__init__()
        self.layers = runtime.int_hs.layers

        def as_tensor(values: np.ndarray) -> Tensor:
            return torch.from_numpy(np.asarray(values, dtype=np.float32)).to(device)

        # per layer: integer weights, and scale/bias as (1, C, 1, 1) float32
        self.params = [(as_tensor(layer.weight), as_tensor(layer.scale)[None, :, None, None],
                        as_tensor(layer.bias)[None, :, None, None]) for layer in self.layers]

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        a = z
        for layer, (weight, scale, bias) in zip(self.layers, self.params):
            if layer.transposed:
                a = F.conv_transpose2d(a, weight, stride=layer.stride, padding=layer.padding,
                                       output_padding=layer.output_padding)
            else:
                a = F.conv2d(a, weight, stride=layer.stride, padding=layer.padding)
            a = a * scale + bias
            if layer.leaky:
                a = F.leaky_relu(a, LEAKY_SLOPE)
            if layer.out_step > 0:
                a = a / layer.out_step  # the integer path rounds here; the surrogate stays smooth
        raw_scale, mean = a.chunk(2, dim=1)  # the integer h_s's split
        return mean, raw_scale


class _InverseGDN(torch.autograd.Function):
    """``x·sqrt(β + γ x²)`` (inverse GDN) with a backward that makes four passes over its activations.

    Why: on CPU the elementwise passes over the full-resolution activations,
    not the convolutions, dominate g_s's backward; autograd's generic chain
    (square, conv, sqrt, multiply) makes about twice as many.
    ``∂/∂x_j = g_j s_j + x_j Σ_i γ_ij g_i x_i / s_i`` with ``s = sqrt(β + γ x²)``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        s = F.conv2d(x * x, gamma, beta).sqrt_()
        ctx.save_for_backward(x, s, gamma)
        return x * s

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, s, gamma = ctx.saved_tensors
        inner = F.conv_transpose2d((grad * x).div_(s), gamma)
        return torch.addcmul(grad * s, x, inner), None, None


class _GradientSynthesis:
    """g_s for the refinement loop: bfloat16 weights and activations, channels-last, custom IGDN backward.

    Built from the coding-only g_s (:func:`~ncz.codec.layers.inference_transform`: sub-pixel
    convolutions and inverse GDNs); any other layout runs that g_s under autocast instead.
    Same function up to bfloat16 rounding (gradients within ~1 % of float32); the coded
    cost is always evaluated in float32.
    """

    def __init__(self, g_s: torch.nn.Module, device: torch.device, bf16: bool):
        self.g_s, self.device, self.bf16 = g_s, device, bf16
        self.dtype = dtype = torch.bfloat16 if bf16 else torch.float32
        self.layers: list[Callable[[Tensor], Tensor]] | None = []
        for layer in g_s:
            if isinstance(layer, SubpixelDeconv):
                weight = layer.conv.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last)
                self.layers.append(partial(_subpixel, weight=weight, bias=layer.conv.bias.detach().to(dtype)))
            elif getattr(layer, "inverse", False) is True and hasattr(layer, "gamma") and hasattr(layer, "beta"):
                self.layers.append(partial(_inverse_gdn, gamma=layer.gamma.detach().to(dtype),
                                           beta=layer.beta.detach().to(dtype)))
            else:
                self.layers = None
                break

    def __call__(self, y: Tensor) -> Tensor:
        if self.layers is None:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                return self.g_s(y.contiguous(memory_format=torch.channels_last)).float()
        a = y.to(self.dtype).contiguous(memory_format=torch.channels_last)
        for layer in self.layers:
            a = layer(a)
        return a.float()


def _inverse_gdn(a: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    return _InverseGDN.apply(a, gamma, beta)


def _subpixel(a: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """A :class:`~ncz.codec.layers.SubpixelDeconv`: 3×3 convolution to 4× the channels, pixel shuffle."""
    return F.pixel_shuffle(F.conv2d(a, weight, bias, padding=1), 2)


def _device_of(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def _on(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return module if _device_of(module) == device else copy.deepcopy(module).to(device)


@dataclass
class _Evaluated:
    """Latents with their coded cost."""

    y: Tensor
    z: Tensor
    loss: float
    payload_bytes: int
    mse: float  # of 8-bit pixels, in [0, 1]² units
    pixels: np.ndarray
    step: int


class _Relaxation:
    """y relaxed as the latent coder quantizes it, with the means and scales it codes under.

    Hyperprior: ``sga(y − μ) + μ`` with h_s's μ, σ. Checkerboard (He et al. 2021): the anchors
    first, around h_s's μ; the context turns the relaxed anchors into Δμ, Δσ for the non-anchors,
    which are relaxed around their own mean — the order the coder works in
    (:class:`~ncz.codec.latents.CheckerboardLatents`).
    """

    def __init__(self, runtime: CodecRuntime, height: int, width: int, device: torch.device):
        self.context = None
        if runtime.int_context is not None:
            self.context = ContextSurrogate(runtime.int_context).to_device(device)
            self.anchors = anchor_mask(height, width, device)
            self.rest = 1.0 - self.anchors

    def __call__(self, y: Tensor, mean: Tensor, raw_scale: Tensor, tau: float,
                 generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``(relaxed y, mean, raw scale)`` the rate of ``y`` is counted under."""
        relaxed = sga_round(y - mean, tau, generator) + mean
        if self.context is None:
            return relaxed, mean, raw_scale
        d_mean, d_scale = self.context(relaxed * self.anchors, mean, raw_scale)
        mean = mean + self.rest * d_mean
        raw_scale = raw_scale + self.rest * d_scale
        rest = sga_round(y - mean, tau, generator) + mean
        return self.anchors * relaxed + self.rest * rest, mean, raw_scale


def refine_latents(runtime: CodecRuntime, x: Tensor, size: tuple[int, int], quality: float,
                   schedule: SGASchedule, *, seed: int = 0, autocast: bool = True,
                   progress: Callable[[int, int], None] | None = None,
                   report: Callable[[SGAProgress], None] | None = None) -> RefineResult:
    """SGA on the latents of one padded image block ``x`` (``(1, 3, H, W)`` in [0, 1], H and W multiples of 64).

    ``size`` is the unpadded ``(h, w)``: distortion counts only real pixels,
    rate counts every latent. ``autocast`` runs g_s in bfloat16 inside the
    loop (about 1.8x faster on CPU, same loss reached). ``progress(done, total)``
    counts iterations (under a time budget: the share of the schedule done);
    ``report`` receives an :class:`SGAProgress` every iteration.

    Runs on the device of ``runtime.g_s`` (CUDA when the runtime's networks
    were moved there); the coded cost is always computed by the integer
    latent coder on the CPU, so the file is the same kind either way.

    Returns the latents to code (``y`` continuous, ``z`` integer-valued, on
    the CPU) and their coded losses; when SGA did not improve on the
    amortized latents, those are returned unchanged.
    """
    start = time.perf_counter()
    net = runtime.net
    device = _device_of(runtime.g_s)
    h, w = size
    pixels = h * w
    lam = float(net.lambda_for(quality)) * 255.0 ** 2
    x = x.to(device)
    target = x[..., :h, :w]
    target_8bit = torch.round(target * 255.0)
    inv_gain = net.gains.inv_gain(quality).detach().to(device)
    bottleneck = _on(net.entropy_bottleneck, device)
    synthesis = _GradientSynthesis(runtime.g_s, device, autocast)
    likelihood_bound, scale_bound = runtime.config.likelihood_bound, runtime.config.scale_bound

    def relaxed_objective(y_t: Tensor, z_t: Tensor, mean: Tensor, raw_scale: Tensor) -> Tensor:
        lik_z = bottleneck.likelihood(z_t, likelihood_bound)
        lik_y = gaussian_likelihood(y_t, mean, lower_bound(raw_scale, scale_bound), scale_bound, likelihood_bound)
        bits = -(torch.log2(lik_z).sum() + torch.log2(lik_y).sum())
        mse = torch.mean((synthesis(y_t * inv_gain)[..., :h, :w] - target) ** 2)
        return bits / pixels + lam * mse

    @torch.no_grad()
    def evaluate(y: Tensor, z: Tensor, step: int) -> _Evaluated:
        coded = runtime.latents.encode(y[0].detach().double().cpu().numpy(), z[0].detach().cpu().numpy())
        payload = sum(len(s) for s in coded.streams)
        y_hat = torch.from_numpy(coded.y_hat.astype(np.float32))[None].to(device)
        x_hat = runtime.g_s((y_hat * inv_gain).contiguous(memory_format=torch.channels_last))[..., :h, :w]
        decoded = torch.floor(x_hat.clamp(0, 1) * 255.0 + 0.5)  # as the decoder rounds to 8 bits
        mse = float(torch.mean((decoded - target_8bit).double() ** 2)) / 255.0 ** 2
        z_hat = torch.from_numpy(coded.z_hat.astype(np.float32))[None]
        return _Evaluated(y.detach().cpu().clone(), z_hat, 8.0 * payload / pixels + lam * mse, payload, mse,
                          decoded[0].permute(1, 2, 0).to(torch.uint8).cpu().numpy(), step)

    with torch.no_grad():
        y0 = runtime.analyze_raw(x).to(device) * net.gains.gain(quality).detach().to(device)
        z0 = net.hyper_analysis(y0.to(_device_of(net))).to(device)
    evaluated_at = time.perf_counter()
    before = best = evaluate(y0, z0, 0)
    evaluation_seconds = time.perf_counter() - evaluated_at

    total = schedule.iterations
    y = y0.clone().requires_grad_(True)
    variables = [y]
    if schedule.optimize_z:
        hyper_synthesis = _FloatHyperSynthesis(runtime, device)
        z = z0.clone().requires_grad_(True)
        variables.append(z)
    else:  # z stays g_a's: the exact coded means and scales, computed once
        z = torch.round(z0)
        mean_np, raw_scale_np = runtime.int_hs(z[0].cpu().numpy().astype(np.int64))
        fixed_mean = torch.from_numpy(mean_np).float().to(device)
        fixed_raw_scale = torch.from_numpy(raw_scale_np).float().to(device)
    relax = _Relaxation(runtime, y0.shape[2], y0.shape[3], device)
    optimizer = torch.optim.Adam(variables, lr=schedule.lr)
    generator = torch.Generator(device=device).manual_seed(seed)
    checks = schedule.check_points()
    budget = schedule.time_budget
    step, step_seconds, last_evaluated = 0, 0.0, 0

    evaluations = [(0, before.loss)]

    def consider(candidate: _Evaluated) -> None:
        nonlocal best
        evaluations.append((candidate.step, candidate.loss))
        if candidate.loss < best.loss:
            best = candidate

    while step < total:
        step_start = time.perf_counter()
        fraction = schedule.progress(step)
        if budget is not None:  # where this step and a final evaluation would leave the budget
            spent = (step_start - start + step_seconds + evaluation_seconds) / budget
            if spent > 1.0:
                break
            fraction = max(fraction, spent)
        tau = schedule.temperature_at(fraction)
        for group in optimizer.param_groups:
            group["lr"] = schedule.learning_rate_at(fraction)
        if schedule.optimize_z:
            z_t = sga_round(z, tau, generator)
            mean, raw_scale = hyper_synthesis(z_t)
        else:
            z_t, mean, raw_scale = z, fixed_mean, fixed_raw_scale
        y_t, mean, raw_scale = relax(y, mean, raw_scale, tau, generator)
        loss = relaxed_objective(y_t, z_t, mean, raw_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        step_seconds = time.perf_counter() - step_start
        if checks and fraction >= checks[0]:  # a time budget may cross several at once: one evaluation
            checks = [point for point in checks if point > fraction]
            evaluated_at = time.perf_counter()
            consider(evaluate(y, z, step))
            evaluation_seconds = time.perf_counter() - evaluated_at
            last_evaluated = step
        if progress:
            progress(min(total, max(step, round(fraction * total))), total)
        if report:
            report(SGAProgress(step, total, fraction, tau, float(loss.detach()), 8.0 * best.payload_bytes / pixels,
                               _psnr(best.mse), time.perf_counter() - start))
    if step > last_evaluated:
        consider(evaluate(y, z, step))
    if progress:
        progress(total, total)
    return RefineResult(best.y, best.z, before.loss, best.loss, bpp=8.0 * best.payload_bytes / pixels,
                        psnr=_psnr(best.mse), steps=step, evaluations=tuple(evaluations), pixels=best.pixels)


def _psnr(mse: float) -> float:
    return 10.0 * math.log10(1.0 / mse) if mse > 0 else math.inf
