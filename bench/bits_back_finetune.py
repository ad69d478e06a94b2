"""Does bits-back pay once the hyper-networks are trained for it? (issue 15)

``bench/bits_back.py`` measured that bits-back coding of z loses with the shipped weights, and named
the cause it could not rule out: h_s was trained on *rounded* z only (mixed quantization), so a z
sampled from a posterior raises the y rate. This script removes that cause and measures again.

With g_a and g_s frozen (so the distortion is fixed), h_a, h_s, the z prior and the checkerboard
context are fine-tuned on the bits-back objective itself: on the z-independent lattice ŷ = round(y)
(which bits-back needs, see bench/bits_back.py) and a posterior q(z | ŷ) = U(h_a(ŷ) ± w/2) with a
learned width w per channel, the net cost of an image is the negative ELBO

    E_q[ −log₂ p(z) − log₂ p(ŷ | z) + log₂ q(z | ŷ) ]      (p(z): the prior's density, unit bins)

which is what a bits-back coder pays up to the fine grid's rounding (Yang, Bamler & Mandt 2020, §3.3;
Townsend et al. 2019). It is compared on Kodak with today's deterministic coding
(−log₂ P(ẑ) − log₂ p(ŷ | ẑ), ẑ = round(h_a(y)), ŷ around the means) of the same float networks, per
level, with the rate split into y bits, z bits and bits returned. Ideal code lengths throughout
(the coder's tables match them to < 0.1 %); the bits-back side is averaged over ``--samples`` draws.

    python bench/bits_back_finetune.py [--steps 4000] [--crops 1600] [--lr 2e-4] [--every 3] [--threads 1]

Writes ``bench/results/bits_back_finetune.json`` (and prints each line as it goes).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ncz.codec.context import CheckerboardCodec
from ncz.codec.networks import CodecConfig
from ncz.codec.train import load_image_folder
from ncz.codec.weights import float_state
from ncz.format import open as open_archive

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO / "codec" / "weights"
LEVELS = (0, 2, 4, 6)


def load_float_model(weights: Path, train_state: Path) -> tuple[CheckerboardCodec, int]:
    """The shipped networks in float (g_a, g_s, h_a, gains from ``weights``; float h_s, context and
    prior from ``train_state``), as ``train_codec --init-from`` loads them."""
    with open_archive(weights) as reader:
        config = CodecConfig.from_dict(reader.metadata["codec"])
    net = CheckerboardCodec(config)
    state, step = float_state(weights, train_state)
    net.load_state_dict(state)
    return net.eval().requires_grad_(False), step


def deterministic_bits(net: CheckerboardCodec, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Today's coding: (y bits, z bits, ŷ) per image."""
    z_hat = torch.round(net.hyper_analysis(y))
    z_bits = -torch.log2(net.z_likelihood(z_hat)).sum((1, 2, 3))
    mean, raw = net.hyper_params(z_hat)
    anchors_hat = torch.round(y - mean) + mean
    mean, raw = net.context_params(anchors_hat, mean, raw)
    y_hat = torch.round(y - mean) + mean
    y_bits = -torch.log2(net.y_likelihood(y_hat, mean, raw)).sum((1, 2, 3))
    return y_bits, z_bits, y_hat


