"""What SGA gains on given weights, cheaply: the fall of the coded objective on 256×256 crops.

A full SGA rate-distortion run (``bench/rd.py --effort fast sga``) costs about half an hour of two
cores; this check costs a few CPU-minutes and tracks how the amortization gap SGA closes changes
as the weights train. For each centre crop and level, the default schedule
(:meth:`~ncz.codec.SGASchedule.default`) refines the latents and the *coded* objective (real
payload bits per pixel + λ·255²·MSE of the 8-bit reconstruction) before and after is recorded;
the fall is reported as a share of the amortized objective (the "coded objective fall against
the amortized latents" of docs/CODEC.md).

    python bench/sga_crops.py [--model W.ncz] [--images kodim03 kodim07 kodim15 kodim23]
                              [--qualities 0 2 4 6] [--threads 1] [--schedule default|paper|paper:N|N]

Writes ``bench/results/sga_crops.json`` and prints one line per crop and level.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ncz.codec import SGASchedule, load_codec, refine_latents
from ncz.format import NczError
from ncz.format import open as open_archive

REPO = Path(__file__).resolve().parent.parent
CROP = 256


def _shown(path: Path | None) -> str:
    if path is None:
        return ""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="weights file (default: the shipped ones)")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "kodak")
    ap.add_argument("--images", nargs="+", default=["kodim03", "kodim07", "kodim15", "kodim23"])
    ap.add_argument("--qualities", nargs="+", type=float, default=[0, 2, 4, 6])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--schedule", default="default",
                    help="default (--effort sga), paper (--effort max: Yang et al.'s 2,000 steps on y and z), "
                         "paper:N (that shape in N steps) or N (the default schedule in N steps)")
    ap.add_argument("--json", type=Path, default=None,
                    help="output (default: bench/results/sga_crops.json, or sga_crops_<schedule>.json for another "
                         "schedule)")
    args = ap.parse_args(argv)
    missing = [name for name in args.images if not (args.data / f"{name}.png").is_file()]
    if missing:
        print(f"sga_crops: {args.data}: no {missing[0]}.png", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        runtime = load_codec(args.model)
        with open_archive(runtime.path) as reader:
            train_steps = int(reader.metadata.get("train_steps", 0) or 0)
    except (NczError, OSError) as exc:
        print(f"sga_crops: {exc}", file=sys.stderr)
        return 1
    kind, _, count = args.schedule.partition(":")
    if args.schedule == "default":
        schedule = SGASchedule.default()
    elif kind == "paper" and (count == "" or (count.isdigit() and int(count) >= 2)):
        schedule = SGASchedule.paper(int(count)) if count else SGASchedule.paper()
    elif args.schedule.isdigit() and int(args.schedule) >= 1:
        schedule = SGASchedule(int(args.schedule))
    else:
        print(f"sga_crops: --schedule must be default, paper, paper:N (N >= 2) or a count >= 1, got {args.schedule!r}",
              file=sys.stderr)
        return 2
    if args.json is None:
        suffix = "" if args.schedule == "default" else "_" + args.schedule.replace(":", "")
        args.json = REPO / "bench" / "results" / f"sga_crops{suffix}.json"
    rows, start = [], time.time()
    for name in args.images:
        rgb = np.asarray(Image.open(args.data / f"{name}.png").convert("RGB"))
        top, left = (rgb.shape[0] - CROP) // 2, (rgb.shape[1] - CROP) // 2
        crop = rgb[top:top + CROP, left:left + CROP]
        x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 255
        for quality in args.qualities:
            began = time.time()
            result = refine_latents(runtime, x, (CROP, CROP), quality, schedule)
            fall = (result.loss_before - result.loss_after) / result.loss_before
            rows.append({"image": name, "quality": quality, "loss_before": result.loss_before,
                         "loss_after": result.loss_after, "fall": fall, "bpp_after": result.bpp,
                         "psnr_after": result.psnr, "steps": result.steps, "seconds": round(time.time() - began, 1)})
            print(f"{name} level {quality:g}: coded objective {result.loss_before:.4f} -> {result.loss_after:.4f} "
                  f"({100 * fall:.2f} % less), {rows[-1]['seconds']} s", flush=True)
    mean_fall = {f"{q:g}": float(np.mean([r["fall"] for r in rows if r["quality"] == q])) for q in args.qualities}
    print("mean fall per level: " + ", ".join(f"{q} {100 * v:.2f} %" for q, v in mean_fall.items()))
    result = {"command": "python bench/sga_crops.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "weights": runtime.weights_hash, "weights_path": _shown(runtime.path), "train_steps": train_steps,
              "crop": CROP, "schedule": args.schedule, "iterations": schedule.iterations,
              "threads": args.threads, "rows": rows, "mean_fall": mean_fall, "seconds": round(time.time() - start, 1)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
