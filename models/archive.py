"""Model archives: pack a checkpoint into one .ncz, load or unpack it again.

Data flow::

    checkpoint ──open_checkpoint──► (name, tensor) one at a time
        ──recipe.choose──► representation encoder (worker threads, bounded window)
        ──► head + part sections, written in checkpoint order ──► .ncz (atomic)

    .ncz ──head sections──► representation of the kind (registry) ──► check_head, all heads first
        ──► decode ──► dense tensors, or build_module ──► compact modules (load_into)

Peak memory while packing: the tensors in flight (≤ workers + 1, and no more
than the largest tensor alone would need) and their encodings; each worker loads
its own tensor. Unpacking to safetensors streams tensor by tensor into the output.
"""

from __future__ import annotations

import builtins
import json
import mmap
import multiprocessing
import os
import struct
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ncz.format import (
    FormatError,
    InputError,
    Kind,
    LimitError,
    Limits,
    Reader,
    SectionInfo,
    UsageError,
    Writer,
    atomic_write,
)
from ncz.format import open as open_archive

from . import registry
from .checkpoint import TensorSource, check_name, check_tensor, open_checkpoint
from .lossless import LOSSLESS
from .recipe import Recipe
from .representation import Encoded, Progress, all_finite, dense_nbytes, storage_view

if TYPE_CHECKING:  # calibration imports this module (a calibration file is an archive)
    from .calibration import Calibration

__all__ = ["ARCHIVE_TAG", "TensorReport", "PackReport", "pack", "write_encoded", "iter_tensors", "load_state_dict",
           "load_into", "unpack", "describe", "LoadReport"]

ARCHIVE_TAG = "ncz-model-archive"


@dataclass(frozen=True)
class TensorReport:
    name: str
    representation: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    stored_bytes: int
    rel_error: float

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.stored_bytes / max(self.numel, 1)


@dataclass(frozen=True)
class PackReport:
    path: Path
    file_bytes: int
    tensors: list[TensorReport]
    notes: tuple[str, ...] = ()  # about the source, worth telling the user (e.g. tied weights stored twice)

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.file_bytes / max(self.numel, 1)


# Memory while packing: a tensor being encoded needs about 4× its own bytes (a bf16 tensor: itself,
# its int16 indices, their symbols, one chunk at a time of everything else); tensors enter the
# worker pool while those in flight fit in what the largest alone needs, plus a little for small ones.
_WORKING_PER_BYTE = 4
_WORKING_SLACK = 128 << 20


def _encode(name: str, tensor: torch.Tensor, recipe: Recipe, calibration: Calibration | None = None) -> Encoded:
    rule = recipe.choose(name, tensor)
    if rule.representation != LOSSLESS.name and (not tensor.is_floating_point() or not all_finite(tensor)):
        return LOSSLESS.encode(name, tensor)  # integers, NaN/inf: only exact storage makes sense
    representation = registry.by_name(rule.representation)
    options = dict(rule.options)
    if calibration is not None and representation.uses_calibration:
        options["calibration"] = calibration.for_tensor(name, tuple(tensor.shape))
    try:
        return representation.encode(name, tensor, **options)
    except TypeError as exc:
        raise UsageError(f"recipe {recipe.name!r}: bad options {rule.options} for {rule.representation!r} "
                         f"({exc})") from exc


