"""Regenerate the golden conformance vectors in tests/vectors/.

    python -m ncz.tools.make_vectors [--out tests/vectors] [--check]

Each vector is a small .ncz file plus a JSON describing what it must decode to
(section names, kinds, codecs, params, sha256 of the decoded bytes; for the
vectors of layers above the container also the sha256 of what that layer
decodes the file to, e.g. the tensors of a model archive). The reference writer
must reproduce the .ncz files byte for byte (``--check``); a changed vector
means a format version bump (docs/FORMAT.md §8).

Some vectors are *built once*: their bytes come from float32 networks (the image
codec's encoder), so the writer cannot reproduce them on every machine. They are
written only when absent (delete one to rebuild it, with a version bump), and
``--check`` decodes them against their JSON instead of rebuilding them.

Layers above ``ncz.format`` add their vectors through :data:`PLUGINS`: each
module listed there has ``register_vectors(register)``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ncz.format import Codec, Kind, Writer, open_bytes
from ncz.format.section_codecs import get_codec

__all__ = ["VECTORS", "DECODED", "BUILT_ONCE", "PLUGINS", "register", "build", "build_once", "decode_layer",
           "describe", "main"]

# modules of layers above the container that register vectors (``register_vectors(register)``)
PLUGINS = ("ncz.models.vectors", "ncz.codec.vectors")


def _empty(w: Writer) -> None:
    pass


def _basic(w: Writer) -> None:
    w.add("hello", b"hello, ncz\n", kind=Kind.BLOB, codec=Codec.RAW)
    ramp = np.arange(24, dtype="<f4").reshape(2, 3, 4)
    w.add("ramp", ramp.tobytes(), kind=Kind.TENSOR, codec=Codec.RAW, params={"dtype": "float32", "shape": [2, 3, 4]})
    w.add("empty", b"", kind=Kind.BLOB, codec=Codec.RAW)


def _zstd(w: Writer) -> None:
    text = b"".join(b"line %d of a repetitive text section\n" % (i % 17) for i in range(300))
    w.add("text", text, kind=Kind.BLOB, codec=Codec.ZSTD, options={"level": 19})
    ints = (np.arange(1000, dtype="<i8") // 10).astype("<i8")
    w.add("ints", ints.tobytes(), kind=Kind.TENSOR, codec=Codec.ZSTD, params={"dtype": "int64", "shape": [1000]})
    w.add("bf16", np.array([0x3F80, 0xC000, 0x7F80, 0x7FC0], dtype="<u2").tobytes(), kind=Kind.TENSOR,
          codec=Codec.RAW, params={"dtype": "bfloat16", "shape": [2, 2]})


def _metadata(w: Writer) -> None:
    from ncz.format import canonical

    w.add("meta", canonical.pack({"z": [1, 2.5, None, True], "a": {"nested": b"\x00\x01"}, "unicode": "λ→ü"}),
          kind=Kind.METADATA, codec=Codec.RAW)
    w.add("ancillary-note", b"readers may skip me", kind=Kind.BLOB, codec=Codec.ZSTD, critical=False)


def vector_mean_scale(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Means and scales of the conditional vector streams (a formula, so a test can rebuild them)."""
    i = np.arange(count)
    return (i % 17) - 8 + 0.37, 0.2 * 1.1 ** (i % 40)


def vector_latents(count: int) -> np.ndarray:
    means, scales = vector_mean_scale(count)
    rng = np.random.default_rng(1234)
    symbols = np.round(rng.normal(means, scales)).astype(np.int32)
    symbols[::97] += 1000  # exercise escapes
    return symbols


def _entropy(w: Writer) -> None:
    from ncz.format import entropy
    from ncz.format.entropy_tables import Family, FrequencyTable

    rng = np.random.default_rng(99)
    q = np.round(rng.laplace(0, 4, 3000)).astype("<i4")
    q[::500] = [2**31 - 1, -(2**31), 123456, -654321, 99999, 5]  # far outside the fitted window
    w.add("q-ans", q.tobytes(), kind=Kind.TENSOR, codec=Codec.ANS, params={"dtype": "int32", "shape": [3000]})
    w.add("q-range", q.tobytes(), kind=Kind.TENSOR, codec=Codec.RANGE, params={"dtype": "int32", "shape": [3000]})
    # one symbol; a table fitted to it would code it in 0 bytes, which §7.1 forbids
    one = entropy.CategoricalModel(FrequencyTable(41, np.array([1 << 23, (1 << 23) - 1, 1])))
    w.add("one", np.array([42], "<i4").tobytes(), kind=Kind.BLOB, codec=Codec.ANS, options={"model": one})
    w.add("none", b"", kind=Kind.BLOB, codec=Codec.RANGE)
    latents = vector_latents(2000)
    means, scales = vector_mean_scale(2000)
    for family, codec in [(Family.GAUSSIAN, Codec.ANS), (Family.LAPLACE, Codec.RANGE), (Family.LOGISTIC, Codec.ANS)]:
        model = entropy.ConditionalModel.from_mean_scale(family, means, scales)
        entropy.write_conditional(w, f"y-{family.name.lower()}", latents, model, codec=codec, kind=Kind.BLOB)


VECTORS: dict[str, tuple[dict, Callable[[Writer], None]]] = {
    "empty": ({}, _empty),
    "basic": ({"title": "basic vector"}, _basic),
    "zstd": ({}, _zstd),
    "metadata": ({"created_by": "ncz vectors", "n": 3}, _metadata),
    "entropy": ({"conditional_streams": "means/scales: ncz.tools.make_vectors.vector_mean_scale(2000)"}, _entropy),
}