def bits_back_bits(net: CheckerboardCodec, log_width: torch.Tensor, y_hat: torch.Tensor,
                   samples: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y bits, z bits, bits returned) per image on the integer lattice, averaged over ``samples`` z ~ q."""
    centre = net.hyper_analysis(y_hat)
    width = torch.exp(log_width)[None, :, None, None].expand_as(centre)
    y_bits = z_bits = 0.0
    for _ in range(samples):
        z = centre + (torch.rand_like(centre) - 0.5) * width
        z_bits = z_bits + -torch.log2(net.z_likelihood(z)).sum((1, 2, 3))
        mean, raw = net.hyper_params(z)
        mean, raw = net.context_params(y_hat, mean, raw)
        y_bits = y_bits + -torch.log2(net.y_likelihood(y_hat, mean, raw)).sum((1, 2, 3))
    returned = torch.log2(width).sum((1, 2, 3))  # −log₂ q = log₂ w per element
    return y_bits / samples, z_bits / samples, returned


def crops_of_training_photos(net: CheckerboardCodec, data: Path, count: int, seed: int) -> torch.Tensor:
    """y = g_a(x)·gain(level) of ``count`` (rounded up to a multiple of 8) random 256×256 crops at random
    levels; g_a is frozen, so it runs once, under bf16 autocast as in training (the Kodak comparison runs
    in float32)."""
    images = load_image_folder(data, min_size=256)
    g = torch.Generator().manual_seed(seed)
    out = []
    net.autocast_dtype = torch.bfloat16
    with torch.no_grad():
        for _ in range(0, count, 8):
            xs, qs = [], []
            for _ in range(8):
                im = images[int(torch.randint(len(images), (1,), generator=g))]
                top = int(torch.randint(im.shape[1] - 255, (1,), generator=g))
                left = int(torch.randint(im.shape[2] - 255, (1,), generator=g))
                xs.append(im[:, top:top + 256, left:left + 256])
                qs.append(float(torch.randint(net.num_levels, (1,), generator=g)))
            out.append(net.analysis(torch.stack(xs).float() / 255, torch.tensor(qs)).float())
    net.autocast_dtype = None
    return torch.cat(out)


def add_finetune_arguments(ap: argparse.ArgumentParser, *, steps: int, crops: int, lr: float) -> None:
    """The options of a fine-tuning experiment on frozen shipped weights (shared with bench/smooth_hs.py)."""
    ap.add_argument("--weights", type=Path, default=WEIGHTS / "default.ncz")
    ap.add_argument("--train-state", type=Path, default=WEIGHTS / "train-state.ncz")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "train_images")
    ap.add_argument("--kodak", type=Path, default=REPO.parent / "shared" / "data" / "kodak")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--crops", type=int, default=crops)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--every", type=int, default=3, help="every n-th Kodak image")
    ap.add_argument("--threads", type=int, default=1)


def load_finetune_inputs(args: argparse.Namespace, prog: str) -> tuple[CheckerboardCodec, int, torch.Tensor] | None:
    """(frozen shipped float model, its step, y of the training crops) for the options of
    :func:`add_finetune_arguments`; None (after a message) when the data is missing."""
    if not args.data.is_dir() or not args.kodak.is_dir():
        print(f"{prog}: needs {args.data} and {args.kodak}", file=sys.stderr)
        return None
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.time()
    base, step = load_float_model(args.weights, args.train_state)
    ys = crops_of_training_photos(base, args.data, args.crops, seed=1)
    print(f"{len(ys)} crops analysed ({time.time() - start:.0f} s)", flush=True)
    return base, step, ys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_finetune_arguments(ap, steps=4000, crops=1600, lr=2e-4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "bits_back_finetune.json")
    args = ap.parse_args(argv)
    start = time.time()
    setup = load_finetune_inputs(args, "bits_back_finetune")
    if setup is None:
        return 2
    base, step, ys = setup

    net = copy.deepcopy(base)
    trained = [p for m in (net.h_a, net.h_s, net.entropy_bottleneck, net.context_model) for p in m.parameters()]
    for p in trained:
        p.requires_grad_(True)
    log_width = torch.zeros(base.config.N, requires_grad=True)
    opt = torch.optim.Adam([{"params": trained, "lr": args.lr}, {"params": [log_width], "lr": 1e-2}])
    curve, window = [], []
    for i in range(args.steps):
        lr = args.lr * (0.1 if i >= 0.8 * args.steps else 1.0)
        opt.param_groups[0]["lr"] = lr
        y_hat = torch.round(ys[torch.randint(len(ys), (args.batch,))])
        y_bits, z_bits, returned = bits_back_bits(net, log_width, y_hat)
        loss = (y_bits + z_bits - returned).mean() / (256 * 256)
        opt.zero_grad()
        loss.backward()
        opt.step()
        window.append(float(loss.detach()))
        if (i + 1) % 250 == 0:
            curve.append({"step": i + 1, "bpp": float(np.mean(window)), "mean_width": float(log_width.exp().mean())})
            window = []
            print(f"step {i + 1}: net bpp {curve[-1]['bpp']:.4f} (mean of 250 batches), "
                  f"mean width {curve[-1]['mean_width']:.3f} ({time.time() - start:.0f} s)", flush=True)
    net.eval()

    names = sorted(args.kodak.glob("*.png"))[::args.every]
    levels = {}
    with torch.no_grad():
        for level in LEVELS:
            rows = []
            for path in names:
                x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
                pixels = x.shape[2] * x.shape[3]
                y = base.analysis(x, float(level))
                y0, z0, y_hat0 = deterministic_bits(base, y)
                y_hat1 = torch.round(y)
                y1, z1, back = bits_back_bits(net, log_width, y_hat1, args.samples)
                mse0 = F.mse_loss(base.synthesis(y_hat0, float(level)).clamp(0, 1), x).item()
                mse1 = F.mse_loss(base.synthesis(y_hat1, float(level)).clamp(0, 1), x).item()
                rows.append([float(y0) / pixels, float(z0) / pixels, -10 * math.log10(mse0),
                             float(y1) / pixels, float(z1) / pixels, float(back) / pixels, -10 * math.log10(mse1)])
            acc = np.mean(rows, axis=0)
            today, bits_back = acc[0] + acc[1], acc[3] + acc[4] - acc[5]
            levels[str(level)] = {
                "today": {"bpp": today, "y_bpp": acc[0], "z_bpp": acc[1], "psnr": acc[2]},
                "bits_back": {"bpp": bits_back, "y_bpp": acc[3], "z_bpp": acc[4], "returned_bpp": acc[5],
                              "psnr": acc[6]},
                "rate_change": bits_back / today - 1}
            print(f"level {level}: today {today:.4f} bpp (z {acc[1]:.4f}) {acc[2]:.2f} dB | bits-back "
                  f"{bits_back:.4f} bpp (y {acc[3]:.4f}, z {acc[4]:.4f}, returned {acc[5]:.4f}) {acc[6]:.2f} dB: "
                  f"{100 * (bits_back / today - 1):+.2f} %", flush=True)
    result = {
        "command": "python bench/bits_back_finetune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "weights": str(args.weights.relative_to(REPO)) if args.weights.is_relative_to(REPO) else str(args.weights),
        "weights_step": step, "images": [p.name for p in names], "steps": args.steps, "crops": args.crops,
        "lr": args.lr, "samples": args.samples, "curve": curve, "levels": levels,
        "seconds": round(time.time() - start, 1)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