def pack(source: str | os.PathLike[str] | Mapping[str, torch.Tensor] | TensorSource, output: str | os.PathLike[str], *,
         recipe: Recipe | str = "lossless", metadata: Mapping[str, Any] | None = None,
         workers: int = 2, progress: Progress | None = None,
         pre_encoded: Mapping[str, Encoded] | None = None, calibration: Calibration | None = None) -> PackReport:
    """Pack a checkpoint (path, state dict or TensorSource) into ``output``.

    ``calibration`` (from :func:`ncz.models.calibrate`) lets quantized tensors
    meet their recipe's output error with fewer bits (GPTQ for linear weights,
    frequency-weighted steps for embedding rows; same on-disk layout).

    ``pre_encoded`` maps tensor names to encodings made elsewhere (e.g. a
    dictionary group from ``plan_dictionary``); those skip the recipe and are
    written as they are, in checkpoint order."""
    pre_encoded = dict(pre_encoded or {})
    if isinstance(recipe, str):
        recipe = Recipe.preset(recipe)
    if isinstance(source, Mapping):
        items = list(source.items())
        for name, tensor in items:
            if not isinstance(name, str):
                raise UsageError(f"state dict key {name!r} is not a str")
            check_tensor(name, tensor, "state_dict")
        names = [n for n, _ in items]
        lookup = dict(items)
        load = lookup.__getitem__
        sizes = {n: t.numel() * t.element_size() for n, t in items}
        source_name, notes = "state_dict", []
    else:
        src = source if isinstance(source, TensorSource) else open_checkpoint(source)
        names, load, source_name, notes = src.names, src.load, src.path.name, src.notes
        sizes = {n: src.nbytes(n) or 0 for n in names}
    for name in names:
        check_name(name, source_name)
    unknown = set(pre_encoded) - set(names)
    if unknown:
        raise UsageError(f"pre_encoded names {sorted(unknown)[:3]} are not tensors of the checkpoint")
    header = {"format": ARCHIVE_TAG, "tensors": len(names), "source": source_name, "recipe": recipe.name}
    if calibration is not None:
        header.update({"calibration": calibration.source or "unnamed", "calibration_samples": int(calibration.samples)})
    header.update(metadata or {})
    reports: list[TensorReport] = []
    working = {n: _WORKING_PER_BYTE * sizes[n] for n in names}
    budget = max(working.values(), default=0) + _WORKING_SLACK
    with Writer(output, metadata=header) as writer, ThreadPoolExecutor(max(1, workers)) as pool:
        pending: deque[tuple[str, Future]] = deque()
        in_flight = 0

        def write_oldest() -> None:
            nonlocal in_flight
            name, future = pending.popleft()
            encoded: Encoded = future.result()
            in_flight -= working[name]
            write_encoded(writer, encoded)
            head = encoded.sections[0].params
            reports.append(TensorReport(name, encoded.representation, tuple(head["shape"]), head["dtype"],
                                        encoded.numel, encoded.stored_bytes, encoded.rel_error))
            if progress:
                progress(len(reports), len(names), name)

        for name in names:
            # a bounded window, and no more tensors in flight than the largest alone would need
            while pending and (len(pending) > max(1, workers) or in_flight + working[name] > budget):
                write_oldest()
            if name in pre_encoded:
                done: Future = Future()
                done.set_result(pre_encoded[name])
                pending.append((name, done))
            else:  # the worker loads the tensor itself: only tensors being encoded are in memory
                pending.append((name, pool.submit(_load_and_encode, name, load, recipe, calibration)))
            in_flight += working[name]
        while pending:
            write_oldest()
    return PackReport(Path(output), os.path.getsize(output), reports, tuple(notes))


def _load_and_encode(name: str, load, recipe: Recipe, calibration: Calibration | None) -> Encoded:
    return _encode(name, load(name), recipe, calibration)


def write_encoded(writer: Writer, encoded: Encoded) -> None:
    """Write one tensor's sections; the head gets the measured ``rel_error`` (FORMAT.md §5.4)."""
    for index, section in enumerate(encoded.sections):
        params = dict(section.params)
        if index == 0:
            params["rel_error"] = float(encoded.rel_error)
        writer.add_encoded(section.name, section.payload, kind=section.kind, params=params)


def _heads(reader: Reader, *, decoding: bool = True) -> list[SectionInfo]:
    """The head sections. With ``decoding``, their dense sizes together must fit the
    reader's per-file budget and every head must pass its representation's check,
    both before any part is read (FORMAT.md §5.4)."""
    if reader.metadata.get("format") != ARCHIVE_TAG:
        raise InputError(f"{reader.name}: not a model archive (header.format is {reader.metadata.get('format')!r})")
    heads = []
    for info in reader.sections:
        if info.kind == Kind.PART or not info.known:
            continue
        if registry.for_kind(info.kind) is None:
            if info.critical:
                raise InputError(f"{reader.name}: section {info.name!r} has kind {info.kind_name}, which this "
                                 "build cannot turn into a tensor")
            continue
        heads.append(info)
    if decoding:
        total = sum(dense_nbytes(h.params) for h in heads)
        if total > reader.limits.max_file_decoded_bytes:
            raise LimitError(f"{reader.name}: its {len(heads)} tensors are {total} bytes dense; the limit is "
                             f"{reader.limits.max_file_decoded_bytes} (Limits.max_file_decoded_bytes)")
        for head in heads:
            registry.for_kind(head.kind).check_head(head, reader)
    return heads


def _decode(head: SectionInfo, reader: Reader) -> torch.Tensor:
    tensor = registry.for_kind(head.kind).decode(head, reader)
    if list(tensor.shape) != list(head.params["shape"]):  # parts that disagree with their head
        raise FormatError(f"{reader.name}: {head.name!r} decoded to shape {list(tensor.shape)}")
    return tensor