# vector name -> what its layer decodes the file's bytes to: {object name: bytes}
DECODED: dict[str, Callable[..., dict[str, bytes]]] = {}
# vector name -> why the writer cannot reproduce it (built once, then only decoded)
BUILT_ONCE: dict[str, str] = {}


def register(name: str, metadata: dict | None, fill: Callable, *,
             decoded: Callable[..., dict[str, bytes]] | None = None, built_once: str | None = None) -> None:
    """Let other layers (images, models) add their vectors; ``decoded(data)`` gives what
    that layer decodes the file to, pinned by sha256 in the vector's JSON.

    ``built_once`` (the reason) marks a vector the writer cannot reproduce on every machine:
    then ``fill(folder)`` returns its files as {suffix: bytes} (``.ncz`` and companions, e.g. a
    PNG of the expected pixels), reading committed vectors from ``folder`` where it needs them
    (weights), ``metadata`` is None and ``decoded(data, folder)`` takes the folder too.
    """
    VECTORS[name] = (metadata or {}, fill)
    if decoded is not None:
        DECODED[name] = decoded
    if built_once is not None:
        BUILT_ONCE[name] = built_once


def build(name: str) -> bytes:
    """The bytes the reference writer produces for vector ``name`` (not for built-once vectors)."""
    if name in BUILT_ONCE:
        raise ValueError(f"vector {name!r} is built once, not reproduced: {BUILT_ONCE[name]}")
    metadata, fill = VECTORS[name]
    buffer = io.BytesIO()
    with Writer(buffer, metadata=metadata) as writer:
        fill(writer)
    return buffer.getvalue()


def build_once(name: str, folder: Path) -> dict[str, bytes]:
    """The files of built-once vector ``name`` ({suffix: bytes}), from the vectors already in ``folder``."""
    return VECTORS[name][1](folder)


def decode_layer(name: str, data: bytes, folder: Path) -> dict[str, bytes]:
    """What the layer above the container decodes vector ``name`` to ({object name: bytes})."""
    return DECODED[name](data, folder) if name in BUILT_ONCE else DECODED[name](data)


def describe(data: bytes, name: str, folder: Path = Path("tests/vectors")) -> dict:
    """What a conforming reader must see in ``data`` (``folder``: where built-once vectors find theirs)."""
    reader = open_bytes(data, name=name)
    sections = []
    for info in reader.sections:
        spec = get_codec(info.codec)
        decoded = reader.read(info.name) if info.known and not spec.needs_context(info.params) else None
        sections.append({
            "name": info.name, "kind": info.kind, "codec": info.codec, "critical": info.critical,
            "stored_length": info.stored_length, "decoded_length": info.decoded_length,
            "decoded_sha256": hashlib.sha256(decoded).hexdigest() if decoded is not None else None,
        })
    description = {
        "file_sha256": hashlib.sha256(data).hexdigest(),
        "file_length": len(data),
        "version": list(reader.version),
        "metadata_keys": sorted(reader.metadata),
        "sections": sections,
    }
    if name in DECODED:
        description["decoded"] = {key: hashlib.sha256(value).hexdigest()
                                  for key, value in sorted(decode_layer(name, data, folder).items())}
    return description


def _load_plugins() -> None:
    """Let the layers above format (:data:`PLUGINS`) register their vectors; once."""
    for module_name in PLUGINS:
        if module_name not in _LOADED:
            importlib.import_module(module_name).register_vectors(register)
            _LOADED.add(module_name)


_LOADED: set[str] = set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ncz.tools.make_vectors", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="tests/vectors", type=Path)
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = parser.parse_args(argv)
    _load_plugins()
    args.out.mkdir(parents=True, exist_ok=True)
    status = 0
    for name in VECTORS:  # registration order: a built-once vector may read those before it
        path = args.out / f"{name}.ncz"
        if name in BUILT_ONCE:
            status |= _built_once(name, path, args.check)
            continue
        data = build(name)
        if args.check:
            if not (path.exists() and path.read_bytes() == data):
                print(f"{path}: differs from the reference writer", file=sys.stderr)
                status = 1
        else:
            _write(path, {".ncz": data, ".json": _json(describe(data, name, args.out))})
    return status


def _json(description: dict) -> bytes:
    return (json.dumps(description, indent=2, sort_keys=True) + "\n").encode()


def _write(path: Path, files: dict[str, bytes]) -> None:
    for suffix, content in files.items():
        path.with_suffix(suffix).write_bytes(content)
    print(f"{path}: {path.stat().st_size} bytes")


def _built_once(name: str, path: Path, check: bool) -> int:
    """Check mode: decode the committed file against its JSON. Write mode: build it only when absent."""
    if check:
        if not path.exists():
            print(f"{path}: missing", file=sys.stderr)
            return 1
        print(f"{path}: not rebuilt ({BUILT_ONCE[name]}); checking its decoding", file=sys.stderr)
        json_path = path.with_suffix(".json")
        if not json_path.exists() or _json(describe(path.read_bytes(), name, path.parent)) != json_path.read_bytes():
            print(f"{path}: does not decode to {json_path.name}", file=sys.stderr)
            return 1
        return 0
    if path.exists():
        print(f"{path}: kept (built once: {BUILT_ONCE[name]})")
        return 0
    files = build_once(name, path.parent)
    _write(path, {**files, ".json": _json(describe(files[".ncz"], name, path.parent))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
