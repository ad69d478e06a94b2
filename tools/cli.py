"""The ``ncz`` command line: a thin layer over the library.

``main(argv) -> int`` parses arguments, calls the library and maps errors to one
line on stderr: exit 1 for bad or corrupt input (any :class:`NczError` or an
OS error on a named file), 2 for usage errors (argparse's convention), 130 on
Ctrl-C. It never shows a traceback to a user.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from typing import Any

from ncz.format import Codec, InputError, Kind, NczError, Writer
from ncz.format import open as open_archive

__all__ = ["main", "build_parser"]


class _Usage(Exception):
    """Arguments that cannot work with this input: one line, exit 2 like argparse's own."""


def _printable(text: str) -> str:
    """``text`` with control characters and terminal escapes shown as Python escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _listing(names: list[str], shown: int = 5) -> str:
    listed = ", ".join(repr(_printable(n)) for n in names[:shown])
    return listed + (f", ... ({len(names)} in all)" if len(names) > shown else "")


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
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf", "-inf": JSON has no such numbers (Python's Infinity is invalid JSON)
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
        print(json.dumps(_jsonable(summary), indent=2, sort_keys=True, allow_nan=False))
        return 0
    if tensors is not None and not args.sections:
        total = summary["total"]
        print(f"{args.file}: model archive, {len(tensors)} tensors, {total['numel']:,} weights, {_human(file_size)}, "
              f"{total['bits_per_weight']:.2f} bits/weight, max relative error {total['max_rel_error']:.2e}")
        calibration = summary["metadata"].get("calibration")
        if calibration:
            print(f"calibrated on {_printable(str(calibration))} "
                  f"({_printable(str(summary['metadata'].get('calibration_samples', '?')))} samples): "
                  "relative errors are of the weights; each layer's output error is what was bounded")
        shown = [_printable(t["name"]) for t in tensors]  # names are data: no terminal escapes
        width = max(map(len, shown), default=4)
        print(f"{'tensor':<{width}}  {'representation':<18} {'dtype':<9} {'shape':<16} {'bits/w':>7} {'rel.error':>10}")
        for t, name in zip(tensors, shown):
            error = "exact" if t["rel_error"] == 0 else f"{t['rel_error']:.2e}"
            print(f"{name:<{width}}  {t['representation']:<18} {t['dtype']:<9} {str(t['shape']):<16} "
                  f"{t['bits_per_weight']:>7.2f} {error:>10}")
        return 0
    print(f"{args.file}: ncz {summary['version']}, {len(rows)} sections, {_human(file_size)}"
          f" ({_human(decoded)} decoded, container overhead {summary['overhead_bytes']} B)")
    if reader.metadata:
        print(f"metadata: {json.dumps(summary['metadata'], sort_keys=True, allow_nan=False)}")
    shown = [_printable(r["name"]) for r in rows]  # names are data: no terminal escapes
    width = max([len(n) for n in shown] + [4])
    print(f"{'name':<{width}}  {'kind':<10} {'codec':<8} {'stored':>10} {'decoded':>10} {'ratio':>7}  params")
    for r, name in zip(rows, shown):
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        flag = "" if r["critical"] else " (ancillary)"
        params = json.dumps(_jsonable(r["params"]), sort_keys=True) if r["params"] else ""
        print(f"{name:<{width}}  {r['kind']:<10} {r['codec']:<8} {r['stored_bytes']:>10} "
              f"{r['decoded_bytes']:>10} {ratio:>7}  {params}{flag}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    for path in args.files:
        with open_archive(path) as reader:
            reader.verify()
            count = len(reader)
            images = [s.name for s in reader.sections if s.kind == Kind.IMAGE]
            if images:  # the latents' streams too: entropy-decoded, no pixels synthesized
                from ncz.codec import load_codec, verify_section

                runtime = load_codec(args.model)
                for name in images:
                    verify_section(reader, name, runtime)
        if not args.quiet:
            what = f", {len(images)} image(s) entropy-decoded" if images else ""
            print(f"{path}: OK ({count} sections, every checksum and stream verified{what})")
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

    if args.workers < 1:
        raise _Usage(f"--workers must be >= 1, got {args.workers}")
    recipe = Recipe.from_toml(args.recipe) if args.recipe else Recipe.preset(args.preset)
    if args.fast_decode:
        recipe = recipe.with_fast_decode()
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
    for note in report.notes:
        print(f"ncz: note: {note}", file=sys.stderr)
    if not args.quiet:
        worst = max((t.rel_error for t in report.tensors), default=0.0)
        print(f"{args.output}: {len(report.tensors)} tensors, {report.numel:,} weights, {_human(report.file_bytes)}, "
              f"{report.bits_per_weight:.2f} bits/weight, recipe {recipe.name}, max relative error {worst:.2e}")
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    from ncz.models import unpack

    if args.workers < 1:
        raise _Usage(f"--workers must be >= 1, got {args.workers}")
    bar = _Bar("unpack", not args.quiet and sys.stderr.isatty())
    try:
        count = unpack(args.input, args.output, progress=bar, workers=args.workers)
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


def _sga_schedule(args: argparse.Namespace):
    """The SGA schedule the flags ask for: ``--effort sga`` the default, ``max`` the paper's; ``--sga N``
    stretches either to N iterations (``sga`` when no effort is given); a time budget alone means the
    default schedule cut to that time. None: the amortized encoder (``fast``)."""
    from ncz.codec import SGASchedule

    if args.sga < 0:
        raise _Usage(f"--sga must be >= 0, got {args.sga}")
    if args.time_budget is not None and not (args.time_budget > 0 and math.isfinite(args.time_budget)):
        raise _Usage(f"--time-budget must be a positive number of seconds, got {args.time_budget}")
    if args.sga:
        if args.effort == "max" and args.sga < 2:
            raise _Usage(f"--effort max needs --sga >= 2 (its temperature decays over the iterations), got {args.sga}")
        schedule = SGASchedule.paper(args.sga) if args.effort == "max" else SGASchedule(args.sga)
    elif args.effort == "max":
        schedule = SGASchedule.paper()
    elif args.effort == "sga" or (args.effort is None and args.time_budget is not None):
        schedule = SGASchedule.default()
    elif args.time_budget is not None:
        raise _Usage("--time-budget limits SGA: it needs --effort sga or --sga N, not --effort fast")
    else:
        return None
    return schedule if args.time_budget is None else dataclasses.replace(schedule, time_budget=args.time_budget)


def cmd_encode(args: argparse.Namespace) -> int:
    from ncz.codec import encode_images, load_codec
    from ncz.format import atomic_write

    if (args.bpp is not None and not args.bpp > 0) or (args.size is not None and args.size <= 0):
        raise _Usage("--bpp and --size must be > 0")
    sga = _sga_schedule(args)
    runtime = load_codec(args.model)
    top = runtime.config.num_levels - 1
    if args.quality is not None and not 0 <= args.quality <= top:  # NaN fails too
        raise _Usage(f"--quality must be in 0..{top} for these weights, got {args.quality}")
    images = [(path, _read_input(path)) for path in args.inputs]
    for path, pixels in images:
        for note in pixels.notes:
            print(f"ncz: note: {path}: {note}", file=sys.stderr)
    bars: dict[str, _Bar] = {}

    def report(label: str, state) -> None:  # one bar per image: step, loss, and what would be coded now
        bar = bars.setdefault(label, _Bar(f"SGA {label}", sys.stderr.isatty(), unit="it"))
        bar(state.step, state.total, f"loss={state.loss:.3f} bpp={state.bpp:.4f} psnr={state.psnr:.2f}dB")

    def progress(label: str, done: int, total: int) -> None:
        if done == total and label in bars:
            bars[label].close()

    data = encode_images(images, runtime=runtime, quality=args.quality, bpp=args.bpp, size=args.size, sga=sga,
                         progress=progress, report=report)
    total_pixels = sum(pixels.width * pixels.height for _, pixels in images)
    budget = args.size if args.size is not None else None if args.bpp is None else args.bpp * total_pixels / 8
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


def _file_stem(name: str) -> str:
    """A file name for section ``name``: printable, no separators, no leading dots, at
    most 200 UTF-8 bytes; so an output never leaves its folder (FORMAT.md §4.3)."""
    stem = "".join(c if c.isprintable() and c not in '/\\:*?"<>|' else "_" for c in name).strip(" .")
    stem = stem.encode("utf-8")[:200].decode("utf-8", "ignore")
    return stem or "image"


def _decode_targets(reader, names: list[str], folder, extension: str) -> list[tuple[str, Any]]:
    """(section, path inside ``folder``) per image; refuses two images that would share a file."""
    targets, taken = [], {}
    for name in names:
        path = folder / f"{_file_stem(name)}.{extension}"
        key = path.name.casefold()  # case-insensitive file systems would merge these too
        if key in taken:
            raise InputError(f"{reader.name}: image sections {taken[key]!r} and {name!r} would both be written "
                             f"to {path}; decode them one at a time with --image NAME -o FILE")
        taken[key] = name
        targets.append((name, path))
    return targets


def _decode_image(reader, name: str, runtime, max_pixels: int | None):
    """One image section's pixels (decode_section counts them against the file's cap first)."""
    from ncz.codec import decode_section

    return decode_section(reader, name, runtime, **({} if max_pixels is None else {"max_pixels": max_pixels}))


def cmd_decode(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ncz.codec import load_codec
    from ncz.codec.imageio import format_for, write_image
    from ncz.format import Limits, atomic_write, open_bytes

    if args.max_pixels is not None and args.max_pixels < 1:
        raise _Usage(f"--max-pixels must be >= 1, got {args.max_pixels}")
    limits = None if args.max_pixels is None else Limits(max_image_pixels=args.max_pixels)
    if args.input == "-":
        reader = open_bytes(sys.stdin.buffer.read(), name="<stdin>", limits=limits)
    else:
        reader = open_archive(args.input, limits=limits)
    with reader:
        names = [s.name for s in reader.sections if s.kind == Kind.IMAGE]
        if not names:
            raise InputError(f"{reader.name}: holds no image sections")
        if args.image is not None:
            if args.image not in names:
                raise _Usage(f"{reader.name}: no image section named {args.image!r} (it has {_listing(names)})")
            names = [args.image]
        folder = Path(args.output)
        # a folder: one that exists, a path ending in a separator, or one without an extension
        single_file = args.output == "-" or (not folder.is_dir() and folder.suffix != ""
                                             and not args.output.endswith(("/", os.sep)))
        if len(names) > 1 and single_file:
            raise _Usage(f"{reader.name} holds {len(names)} images ({_listing(names)}); {args.output} takes one: "
                         "pick it with --image NAME, or give a folder")
        targets = None
        if not single_file:
            targets = _decode_targets(reader, names, folder, args.format)  # all checked before any work
        runtime = load_codec(args.model)
        if targets is None:
            pixels = _decode_image(reader, names[0], runtime, args.max_pixels)
            if args.output == "-":
                write_image(pixels, sys.stdout.buffer, fmt="PNG")
            else:
                fmt = format_for(args.output)
                atomic_write(folder, lambda h: write_image(pixels, h, fmt=fmt))
        else:
            folder.mkdir(parents=True, exist_ok=True)
            fmt = format_for(f"x.{args.format}")
            for name, path in targets:
                pixels = _decode_image(reader, name, runtime, args.max_pixels)
                atomic_write(path, lambda h, pixels=pixels: write_image(pixels, h, fmt=fmt))
                if args.verbose:
                    print(f"ncz: {_printable(name)} -> {path}", file=sys.stderr)
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
    p.add_argument("--fast-decode", action="store_true",
                   help="quantized indices as bytes under zstd: ~1%% larger, unpacks several times faster")
    p.add_argument("--workers", type=int, default=2, help="encoder threads (default 2)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("unpack", help="restore dense tensors from a model archive")
    p.add_argument("input", help="model archive .ncz")
    p.add_argument("-o", "--output", required=True, help="OUT.safetensors or OUT.pt")
    p.add_argument("--workers", type=int, default=2,
                   help="decoder processes for a .safetensors output (default 2; 1: none)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_unpack)

    p = sub.add_parser("verify", help="check every checksum and decode every stream (image latents included: "
                                      "entropy-decoded with the codec weights); exit 0 when sound")
    p.add_argument("files", nargs="+", metavar="FILE", help=".ncz files")
    p.add_argument("--model", help="codec weights for image sections (.ncz); default: the shipped weights")
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
    p.add_argument("--effort", choices=["fast", "sga", "max"], default=None,
                   help="fast (default): one pass of the analysis network; sga: refine the latents per image with "
                        "stochastic Gumbel annealing (Yang et al. 2020), 200 iterations, about 9 %% fewer bits at "
                        "the same quality and about 1 min for a 768x512 image on 2 cores; max: the paper's schedule "
                        "(2,000 iterations on y and z), about 1.4x sga's gain, about 16 CPU-min for a 768x512 "
                        "image")
    p.add_argument("--sga", type=int, default=0, metavar="N",
                   help="SGA with N iterations (the effort's schedule stretched; without --effort: sga's)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop SGA after SECONDS per image and keep the best latents so far (implies --effort sga "
                        "unless --effort fast is given, which is an error)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the real bpp from the file size")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="decompress images from an .ncz")
    p.add_argument("input", help="input .ncz (- for stdin)")
    p.add_argument("-o", "--output", required=True,
                   help="OUT.png/.jpg/.ppm/.bmp/.webp, a folder (one that exists, or a path without extension) "
                        "for several images, - for stdout (PNG)")
    p.add_argument("--format", default="png", choices=["png", "ppm", "bmp", "webp", "jpg"],
                   help="format of files written into a folder")
    p.add_argument("--image", metavar="NAME", help="decode only the image section NAME (see ncz info)")
    p.add_argument("--max-pixels", type=int, metavar="N",
                   help="decode images of up to N pixels, all images of the file together "
                        "(default 67,108,864: decoding time grows with pixels, not file size)")
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
    except _Usage as exc:
        print(f"ncz: error: {exc}", file=sys.stderr)
        return 2
    except NczError as exc:
        print(f"ncz: error: {_one_line(exc)}", file=sys.stderr)
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
    except (MemoryError, ValueError, RuntimeError) as exc:
        # a last resort: every known bad input raises NczError at its source; whatever
        # slipped through still gets one line, not a traceback
        print(f"ncz: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return _printable(lines[0]) if lines else type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
