"""Export a training checkpoint as codec weights (an ncz model archive).

    python -m ncz.tools.export_codec runs/codec/latest.pt -o codec/weights/default.ncz \\
        [--calibration ../shared/data/train_images] [--images 8]

Builds the integer hyper-synthesis (activation steps calibrated on training
images — never Kodak), tabulates the factorized prior as integer tables, and
packs everything; prints the file size and the sha256 that images will record.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

from ncz.codec import CodecConfig, export_codec, read_image
from ncz.codec.architectures import build_codec
from ncz.format import NczError


def _calibration(folder: Path, count: int, crop: int = 256) -> list[torch.Tensor]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:count]
    tensors = []
    for path in files:
        rgb = read_image(path).rgb
        if rgb.shape[2] == 1:
            rgb = np.repeat(rgb, 3, axis=2)
        h, w = (rgb.shape[0] // 64) * 64, (rgb.shape[1] // 64) * 64
        top, left = (rgb.shape[0] - h) // 2, (rgb.shape[1] - w) // 2
        x = torch.from_numpy(np.ascontiguousarray(rgb[top:top + h, left:left + w])).permute(2, 0, 1).float()[None] / 255
        tensors.append(x)
    return tensors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ncz.tools.export_codec", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="trainer checkpoint (latest.pt or weights_*.pt)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, default=Path("../shared/data/train_images"))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--train-state", type=Path, default=None,
                        help="also write the float h_s and prior weights (not needed to code images) so a "
                             "later session can continue training with train_codec --init-from")
    parser.add_argument("--raw", action="store_true",
                        help="export the trained weights of a checkpoint, not their moving average")
    args = parser.parse_args(argv)
    try:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        net = build_codec(CodecConfig.from_dict(state["model_config"]))
        # latest.pt keeps the moving average beside the trained weights; snapshots store what ships in "model"
        averaged = state.get("ema") if isinstance(state.get("ema"), dict) and not args.raw else None
        net.load_state_dict(averaged if averaged is not None else state["model"])
        path = export_codec(net.eval(), args.output, _calibration(args.calibration, args.images),
                            step=state.get("step"))
        if args.train_state is not None:
            from ncz.codec.weights import TRAIN_ONLY, WEIGHTS_RECIPE
            from ncz.models import pack

            extra = {k: v for k, v in net.state_dict().items() if k.startswith(TRAIN_ONLY)}
            pack(extra, args.train_state, recipe=WEIGHTS_RECIPE, metadata={"train_steps": int(state.get("step") or 0),
                                                                          "model_id": "train-state"})
    except (NczError, OSError, KeyError, RuntimeError, ValueError) as exc:
        print(f"export_codec: error: {exc}", file=sys.stderr)
        return 1
    data = path.read_bytes()
    kind = "moving average" if averaged is not None or state.get("ema") is True else "trained weights"
    print(f"{path}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}, step {state.get('step')} ({kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
