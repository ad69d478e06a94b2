"""BD-rate of candidate codec weights against the shipped ones: the check before shipping weights.

Measure the candidate with ``bench/rd.py`` on all of Kodak at a few levels, then compare its ncz
curve with the shipped weights' curve at the same levels (real file sizes, PSNR per image averaged)::

    python -m ncz.tools.export_codec runs/ctx/latest.pt -o /tmp/w.ncz --train-state /tmp/w-ts.ncz
    python bench/rd.py --model /tmp/w.ncz --codecs ncz --qualities 0 2 4 6 --json /tmp/new.json
    python bench/weights_delta.py /tmp/new.json          # against bench/results/rd_kodak.json

Prints both curves and the BD-rate (negative: the candidate needs fewer bits); exit 1 when the
two runs share fewer than two levels or measured different images.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("candidate", type=Path, help="bench/rd.py JSON of the candidate weights")
    ap.add_argument("--ref", type=Path, default=REPO / "bench" / "results" / "rd_kodak.json",
                    help="bench/rd.py JSON of the reference weights (default: the shipped ones' full run)")
    args = ap.parse_args(argv)
    try:
        runs = [json.loads(p.read_text()) for p in (args.ref, args.candidate)]
        ref, new = (run["codecs"]["ncz"] for run in runs)
    except (OSError, ValueError, KeyError) as exc:
        print(f"weights_delta: cannot read an ncz curve ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    if runs[0].get("image_names") != runs[1].get("image_names"):
        print("weights_delta: the two runs measured different images", file=sys.stderr)
        return 1
    shared = [q for q in new["quality"] if q in ref["quality"]]
    if len(shared) < 2:
        print(f"weights_delta: fewer than two shared levels ({shared})", file=sys.stderr)
        return 1

    def curve(entry: dict) -> tuple[list[float], list[float]]:
        index = [entry["quality"].index(q) for q in shared]
        return [entry["bpp"][i] for i in index], [entry["psnr"][i] for i in index]

    (rb, rp), (nb, npsnr) = curve(ref), curve(new)
    for name, bpp, psnr, run in (("reference", rb, rp, runs[0]), ("candidate", nb, npsnr, runs[1])):
        steps = run.get("model", {}).get("train_steps")
        print(f"{name} (step {steps}): " + ", ".join(f"{b:.4f}/{p:.2f}" for b, p in zip(bpp, psnr)) + " bpp/dB")
    from rd_metrics import bd_rate  # bench/ is the script's own folder, first on sys.path

    bd = bd_rate(rb, rp, nb, npsnr, "pchip")["bd_rate"]
    print(f"BD-rate of the candidate against the reference at levels {', '.join(f'{q:g}' for q in shared)}: "
          f"{bd:+.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