def _open_mapped(path: str | os.PathLike[str], limits: Limits | None) -> tuple[Reader, mmap.mmap | None]:
    """The archive opened like ``ncz.format.open`` (read-only map) with the map at hand, so that pages
    already decoded can be given back (:func:`_release`); None when the file cannot be mapped."""
    try:
        handle = builtins.open(path, "rb")
    except OSError:
        return open_archive(path, limits=limits), None  # ncz.format.open words the error
    try:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # empty or unmappable: ncz.format.open words the error
        handle.close()
        return open_archive(path, limits=limits), None
    return Reader(mapped, name=os.fspath(path), limits=limits, owner=handle), mapped


def _release(mapped: mmap.mmap | None, sections: list[SectionInfo]) -> None:
    """Drop the mapped pages of ``sections`` from this process: pages read from a mapped file count
    toward its resident memory until unmapped, so unpacking a 1 GB archive would otherwise look like
    1 GB more of it (the file stays cached; a later read maps the pages again)."""
    if mapped is None or not sections or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = min(s.offset for s in sections) // mmap.PAGESIZE * mmap.PAGESIZE
    end = max(s.offset + s.stored_length for s in sections)
    if end > start:
        mapped.madvise(mmap.MADV_DONTNEED, start, end - start)


def _tensor_sections(reader: Reader) -> dict[str, list[SectionInfo]]:
    """Head name → its head and part sections."""
    out: dict[str, list[SectionInfo]] = {}
    for info in reader.sections:
        out.setdefault(info.name.split("#", 1)[0], []).append(info)
    return out


