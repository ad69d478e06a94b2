"""Look at the output: ncz beside WebP and AVIF at the same file size, and the original.

For each image: encode with ncz at ``--quality``, then search WebP's and AVIF's quality for the
largest file not over ncz's size, decode all three and write one PNG per image with crops side
by side (original | ncz | WebP | AVIF), each labelled with bytes and PSNR. Crops default to the
image centre and, for images wider or taller than 1024 px, the point where the transforms'
windows meet (1024, 1024), where tiling seams used to show.

    python bench/visual.py IMAGE... [--quality 2] [--crop 256] [--zoom 2] [--out bench/results/visual]
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ncz.codec.train import psnr  # the one PSNR

REPO = Path(__file__).resolve().parent.parent


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return psnr(float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)), peak=255.0)


def _at_most(encode, budget: int, lo: int = 0, hi: int = 100) -> tuple[bytes, int]:
    """The largest quality in lo..hi whose encoding fits ``budget`` bytes (bisection)."""
    best = encode(lo), lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        data = encode(mid)
        if len(data) <= budget:
            best, lo = (data, mid), mid
        else:
            hi = mid - 1
    return best


def _pillow(image: Image.Image, fmt: str, **options):
    def encode(q: int) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, quality=q, **options)
        return buffer.getvalue()
    return encode


def compare(path: Path, quality: float, crop: int, zoom: int, out: Path) -> dict:

    original = Image.open(path).convert("RGB")
    ref = np.asarray(original)
    buffer = io.BytesIO()
    original.save(buffer, format="NCZ", quality=quality)
    ncz_bytes = buffer.getvalue()
    decoded = {"ncz": (np.asarray(Image.open(io.BytesIO(ncz_bytes)).convert("RGB")), len(ncz_bytes))}
    webp, _ = _at_most(_pillow(original, "WEBP", method=6), len(ncz_bytes))
    decoded["webp"] = (np.asarray(Image.open(io.BytesIO(webp)).convert("RGB")), len(webp))
    try:
        import pillow_avif  # noqa: F401  (registers AVIF)
        avif, _ = _at_most(_pillow(original, "AVIF", speed=4), len(ncz_bytes))
        decoded["avif"] = (np.asarray(Image.open(io.BytesIO(avif)).convert("RGB")), len(avif))
    except ImportError:
        pass
    h, w = ref.shape[:2]
    centres = [(h // 2, w // 2)]
    if h > 1024 or w > 1024:
        centres.append((min(1024, h - 1), min(1024, w - 1)))
    rows = []
    for cy, cx in centres:
        top, left = max(0, min(h - crop, cy - crop // 2)), max(0, min(w - crop, cx - crop // 2))
        tiles = [("original", ref, len(Path(path).read_bytes()))] + [(k, v[0], v[1]) for k, v in decoded.items()]
        row = []
        for label, pixels, nbytes in tiles:
            tile = Image.fromarray(pixels[top:top + crop, left:left + crop]).resize((crop * zoom, crop * zoom),
                                                                                   Image.NEAREST)
            text = label if label == "original" else f"{label} {nbytes} B {_psnr(ref, pixels):.2f} dB"
            ImageDraw.Draw(tile).text((4, 4), text, fill=(255, 255, 0))
            row.append(tile)
        rows.append(row)
    sheet = Image.new("RGB", (len(rows[0]) * crop * zoom, len(rows) * crop * zoom))
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            sheet.paste(tile, (c * crop * zoom, r * crop * zoom))
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{path.stem}_q{quality:g}.png"
    sheet.save(target)
    return {"image": path.name, "sheet": str(target), "bytes": {k: v[1] for k, v in decoded.items()},
            "psnr": {k: round(_psnr(ref, v[0]), 3) for k, v in decoded.items()}}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--quality", type=float, default=2.0)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--zoom", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "visual")
    args = parser.parse_args(argv)
    results = [compare(p, args.quality, args.crop, args.zoom, args.out) for p in args.images]
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
