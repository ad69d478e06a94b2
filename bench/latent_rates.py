"""Where an image's bits go: the hyper-latent share of the payload, and what the context model saves.

Two numbers the codec's roadmap rests on (docs/CODEC.md, "Where the rate-distortion gap comes
from"): bits-back coding can return at most part of the z stream, so its share of the payload
bounds that lever; and a checkerboard context is worth what it takes off the y rate, measured
here as the ideal code length of the coded y under the coder's own means and scales with the
context's Δμ, Δσ against without them (hyperprior only).

    python bench/latent_rates.py --data ../shared/data/kodak [--every 4] [--qualities 0 2 4 6] [--model W.ncz]

Writes ``bench/results/latent_rates.json`` and prints it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ncz.codec import Pixels, load_codec
from ncz.codec.image import ImageEncoder
from ncz.codec.layers import lower_bound
from ncz.codec.networks import gaussian_likelihood
from ncz.codec.refine import _Relaxation

REPO = Path(__file__).resolve().parent.parent


def _y_bits(runtime, y: torch.Tensor, mean: torch.Tensor, raw_scale: torch.Tensor, with_context: bool) -> float:
    """Ideal code length of y rounded as the coder rounds it (τ → 0 relaxation), with or without the context."""
    relax = _Relaxation(runtime, y.shape[2], y.shape[3], torch.device("cpu"))
    if not with_context:
        relax.context = None
    y_hat, mean, raw_scale = relax(y, mean, raw_scale, 1e-4, torch.Generator().manual_seed(0))
    cfg = runtime.config
    likelihood = gaussian_likelihood(y_hat, mean, lower_bound(raw_scale, cfg.scale_bound), cfg.scale_bound,
                                     cfg.likelihood_bound)
    return float(-torch.log2(likelihood).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "kodak"))
    parser.add_argument("--every", type=int, default=4, help="use every N-th image (sorted by name)")
    parser.add_argument("--qualities", type=float, nargs="+", default=[0.0, 2.0, 4.0, 6.0])
    parser.add_argument("--model", default=None, help="codec weights (default: the shipped ones)")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "latent_rates.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    runtime = load_codec(args.model)
    files = sorted(Path(args.data).glob("*.png"))[::args.every]
    rows = []
    for quality in args.qualities:
        z_bytes = payload_bytes = 0
        bits_context = bits_plain = 0.0
        for path in files:
            with Image.open(path) as image:
                encoder = ImageEncoder(runtime, Pixels(np.asarray(image.convert("RGB"))))
            streams = encoder.encode(quality).params["streams"]
            z_bytes += streams[0]
            payload_bytes += sum(streams)
            if runtime.int_context is not None:
                y, z = encoder.latents(quality)
                z_hat = torch.round(z)
                mean, raw_scale = (torch.from_numpy(v).float()
                                   for v in runtime.int_hs(z_hat[0].numpy().astype(np.int64)))
                bits_context += _y_bits(runtime, y, mean, raw_scale, True)
                bits_plain += _y_bits(runtime, y, mean, raw_scale, False)
        rows.append({"quality": quality, "z_share_of_payload": z_bytes / payload_bytes,
                     "context_saving_of_y": None if not bits_plain else 1.0 - bits_context / bits_plain})
    result = {"command": " ".join(["python", "bench/latent_rates.py", *sys.argv[1:]]), "weights": str(runtime.path),
              "weights_sha256": runtime.weights_hash, "images": [p.name for p in files], "levels": rows}
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
