"""Does `--effort max` gain more once h_s is smooth between the integers? (issue 15)

The paper's schedule (`SGASchedule.paper()`) relaxes z as well as y, so during the annealing h_s
sees z off the integers. The paper's base model was trained with uniform noise on z; ours saw
rounded z only (mixed quantization), and bench/bits_back.py measured that its y rate rises 9 % at
level 0 when z is perturbed: the gradients the relaxed z gets may point nowhere useful. This script
tests that diagnosis cheaply. With everything else frozen, h_s alone is fine-tuned on the training
rate of y given *both* the rounded z (what the coder uses, so `fast` should not lose) and z plus
uniform noise (what the relaxation feeds it):

    loss = bits(y + U | h_s(round z), context) + w · bits(y + U | h_s(z + U), context)

on the y = g_a(x) of random training-photo crops at random levels (g_a is frozen, so y and z are
computed once). It reports on Kodak (every ``--every``-th image, levels 0/2/4/6, ideal code lengths,
float networks) what the fine-tuned h_s costs `fast` (y bits and PSNR at the integer z) and how much
smoother it is (y bits at z + U), and writes the fine-tuned networks as a weights file (``--out``)
for ``bench/sga_crops.py --model OUT --schedule paper`` to compare with the shipped weights.

    python bench/smooth_hs.py [--steps 1500] [--crops 800] [--lr 3e-5] [--noisy-weight 1] [--out /tmp/smooth.ncz]

Writes ``bench/results/smooth_hs.json`` (and prints each line as it goes).
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
from bits_back_finetune import add_finetune_arguments, deterministic_bits, load_finetune_inputs
from PIL import Image

from ncz.codec import export_codec
from ncz.codec.context import CheckerboardCodec
from ncz.codec.layers import ste_round
from ncz.tools.export_codec import _calibration

REPO = Path(__file__).resolve().parent.parent
LEVELS = (0, 2, 4, 6)


def y_bits(net: CheckerboardCodec, y: torch.Tensor, z_in: torch.Tensor, *, noisy_rate: bool) -> torch.Tensor:
    """Bits of y per image given h_s's input ``z_in``: the training rate (y + U) or, with
    ``noisy_rate=False``, the ideal code length of the coded ŷ (around the context's means)."""
    mean, raw = net.hyper_params(z_in)
    anchors_hat = ste_round(y - mean) + mean
    mean, raw = net.context_params(anchors_hat, mean, raw)
    target = y + torch.empty_like(y).uniform_(-0.5, 0.5) if noisy_rate else torch.round(y - mean) + mean
    return -torch.log2(net.y_likelihood(target, mean, raw)).sum((1, 2, 3))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_finetune_arguments(ap, steps=1500, crops=800, lr=3e-5)
    ap.add_argument("--noisy-weight", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/smooth.ncz"))
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "smooth_hs.json")
    args = ap.parse_args(argv)
    start = time.time()
    setup = load_finetune_inputs(args, "smooth_hs")
    if setup is None:
        return 2
    base, step, ys = setup
    with torch.no_grad():
        zs = base.hyper_analysis(ys)

    net = copy.deepcopy(base)
    for p in net.h_s.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(net.h_s.parameters(), lr=args.lr)
    curve, window = [], []
    pixels = 256 * 256
    for i in range(args.steps):
        opt.param_groups[0]["lr"] = args.lr * (0.1 if i >= 0.8 * args.steps else 1.0)
        pick = torch.randint(len(ys), (args.batch,))
        y, z = ys[pick], zs[pick]
        at_integers = y_bits(net, y, torch.round(z), noisy_rate=True).mean() / pixels
        off_integers = y_bits(net, y, z + torch.empty_like(z).uniform_(-0.5, 0.5), noisy_rate=True).mean() / pixels
        loss = at_integers + args.noisy_weight * off_integers
        opt.zero_grad()
        loss.backward()
        opt.step()
        window.append((at_integers.item(), off_integers.item()))
        if (i + 1) % 250 == 0:
            a, b = np.mean(window, axis=0)
            curve.append({"step": i + 1, "y_bpp_integer_z": float(a), "y_bpp_noisy_z": float(b)})
            window = []
            print(f"step {i + 1}: y bpp at integer z {a:.4f}, at z + U {b:.4f} ({time.time() - start:.0f} s)",
                  flush=True)
    net.eval().requires_grad_(False)

    names = sorted(args.kodak.glob("*.png"))[::args.every]
    levels = {}
    torch.manual_seed(1)
    with torch.no_grad():
        for level in LEVELS:
            rows = []
            for path in names:
                x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
                n = x.shape[2] * x.shape[3]
                y = base.analysis(x, float(level))
                z_hat = torch.round(base.hyper_analysis(y))
                z_noisy = z_hat + torch.empty_like(z_hat).uniform_(-0.5, 0.5)
                row = []
                for model in (base, net):  # h_a is frozen, so both code the same ẑ
                    bits, _, y_hat = deterministic_bits(model, y)
                    mse = F.mse_loss(base.synthesis(y_hat, float(level)).clamp(0, 1), x).item()
                    row += [float(bits) / n, -10 * math.log10(mse),
                            float(y_bits(model, y, z_noisy, noisy_rate=False)) / n]
                rows.append(row)
            acc = np.mean(rows, axis=0)
            levels[str(level)] = {
                "shipped": {"y_bpp": acc[0], "psnr": acc[1], "y_bpp_noisy_z": acc[2]},
                "smooth": {"y_bpp": acc[3], "psnr": acc[4], "y_bpp_noisy_z": acc[5]}}
            print(f"level {level}: y bpp at integer z {acc[0]:.4f} -> {acc[3]:.4f} "
                  f"({100 * (acc[3] / acc[0] - 1):+.2f} %), "
                  f"PSNR {acc[1]:.2f} -> {acc[4]:.2f} dB; y bpp at z + U {acc[2]:.4f} -> {acc[5]:.4f} "
                  f"(+{100 * (acc[2] / acc[0] - 1):.1f} % -> +{100 * (acc[5] / acc[3] - 1):.1f} % over integer z)",
                  flush=True)
    export_codec(net, args.out, _calibration(args.data, 8), step=step)
    result = {
        "command": "python bench/smooth_hs.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "weights_step": step, "images": [p.name for p in names], "steps": args.steps, "crops": args.crops,
        "lr": args.lr, "noisy_weight": args.noisy_weight, "curve": curve, "levels": levels,
        "out": str(args.out), "seconds": round(time.time() - start, 1)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