def iter_tensors(path: str | os.PathLike[str], *, limits: Limits | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, dense tensor) in archive order, one at a time; ``limits`` raises or lowers the reader caps."""
    reader, mapped = _open_mapped(path, limits)
    with reader:
        sections = _tensor_sections(reader)
        for head in _heads(reader):
            tensor = _decode(head, reader)
            _release(mapped, sections[head.name])
            yield head.name, tensor


def load_state_dict(path: str | os.PathLike[str], *, limits: Limits | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a model archive, dense, with the original names, dtypes and shapes."""
    return dict(iter_tensors(path, limits=limits))


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_into` did: which modules were swapped for compact ones."""

    dense: list[str]
    factorized: list[str]  # module names replaced by compact modules
    parameter_bytes_before: int
    parameter_bytes_after: int


def _parameter_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def load_into(model: torch.nn.Module, path: str | os.PathLike[str], *, factorized: bool = True,
              strict: bool = True, limits: Limits | None = None) -> LoadReport:
    """Load a model archive into ``model``.

    With ``factorized``, weights stored low-rank, as dictionary codes or as
    codebooks replace their owning module (``nn.Linear`` → ``LowRankLinear`` …) so
    the compressed size holds in memory at run time; everything else is copied
    densely into the existing parameters and buffers.
    """
    before = _parameter_bytes(model)
    own = dict(model.state_dict())
    dense, swapped, seen = [], [], set()
    with open_archive(path, limits=limits) as reader:
        factorizable = []
        # Dense tensors first (biases included), so a builder that keeps the
        # owning module's bias sees the archive's value, not the fresh one.
        for head in _heads(reader):
            name = head.name
            if name not in own:
                if strict:
                    raise InputError(f"{reader.name}: tensor {name!r} has no place in the model")
                continue
            seen.add(name)
            owner_name, _, leaf = name.rpartition(".")
            builder = registry.for_kind(head.kind).build_module if factorized and leaf == "weight" else None
            if builder is not None:
                factorizable.append((head, owner_name, builder))
                continue
            tensor = _decode(head, reader)
            target = own[name]
            if tuple(target.shape) != tuple(tensor.shape):
                raise InputError(f"{reader.name}: {name!r} has shape {list(tensor.shape)}, "
                                 f"the model expects {list(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor.to(target.dtype))
            dense.append(name)
        for head, owner_name, builder in factorizable:
            owner = model.get_submodule(owner_name) if owner_name else model
            replacement = builder(head, reader, owner)
            parent_name, _, child = owner_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, replacement)
            swapped.append(owner_name)
    missing = [n for n in own if n not in seen and not any(n.startswith(m + ".") for m in swapped)]
    if strict and missing:
        raise InputError(f"{path}: archive lacks {len(missing)} tensors of the model, e.g. {missing[:3]}")
    return LoadReport(dense, swapped, before, _parameter_bytes(model))


def describe(path: str | os.PathLike[str]) -> list[TensorReport]:
    """Per-tensor representation, size and recorded error, without decoding."""
    with open_archive(path) as reader:
        heads = _heads(reader, decoding=False)
        sizes: dict[str, int] = {h.name: 0 for h in heads}
        for info in reader.sections:
            owner = info.name.split("#", 1)[0]
            if owner in sizes:
                sizes[owner] += info.stored_length
        rows = []
        for h in heads:
            numel = 1
            for d in h.params["shape"]:
                numel *= d
            rows.append(TensorReport(h.name, h.kind_name if h.kind != Kind.TENSOR else "lossless",
                                     tuple(h.params["shape"]), h.params["dtype"], numel, sizes[h.name],
                                     float(h.params.get("rel_error", 0.0))))
        return rows


_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int8": "I8", "uint8": "U8",
              "int16": "I16", "int32": "I32", "int64": "I64", "bool": "BOOL"}


def unpack(path: str | os.PathLike[str], output: str | os.PathLike[str], progress: Progress | None = None, *,
           limits: Limits | None = None, workers: int = 1) -> int:
    """Restore dense tensors to ``.safetensors`` (streamed) or ``.pt``; returns the tensor count.

    ``workers`` > 1 decodes tensors of a ``.safetensors`` output in that many forked processes, each
    writing its tensors' bytes in place (the entropy decoder holds the GIL: threads would not help)."""
    output = Path(output)
    if output.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        raise UsageError(f"{output}: output must end in .safetensors or .pt")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UsageError(f"workers must be an integer >= 1, got {workers!r}")
    with open_archive(path, limits=limits) as reader:
        heads = _heads(reader)
    if output.suffix != ".safetensors":
        tensors = {}
        for index, (name, tensor) in enumerate(iter_tensors(path, limits=limits)):
            tensors[name] = tensor
            if progress:
                progress(index + 1, len(heads), name)
        atomic_write(output, lambda handle: torch.save(tensors, handle))
        return len(tensors)

    header: dict[str, Any] = {"__metadata__": {"format": "pt", "source": "ncz"}}
    offsets, offset = {}, 0
    for h in heads:
        if h.name == "__metadata__":  # safetensors would read it as its metadata block
            raise InputError(f"{path}: tensor {h.name!r} cannot be stored in safetensors (the name is reserved "
                             "there); unpack to .pt instead")
        dtype = h.params["dtype"]
        if dtype not in _ST_DTYPES:
            raise UsageError(f"{h.name!r}: dtype {dtype} has no safetensors equivalent")
        size = dense_nbytes(h.params)
        header[h.name] = {"dtype": _ST_DTYPES[dtype], "shape": h.params["shape"],
                          "data_offsets": [offset, offset + size]}
        offsets[h.name] = offset
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def write(handle) -> None:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        if workers > 1 and len(heads) > 1:
            handle.flush()
            data_start = 8 + len(blob)
            _write_in_processes(path, limits, {n: data_start + o for n, o in offsets.items()}, handle.fileno(),
                                workers, progress)
            return
        for index, (name, tensor) in enumerate(iter_tensors(path, limits=limits)):
            handle.write(_tensor_bytes(tensor))
            if progress:
                progress(index + 1, len(heads), name)

    atomic_write(output, write)
    return len(heads)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy."""
    return memoryview(storage_view(tensor.contiguous())).cast("B") if tensor.numel() else memoryview(b"")


_worker_archive: tuple[Reader, mmap.mmap | None, dict[str, list[SectionInfo]]] | None = None  # per worker process


def _open_in_worker(path: str | os.PathLike[str], limits: Limits | None) -> None:
    global _worker_archive
    # one core per worker; and an OpenMP pool the parent may have started does not survive fork(),
    # so a forked child must not enter a multi-threaded torch kernel
    torch.set_num_threads(1)
    reader, mapped = _open_mapped(path, limits)
    _worker_archive = (reader, mapped, _tensor_sections(reader))


def _decode_at(name: str, position: int, fd: int) -> str:
    """In a worker: decode tensor ``name`` and write its bytes at ``position`` of the inherited output file."""
    assert _worker_archive is not None
    reader, mapped, sections = _worker_archive
    data = _tensor_bytes(_decode(reader.info(name), reader))
    _release(mapped, sections[name])
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written:], position + written)
    return name


def _write_in_processes(path: str | os.PathLike[str], limits: Limits | None, positions: dict[str, int], fd: int,
                        workers: int, progress: Progress | None) -> None:
    # fork: workers inherit the output file and need no import; they run numpy and constriction only
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(min(workers, len(positions)), mp_context=context, initializer=_open_in_worker,
                             initargs=(path, limits)) as pool:
        futures = [pool.submit(_decode_at, name, position, fd) for name, position in positions.items()]
        try:
            for done, future in enumerate(as_completed(futures)):
                name = future.result()
                if progress:
                    progress(done + 1, len(positions), name)
        except BaseException:  # a bad section or Ctrl-C: do not decode the rest before raising
            pool.shutdown(wait=True, cancel_futures=True)
            raise
