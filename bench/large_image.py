"""Peak memory and time to encode and decode a large photo (issue: 4000x3000 within 2 GiB).

The image is a Kodak photo resized (Lanczos) to ``--size`` (default 4000x3000), so it has
photographic content in every window of the transforms. Encode and decode each run through the
CLI in a fresh process, which reports its own peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss``, Linux: KiB) including torch, the weights and every
buffer. Prints JSON and writes ``bench/results/large_image.json``.

Usage::

    python bench/large_image.py [--data ../shared/data/kodak] [--size 4000x3000] [--quality 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def _run(args: list[str], threads: int) -> dict[str, float]:
    """Wall seconds and the child's own peak RSS (GiB) of ``ncz ARGS``."""
    start = time.perf_counter()
    code = (f"import sys,torch,resource;torch.set_num_threads({threads});"
            "from ncz.tools.cli import main;rc=main(sys.argv[1:]);"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss);sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "peak_rss_GiB": int(done.stdout.split()[-1]) / 2**20}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "kodak")
    parser.add_argument("--image", default="kodim23.png")
    parser.add_argument("--size", default="4000x3000")
    parser.add_argument("--quality", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "large_image.json")
    args = parser.parse_args(argv)
    from PIL import Image

    width, height = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "large.png"
        Image.open(args.data / args.image).convert("RGB").resize((width, height), Image.LANCZOS).save(src)
        enc = _run(["encode", str(src), "-o", str(Path(tmp) / "large.ncz"), "--quality", str(args.quality)],
                   args.threads)
        size = os.path.getsize(Path(tmp) / "large.ncz")
        dec = _run(["decode", str(Path(tmp) / "large.ncz"), "-o", str(Path(tmp) / "out.png")], args.threads)
        with Image.open(Path(tmp) / "out.png") as decoded:
            assert decoded.size == (width, height)
    result = {"image": f"{args.image} resized to {width}x{height}", "quality": args.quality,
              "threads": args.threads, "bytes": size, "bpp": 8 * size / (width * height),
              "encode": enc, "decode": dec, "limit_GiB": 2.0,
              "met": enc["peak_rss_GiB"] <= 2.0 and dec["peak_rss_GiB"] <= 2.0,
              "note": "peak RSS of each process on its own (RUSAGE_SELF)"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
