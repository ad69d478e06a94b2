"""What bits-back coding of the hyper-latents z could return with the shipped weights (issue 15).

Bits-back (Yang, Bamler & Mandt 2020, §3.3) codes z with a posterior q(z | ŷ) that the decoder can
evaluate, so it gets −log q(z | ŷ) bits back: the net cost of an image is
``−log p(z) − log p(ŷ | z) + log q(z | ŷ)`` against ``−log P(ẑ) − log p(ŷ | ẑ)`` today. Three
measurements decide whether that pays on this model before any format is built:

1. **The lattice.** The coder quantizes y around the hyperprior's mean, ``ŷ = round(y − μ(ẑ)) + μ(ẑ)``,
   so ŷ depends on the z that bits-back would *sample* after looking at ŷ: a circle. Bits-back needs
   a z-independent lattice, ``ŷ = round(y)`` (μ then only shifts the Gaussian). Its cost: rate and
   PSNR of both lattices at the amortized ẑ = round(h_a(y)).
2. **A continuous posterior** (the paper's): q = N(h_a(ŷ), σ²) on a fine grid. The bits returned,
   the z rate under the learned density, and the y rate under h_s(z) at the sampled (non-integer) z,
   for a sweep of σ, against the same float networks at the integer ẑ (σ = 0). Needs the float h_s
   from the train-state file.
3. **A posterior on the integer grid** (no fine grid): each sampled element of ẑ is moved by
   d ∈ {−2, −1, 1, 2} alone and the exact cost change measured with the coder's integer h_s and
   context; ``log₂ Σ_d p(ẑ + d)/p(ẑ_best)`` per element is what a mean-field q built from those
   alternatives returns, extrapolated to all elements (an optimistic bound: it ignores that moves
   interact). The element's best move is reported too (what a discrete search of ẑ could gain on
   this lattice; on the coder's own lattice, ŷ = round(y − μ) + μ, a real search gains far less:
   docs/CODEC.md).

4. ``--greedy IMAGE``: a greedy search of ẑ on the coder's own lattice (every element ±1, kept
   when the exact coded cost falls; up to two sweeps) on the image's 256×256 centre crop at level 0,
   with the real payload bytes and PSNR before and after each sweep.

    python bench/bits_back.py [--data ../shared/data/kodak] [--every 8] [--qualities 0 2 6] [--samples 40]
                              [--greedy kodim05]

Writes ``bench/results/bits_back.json`` and prints it. Rates are ideal code lengths (−log₂ of the
model's probabilities, as the coder's tables approximate them to < 0.1 %), PSNR on 8-bit RGB.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ncz.codec import Pixels, load_codec
from ncz.codec.context import anchor_mask
from ncz.codec.image import ImageEncoder
from ncz.codec.layers import lower_bound
from ncz.codec.networks import gaussian_likelihood
from ncz.codec.refine import ContextSurrogate
from ncz.models import load_state_dict

REPO = Path(__file__).resolve().parent.parent
SIGMAS = (0.1, 0.2, 0.3, 0.5)
MOVES = (-2, -1, 1, 2)


class _Rates:
    """Ideal bits of (ŷ, z) under the shipped weights, with the context as the coder applies it."""

    def __init__(self, runtime, train_state: str | None):
        self.runtime, self.net, self.cfg = runtime, runtime.net, runtime.config
        self.context = ContextSurrogate(runtime.int_context) if runtime.int_context is not None else None
        self.float_hs = False
        if train_state is not None:  # the coder ships h_s only as integers; the float copy lives here
            state = {k[len("h_s."):]: v for k, v in load_state_dict(train_state).items() if k.startswith("h_s.")}
            self.net.h_s.load_state_dict(state)
            self.float_hs = True

    def hyper(self, z: torch.Tensor, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if exact:  # the coder's integer h_s (integer z only)
            mean, raw = self.runtime.int_hs(z[0].numpy().astype(np.int64))
            return torch.from_numpy(mean).float(), torch.from_numpy(raw).float()
        params = self.net.h_s(z)
        raw, mean = params.chunk(2, dim=1)
        return mean, raw

    def y_bits(self, y: torch.Tensor, mean: torch.Tensor, raw: torch.Tensor,
               lattice: str) -> tuple[float, torch.Tensor]:
        """Bits of y on ``lattice`` ("mean": round(y − μ) + μ as coded today; "integer": round(y))."""
        def quantize(m: torch.Tensor) -> torch.Tensor:
            return torch.round(y - m) + m if lattice == "mean" else torch.round(y)

        y_hat = quantize(mean)
        if self.context is not None:
            anchors = anchor_mask(y.shape[2], y.shape[3])
            rest = 1.0 - anchors
            d_mean, d_raw = self.context(y_hat * anchors, mean, raw)
            mean, raw = mean + rest * d_mean, raw + rest * d_raw
            y_hat = anchors * y_hat + rest * quantize(mean)
        likelihood = gaussian_likelihood(y_hat, mean, lower_bound(raw, self.cfg.scale_bound), self.cfg.scale_bound,
                                         self.cfg.likelihood_bound)
        return float(-torch.log2(likelihood).sum()), y_hat

    def z_bits(self, z: torch.Tensor) -> float:
        """Integer z: −log₂ P(ẑ). Non-integer z: −log₂ of the density of p * U(−½, ½) (the density the
        prior was trained as, so on a grid of step δ the cost is this − log₂ δ)."""
        return float(-torch.log2(self.net.z_likelihood(z)).sum())

    def total_exact(self, y: torch.Tensor, z: torch.Tensor) -> float:
        mean, raw = self.hyper(z, exact=True)
        return self.y_bits(y, mean, raw, "integer")[0] + self.z_bits(z)


def _mse(net, y_hat: torch.Tensor, quality: float, pixels: np.ndarray) -> float:
    h, w = pixels.shape[:2]
    x_hat = net.synthesis(y_hat, quality).clamp(0, 1)[0, :, :h, :w]
    decoded = torch.floor(x_hat * 255.0 + 0.5)
    return float(((decoded - torch.from_numpy(pixels.copy()).permute(2, 0, 1).float()) ** 2).mean())


def _psnr(mse: float) -> float:
    return 10.0 * math.log10(255.0 ** 2 / mse)


def measure(rates: _Rates, files: list[Path], quality: float, samples: int, seed: int) -> dict:
    net = rates.net
    n_pixels = 0
    sums: dict[str, float] = {"mean_bits": 0.0, "integer_bits": 0.0, "z_bits": 0.0, "mean_mse": 0.0,
                              "integer_mse": 0.0, "grid_return_bits": 0.0, "grid_best_move_bits": 0.0}
    continuous = {s: 0.0 for s in (0.0, *SIGMAS)}
    continuous_y = {s: 0.0 for s in (0.0, *SIGMAS)}
    moved = 0
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    for path in files:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        n_pixels += pixels.shape[0] * pixels.shape[1]
        y, z = ImageEncoder(rates.runtime, Pixels(pixels)).latents(quality)
        z_hat = torch.round(z)
        mean, raw = rates.hyper(z_hat, exact=True)
        z_bits = rates.z_bits(z_hat)
        for lattice in ("mean", "integer"):
            bits, y_hat = rates.y_bits(y, mean, raw, lattice)
            sums[f"{lattice}_bits"] += bits + z_bits
            sums[f"{lattice}_mse"] += _mse(net, y_hat, quality, pixels)
        sums["z_bits"] += z_bits
        if rates.float_hs:  # 2: q = N(h_a(ŷ), σ²), the bits returned are −log₂ q(z) (grid step cancels)
            y_int = torch.round(y)
            q_mean = net.hyper_analysis(y_int)
            y_bits = rates.y_bits(y, *rates.hyper(z_hat, exact=False), "integer")[0]
            continuous[0.0] += y_bits + z_bits
            continuous_y[0.0] += y_bits
            for sigma in SIGMAS:
                z_sample = q_mean + sigma * torch.randn(q_mean.shape, generator=generator)
                log_q = (-0.5 * ((z_sample - q_mean) / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi)))
                returned = float(-log_q.sum()) / math.log(2)  # − log₂ δ, which cancels against p's
                y_bits = rates.y_bits(y, *rates.hyper(z_sample, exact=False), "integer")[0]
                continuous[sigma] += y_bits + rates.z_bits(z_sample) - returned
                continuous_y[sigma] += y_bits
        base = rates.total_exact(y, z_hat)  # 3: single-element moves of ẑ, exact coder rates
        flat = z_hat.reshape(-1)
        chosen = rng.choice(flat.numel(), min(samples, flat.numel()), replace=False)
        grid_return = best_move = 0.0
        for index in chosen:
            gains = [0.0]
            for move in MOVES:
                candidate = flat.clone()
                candidate[index] += move
                gains.append(base - rates.total_exact(y, candidate.view_as(z_hat)))
            g = np.array(gains)
            top = g.max()
            grid_return += float(np.log2(np.exp2(g - top).sum()))
            best_move += float(top)
            moved += int(top > 0)
        scale = flat.numel() / len(chosen)
        sums["grid_return_bits"] += grid_return * scale
        sums["grid_best_move_bits"] += best_move * scale
    count = len(files)
    total = sums["mean_bits"]
    row: dict[str, object] = {
        "quality": quality,
        "bpp_mean_lattice": sums["mean_bits"] / n_pixels, "psnr_mean_lattice": _psnr(sums["mean_mse"] / count),
        "bpp_integer_lattice": sums["integer_bits"] / n_pixels,
        "psnr_integer_lattice": _psnr(sums["integer_mse"] / count),
        "z_share": sums["z_bits"] / total,
        "integer_grid_return_share": sums["grid_return_bits"] / total,
        "integer_grid_best_move_share": sums["grid_best_move_bits"] / total,
        "integer_grid_elements_with_better_move": moved / (count * samples),
    }
    if rates.float_hs:
        reference = continuous[0.0]
        row["continuous_posterior"] = [
            {"sigma": s, "net_bits_vs_integer_z": continuous[s] / reference - 1.0,
             "y_bits_change": (continuous_y[s] - continuous_y[0.0]) / reference,
             "z_net_bits_change": (continuous[s] - continuous_y[s] - continuous[0.0] + continuous_y[0.0]) / reference}
            for s in SIGMAS]
    return row


def greedy_search(rates: _Rates, path: Path, quality: float = 0.0, sweeps: int = 2) -> dict:
    """Part 4: ±1 moves of each element of ẑ on the coder's lattice, kept when the exact cost falls."""
    runtime, net = rates.runtime, rates.net
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    h, w = pixels.shape[:2]
    pixels = pixels[h // 2 - 128:h // 2 + 128, w // 2 - 128:w // 2 + 128].copy()
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255.0
    y = runtime.analyze_raw(x) * net.gains.gain(quality)
    z_hat = torch.round(net.hyper_analysis(y))

    def cost() -> float:
        mean, raw = rates.hyper(z_hat, exact=True)
        return rates.y_bits(y, mean, raw, "mean")[0] + rates.z_bits(z_hat)

    def coded() -> dict:
        latents = runtime.latents.encode(y[0].double().numpy(), z_hat[0].numpy())
        y_hat = torch.from_numpy(latents.y_hat.astype(np.float32))[None]
        return {"payload_bytes": sum(len(s) for s in latents.streams),
                "psnr": _psnr(_mse(net, y_hat, quality, pixels)), "moved": moved,
                "cpu_s": round(time.process_time() - t0)}

    t0, moved = time.process_time(), 0
    steps = [coded()]
    best, flat = cost(), z_hat.view(-1)
    for _ in range(sweeps):
        changed = 0
        for index in range(flat.numel()):
            for move in (-1, 1):
                flat[index] += move
                candidate = cost()
                if candidate < best - 0.01:
                    best, changed = candidate, changed + 1
                    break
                flat[index] -= move
        moved += changed
        steps.append(coded())
        if not changed:
            break
    return {"image": path.name, "crop": "256x256 centre", "quality": quality, "sweeps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "kodak"))
    parser.add_argument("--every", type=int, default=8, help="use every N-th image (sorted by name)")
    parser.add_argument("--qualities", type=float, nargs="+", default=[0.0, 2.0, 6.0])
    parser.add_argument("--samples", type=int, default=40, help="z elements moved per image (part 3)")
    parser.add_argument("--model", default=None, help="codec weights (default: the shipped ones)")
    parser.add_argument("--train-state", default=str(REPO / "codec" / "weights" / "train-state.ncz"),
                        help="float h_s for part 2 (the train-state file exported with the weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--greedy", default=None, metavar="IMAGE", help="part 4 on this image (e.g. kodim05)")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "bits_back.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    runtime = load_codec(args.model)
    rates = _Rates(runtime, args.train_state if Path(args.train_state).is_file() else None)
    files = sorted(Path(args.data).glob("*.png"))[::args.every]
    with torch.no_grad():
        rows = []
        for quality in args.qualities:
            rows.append(measure(rates, files, quality, args.samples, args.seed))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        greedy = greedy_search(rates, Path(args.data) / f"{args.greedy}.png") if args.greedy else None
    result = {"command": " ".join(["python", "bench/bits_back.py", *sys.argv[1:]]), "weights": str(runtime.path),
              "weights_sha256": runtime.weights_hash, "train_state": args.train_state if rates.float_hs else None,
              "images": [p.name for p in files], "seconds": round(time.perf_counter() - start, 1), "levels": rows,
              "greedy_search": greedy}
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
