"""The ``ncz`` command line: a thin layer over the library.

``main(argv) -> int`` parses arguments, calls the library and maps errors to one
line on stderr: exit 1 for bad or corrupt input (any :class:`NczError` or an
OS error on a named file), 2 for usage errors (argparse's convention), 130 on
Ctrl-C. It never shows a traceback to a user.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from typing import Any

from ncz.format import Codec, Kind, NczError, Writer
from ncz.format import open as open_archive

__all__ = ["main", "build_parser"]


def _version() -> str:
    try:
        return importlib_metadata.version("ncz")
    except importlib_metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes_hex": value.hex()} if len(value) <= 64 else {"bytes_len": len(value)}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


# --- commands ---------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    import os

    with open_archive(args.file) as reader:
        file_size = os.path.getsize(args.file)
        rows = []
        for info in reader.sections:
            rows.append(
                {
                    "name": info.name,
                    "kind": info.kind_name,
                    "codec": info.codec_name,
                    "critical": info.critical,
                    "stored_bytes": info.stored_length,
                    "decoded_bytes": info.decoded_length,
                    "ratio": (info.decoded_length / info.stored_length) if info.stored_length else None,
                    "params": _jsonable(dict(info.params)),
                }
            )
        stored = sum(r["stored_bytes"] for r in rows)
        decoded = sum(r["decoded_bytes"] for r in rows)
        summary = {
            "file": args.file,
            "version": f"{reader.version[0]}.{reader.version[1]}",
            "file_bytes": file_size,
            "stored_bytes": stored,
            "decoded_bytes": decoded,
            "overhead_bytes": file_size - stored,
            "metadata": _jsonable(reader.metadata),
            "sections": rows,
        }
    tensors = _model_rows(args.file)
    if tensors is not None:
        numel = sum(t["numel"] for t in tensors)
        summary["tensors"] = tensors
        summary["total"] = {"tensors": len(tensors), "numel": numel,
                            "bits_per_weight": 8 * file_size / max(numel, 1),
                            "max_rel_error": max((t["rel_error"] for t in tensors), default=0.0)}
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    if tensors is not None and not args.sections:
        total = summary["total"]
        print(f"{args.file}: model archive, {len(tensors)} tensors, {total['numel']:,} weights, {_human(file_size)}, "
              f"{total['bits_per_weight']:.2f} bits/weight, max relative error {total['max_rel_error']:.2e}")
        calibration = summary["metadata"].get("calibration")
        if calibration:
            print(f"calibrated on {calibration} ({summary['metadata'].get('calibration_samples', '?')} samples): "
                  "relative errors are of the weights; each layer's output error is what was bounded")
        width = max(len(t["name"]) for t in tensors) if tensors else 4
        print(f"{'tensor':<{width}}  {'representation':<18} {'dtype':<9} {'shape':<16} {'bits/w':>7} {'rel.error':>10}")
        for t in tensors:
            error = "exact" if t["rel_error"] == 0 else f"{t['rel_error']:.2e}"
            print(f"{t['name']:<{width}}  {t['representation']:<18} {t['dtype']:<9} {str(t['shape']):<16} "
                  f"{t['bits_per_weight']:>7.2f} {error:>10}")
        return 0
    print(f"{args.file}: ncz {summary['version']}, {len(rows)} sections, {_human(file_size)}"
          f" ({_human(decoded)} decoded, container overhead {summary['overhead_bytes']} B)")
    if reader.metadata:
        print(f"metadata: {json.dumps(summary['metadata'], sort_keys=True)}")
    width = max([len(r["name"]) for r in rows] + [4])
    print(f"{'name':<{width}}  {'kind':<10} {'codec':<8} {'stored':>10} {'decoded':>10} {'ratio':>7}  params")
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        flag = "" if r["critical"] else " (ancillary)"
        params = json.dumps(r["params"], sort_keys=True) if r["params"] else ""
        print(f"{r['name']:<{width}}  {r['kind']:<10} {r['codec']:<8} {r['stored_bytes']:>10} "
              f"{r['decoded_bytes']:>10} {ratio:>7}  {params}{flag}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    for path in args.files:
        with open_archive(path) as reader:
            reader.verify()
            count = len(reader)
        if not args.quiet:
            print(f"{path}: OK ({count} sections, every checksum and stream verified)")
    return 0


class _Bar:
    """A tqdm bar driven by the library's progress callbacks (quiet when not a TTY)."""

    def __init__(self, desc: str, enabled: bool, unit: str = "tensor"):
        self.desc, self.enabled, self.unit, self.bar = desc, enabled, unit, None

    def __call__(self, done: int, total: int, name: str) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, leave=False)
        self.bar.set_postfix_str(name[-40:], refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_pack(args: argparse.Namespace) -> int:
    from ncz.models import Recipe, pack

    recipe = Recipe.from_toml(args.recipe) if args.recipe else Recipe.preset(args.preset)
    calibration = None
    if args.calibration:
        from ncz.models import Calibration

        calibration = Calibration.load(args.calibration)
    bar = _Bar("pack", not args.quiet and sys.stderr.isatty())
    try:
        report = pack(args.checkpoint, args.output, recipe=recipe, workers=args.workers, progress=bar,
                      calibration=calibration)
    finally:
        bar.close()
    if not args.quiet:
        worst = max((t.rel_error for t in report.tensors), default=0.0)
        print(f"{args.output}: {len(report.tensors)} tensors, {report.numel:,} weights, {_human(report.file_bytes)}, "
              f"{report.bits_per_weight:.2f} bits/weight, recipe {recipe.name}, max relative error {worst:.2e}")
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    from ncz.models import unpack

    bar = _Bar("unpack", not args.quiet and sys.stderr.isatty())
    try:
        count = unpack(args.input, args.output, progress=bar)
    finally:
        bar.close()
    if not args.quiet:
        print(f"{args.output}: {count} tensors restored")
    return 0


def _model_rows(path: str) -> list[dict] | None:
    from ncz.models import describe

    with open_archive(path) as reader:
        if reader.metadata.get("format") != "ncz-model-archive":
            return None
    return [{"name": t.name, "representation": t.representation, "shape": list(t.shape), "dtype": t.dtype,
             "numel": t.numel, "stored_bytes": t.stored_bytes, "bits_per_weight": t.bits_per_weight,
             "rel_error": t.rel_error} for t in describe(path)]


def _read_input(path: str):
    from ncz.codec.imageio import read_image

    if path == "-":
        return read_image(sys.stdin.buffer.read(), name="<stdin>")
    return read_image(path)


def _image_name(path: str, used: set[str]) -> str:
    import os

    base = "image" if path == "-" else os.path.splitext(os.path.basename(path))[0].replace("#", "_") or "image"
    name, k = base, 1
    while name in used:
        k += 1
        name = f"{base}-{k}"
    used.add(name)
    return name


def cmd_encode(args: argparse.Namespace) -> int:
    import io

    from ncz.codec import SGASchedule, choose_quality, encode_pixels, load_codec, write_image_section
    from ncz.format import Writer, atomic_write

    sga = SGASchedule(args.sga) if args.sga else None
    runtime = load_codec(args.model)
    images = [(path, _read_input(path)) for path in args.inputs]
    for path, pixels in images:
        for note in pixels.notes:
            print(f"ncz: note: {path}: {note}", file=sys.stderr)
    total_pixels = sum(pixels.width * pixels.height for _, pixels in images)
    budget = None  # whole-file bytes, like cwebp -size
    if args.size is not None:
        budget = args.size
    elif args.bpp is not None:
        budget = args.bpp * total_pixels / 8

    def share(pixels, payload_bits: float) -> float:
        """An image's pixel share of ``payload_bits``."""
        return payload_bits * pixels.width * pixels.height / total_pixels

    def qualities_for(payload_bits: float | None) -> list[float]:
        """Per image: the fixed quality, or the highest that fits its share of ``payload_bits``."""
        if payload_bits is None:
            fixed = (runtime.config.num_levels - 1) / 2 if args.quality is None else args.quality
            return [fixed] * len(images)
        return [choose_quality(runtime, pixels, share(pixels, payload_bits)) for _, pixels in images]

    def build(qualities: list[float], refine: bool = False, payload_bits: float | None = None) -> tuple[bytes, int]:
        """The archive, and the bytes of its image payloads. With ``refine``, SGA latents replace the
        plain ones where they fit the image's share of ``payload_bits`` (SGA may trade rate for distortion)."""
        buffer, used, payload_bytes = io.BytesIO(), set(), 0
        with Writer(buffer, metadata={"format": "ncz-images", "images": len(images)}) as writer:
            for (path, pixels), quality in zip(images, qualities):
                encoded = None
                if refine:
                    bar = _Bar(f"SGA {path}", sys.stderr.isatty(), unit="it")
                    try:
                        encoded = encode_pixels(runtime, pixels, quality, lambda d, t: bar(d, t, ""), sga=sga)
                    finally:
                        bar.close()
                    if payload_bits is not None and 8 * len(encoded[1]) > share(pixels, payload_bits):
                        encoded = None  # refined latents may trade rate for distortion: keep the size promise
                if encoded is None:
                    encoded = encode_pixels(runtime, pixels, quality)
                payload_bytes += len(encoded[1])
                write_image_section(writer, _image_name(path, used), runtime, pixels, quality, encoded=encoded)
        return buffer.getvalue(), payload_bytes

    # Rate control runs on the plain encoder; SGA (slow) runs once, at the qualities chosen.
    payload_bits = None if budget is None else 8 * budget
    qualities = qualities_for(payload_bits)
    data, payload_bytes = build(qualities)
    if budget is not None and len(data) > budget:  # the container's own bytes come out of the budget too
        payload_bits = max(8 * (budget - (len(data) - payload_bytes)), 0.0)
        qualities = qualities_for(payload_bits)
        data, _ = build(qualities)
    if sga is not None:
        refined, _ = build(qualities, refine=True, payload_bits=payload_bits)
        if budget is None or len(refined) <= budget or len(refined) <= len(data):
            data = refined
    if args.output == "-":
        sys.stdout.buffer.write(data)
    else:
        atomic_write(args.output, lambda handle: handle.write(data))
    if args.verbose:
        print(f"ncz: {args.output}: {len(images)} image(s), {len(data)} bytes, {8 * len(data) / total_pixels:.4f} bpp "
              f"(whole file)", file=sys.stderr)
    if budget is not None and len(data) > budget:
        print(f"ncz: note: {args.output}: {len(data)} bytes is over the target {budget:.0f}: "
              "the lowest quality does not fit", file=sys.stderr)
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from ncz.codec import decode_section, load_codec
    from ncz.codec.imageio import format_for, write_image
    from ncz.format import InputError, Kind, open_bytes
    from ncz.format import atomic_write

    reader = open_bytes(sys.stdin.buffer.read(), name="<stdin>") if args.input == "-" else open_archive(args.input)
    with reader:
        names = [s.name for s in reader.sections if s.kind == Kind.IMAGE]
        if not names:
            raise InputError(f"{reader.name}: holds no image sections")
        runtime = load_codec(args.model)
        if len(names) == 1 and not os.path.isdir(args.output):
            pixels = decode_section(reader, names[0], runtime)
            if args.output == "-":
                write_image(pixels, sys.stdout.buffer, fmt="PNG")
            else:
                fmt = format_for(args.output)
                atomic_write(Path(args.output), lambda h: write_image(pixels, h, fmt=fmt))
        else:
            folder = Path(args.output)
            folder.mkdir(parents=True, exist_ok=True)
            fmt = format_for(f"x.{args.format}")
            for name in names:
                pixels = decode_section(reader, name, runtime)
                atomic_write(folder / f"{name}.{args.format}", lambda h: write_image(pixels, h, fmt=fmt))
    if args.verbose:
        print(f"ncz: decoded {len(names)} image(s) to {args.output}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Write a small archive exercising every section codec (until images/models exist)."""
    import numpy as np

    rng = np.random.default_rng(0)
    weights = rng.standard_normal((64, 32)).astype(np.float32)
    ramp = np.arange(4096, dtype=np.int32) // 7
    with Writer(args.output, metadata={"created_by": "ncz demo", "description": "demo archive"}) as writer:
        writer.add("notes", b"ncz demo archive\n", kind=Kind.BLOB, codec=Codec.RAW)
        writer.add("weights", weights.tobytes(), kind=Kind.TENSOR, codec=Codec.RAW,
                   params={"dtype": "float32", "shape": list(weights.shape)})
        writer.add("ramp", ramp.tobytes(), kind=Kind.TENSOR, codec=Codec.ZSTD,
                   params={"dtype": "int32", "shape": list(ramp.shape)}, options={"level": 19})
    if not args.quiet:
        print(f"wrote {args.output}")
    return 0


# --- parser -----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ncz",
        description="ncz: one container and toolchain for neural compression (images, model weights, gradients).",
    )
    parser.add_argument("--version", action="version", version=f"ncz {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="list the sections of an archive")
    p.add_argument("file", help=".ncz file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--sections", action="store_true", help="list raw sections even for model archives")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("pack", help="compress a checkpoint (state_dict, safetensors, HF folder) into a model archive")
    p.add_argument("checkpoint", help="checkpoint file or Hugging Face model folder")
    p.add_argument("-o", "--output", required=True, help="output .ncz")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--preset", default="lossless", help="lossless | q8 | q4 | small (default: lossless)")
    group.add_argument("--recipe", help="TOML recipe mapping tensor-name patterns to representations")
    p.add_argument("--calibration", help="calibration file from ncz.models.calibrate(): quantized tensors meet "
                                          "the recipe's output error with fewer bits (GPTQ, frequency-weighted rows)")
    p.add_argument("--workers", type=int, default=2, help="encoder threads (default 2)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("unpack", help="restore dense tensors from a model archive")
    p.add_argument("input", help="model archive .ncz")
    p.add_argument("-o", "--output", required=True, help="OUT.safetensors or OUT.pt")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_unpack)

    p = sub.add_parser("verify", help="check every checksum and decode every stream; exit 0 when sound")
    p.add_argument("files", nargs="+", metavar="FILE", help=".ncz files")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("encode", help="compress images with the learned codec")
    p.add_argument("inputs", nargs="+", metavar="IN", help="PNG, JPEG, PPM/PGM, BMP, WebP, TIFF; - for stdin")
    p.add_argument("-o", "--output", required=True, help="output .ncz (- for stdout)")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--quality", type=float, default=None,
                      help="0 (smallest) .. top level of the model; fractional values interpolate "
                           "(default: the middle of the range, 3.5 for the shipped 8-level weights)")
    rate.add_argument("--bpp", type=float, help="target bits per pixel of the whole file (searches the quality)")
    rate.add_argument("--size", type=int, help="target size of the whole file in bytes (searches the quality)")
    p.add_argument("--model", help="codec weights (.ncz); default: the shipped weights")
    p.add_argument("--sga", type=int, default=0, metavar="N",
                   help="refine the latents with N iterations of stochastic Gumbel annealing (Yang et al. 2020): "
                        "about 5 %% fewer bits at 100 iterations, which take 20-30 s for a 768x512 image on 2 cores "
                        "(default 0: off)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the real bpp from the file size")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="decompress images from an .ncz")
    p.add_argument("input", help="input .ncz (- for stdin)")
    p.add_argument("-o", "--output", required=True, help="OUT.png/.jpg/.ppm/.bmp/.webp, a folder for several images, - for stdout (PNG)")
    p.add_argument("--format", default="png", choices=["png", "ppm", "bmp", "webp", "jpg"], help="format of files written into a folder")
    p.add_argument("--model", help="codec weights (.ncz); default: the shipped weights")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("demo", help="write a small demo archive")
    p.add_argument("-o", "--output", required=True, help="output .ncz path")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except NczError as exc:
        print(f"ncz: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader of our output left (`ncz info x | head`): not an error to report
        sys.stdout = open(os.devnull, "w")  # the interpreter's final flush must not hit the closed pipe
        return 141  # 128 + SIGPIPE, as shell tools exit
    except OSError as exc:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"ncz: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ncz: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
