"""The ``ncz`` command line: a thin layer over the library.

``main(argv) -> int`` parses arguments, calls the library and maps errors to one
line on stderr: exit 1 for bad or corrupt input (any :class:`NczError` or an
OS error on a named file), 2 for usage errors (argparse's convention), 130 on
Ctrl-C. It never shows a traceback to a user.
"""

from __future__ import annotations

import argparse
import json
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
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
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
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("verify", help="check every checksum and decode every stream; exit 0 when sound")
    p.add_argument("files", nargs="+", metavar="FILE", help=".ncz files")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_verify)

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
    except OSError as exc:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"ncz: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ncz: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
