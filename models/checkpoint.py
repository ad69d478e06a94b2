"""Safe loading of checkpoints: safetensors, state_dict files, Hugging Face folders.

Nothing is unpickled beyond what ``torch.load(weights_only=True)`` allows: a
checkpoint that needs arbitrary objects is refused with a clear message. Tensors
are yielded one at a time (safetensors and ``mmap=True`` state dicts are read
lazily), so packing streams a large model. Nothing is lost or blown up quietly:
two entries that flatten to one name, a view whose elements share storage
(``expand``), and shard paths that leave the model folder are refused; tensors
sharing storage with another (tied weights) are noted and stored each.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ncz.format import InputError

__all__ = ["TensorSource", "open_checkpoint", "check_name", "check_tensor"]

RESERVED_NAMES = ("__metadata__",)  # safetensors' metadata key: unpack could not write it


def check_name(name: str, where: object) -> None:
    """Refuse tensor names an archive cannot hold (FORMAT.md §5.4)."""
    if "#" in name:
        raise InputError(f"{where}: tensor name {name!r} contains '#', which ncz reserves for parts")
    if name in RESERVED_NAMES:
        raise InputError(f"{where}: a tensor is named {name!r}, which safetensors reserves; rename it")


def check_tensor(name: str, tensor: torch.Tensor, where: object) -> None:
    """Refuse a view whose elements overlap in memory (``expand``, ``as_strided``):
    storing it would densify it, possibly to terabytes. Checked on metadata only."""
    if not isinstance(tensor, torch.Tensor):
        raise InputError(f"{where}: {name!r} is a {type(tensor).__name__}, not a tensor")
    if tensor.numel() == 0:
        return
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
    if span < tensor.numel():
        raise InputError(f"{where}: tensor {name!r} has {tensor.numel()} elements over storage for {span} "
                         "(an expanded or overlapping view); save tensor.contiguous() or .clone() instead")


@dataclass
class TensorSource:
    """Names and lazily loaded tensors of a checkpoint, in file order."""

    path: Path
    names: list[str]
    _loaders: dict
    notes: list[str] = field(default_factory=list)  # worth telling the user, not errors
    _nbytes: dict = field(default_factory=dict)  # name -> bytes in memory once loaded, where known unloaded

    def load(self, name: str) -> torch.Tensor:
        return self._loaders[name]()

    def nbytes(self, name: str) -> int | None:
        """How many bytes the tensor takes once loaded, without loading it (None: unknown)."""
        return self._nbytes.get(name)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.load(name)

    def __len__(self) -> int:
        return len(self.names)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
_MAX_SAFETENSORS_HEADER = 100_000_000  # bytes, as the safetensors library


class _SafetensorsFile:
    """One .safetensors file, each tensor read with positioned reads when asked for.

    Not through a memory map (the safetensors library's way): the mapped pages a process
    has read count toward its resident memory until it unmaps the file, so packing a
    1 GB checkpoint showed 1 GB more peak RSS than the tensors it actually held.
    The header is checked as safetensors checks it: a JSON object of tensors whose byte
    ranges fit the file, match dtype × shape and do not overlap."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise InputError(f"{path}: no such file") from exc
        try:
            self._read_header()
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise

    def _read_header(self) -> None:
        size = os.fstat(self._fd).st_size
        prefix = os.pread(self._fd, 8, 0)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise InputError(f"{self.path}: not a readable safetensors file (header length {length} for a file "
                             f"of {size} bytes)")
        try:
            header = json.loads(os.pread(self._fd, length, 8))
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"{self.path}: not a readable safetensors file (header is not JSON: {exc})") from exc
        if not isinstance(header, dict):
            raise InputError(f"{self.path}: not a readable safetensors file (header is not a JSON object)")
        self._start, data_size = 8 + length, size - 8 - length
        self.tensors: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            self.tensors[name] = self._entry(name, info, data_size)
        ranges = sorted((begin, end) for _, _, begin, end in self.tensors.values() if end > begin)
        if any(b < a_end for (_, a_end), (b, _) in zip(ranges, ranges[1:])):
            raise InputError(f"{self.path}: not a readable safetensors file (tensors overlap)")

    def _entry(self, name: str, info: object, data_size: int) -> tuple[torch.dtype, list[int], int, int]:
        where = f"{self.path}: not a readable safetensors file (tensor {name!r}"
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
            raise InputError(f"{where} has no dtype)")
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise InputError(f"{self.path}: tensor {name!r} has dtype {info['dtype']}, which ncz does not read")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise InputError(f"{where}: shape must be a list of non-negative integers)")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise InputError(f"{where}: data_offsets must lie inside the file)")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
            raise InputError(f"{where}: its bytes do not match dtype × shape)")
        return dtype, shape, offsets[0], offsets[1]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self.tensors[name]
        return end - begin

    def load(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.tensors[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(end - begin)
        view, done = memoryview(buffer), 0
        while done < len(buffer):  # a positioned read may return less than asked
            got = os.preadv(self._fd, [view[done:]], self._start + begin + done)
            if got <= 0:
                raise InputError(f"{self.path}: file ended inside tensor {name!r} (truncated while reading?)")
            done += got
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


def _from_safetensors(files: list[Path]) -> tuple[list[str], dict, list[str], dict]:
    names, loaders, sizes = [], {}, {}
    for file in files:
        handle = _SafetensorsFile(file)
        for key in sorted(handle.tensors):  # the order safetensors' keys() gives
            if key in loaders:
                raise InputError(f"{file}: tensor {key!r} appears in two shards")
            names.append(key)
            loaders[key] = (lambda h=handle, k=key: h.load(k))
            sizes[key] = handle.nbytes(key)
    return names, loaders, [], sizes


def _flatten(obj, prefix: str, out: dict, where: Path, depth: int = 0) -> None:
    if depth > 64:
        raise InputError(f"{where}: containers nested deeper than 64 levels at {prefix!r}")
    if isinstance(obj, torch.Tensor):
        if prefix in out:  # {'a': {'b': t}, 'a.b': u} or {1: t, '1': u}: one would be lost
            raise InputError(f"{where}: two entries flatten to the tensor name {prefix!r}; rename one")
        out[prefix] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out, where, depth + 1)
    elif isinstance(obj, (list, tuple)):  # nn.ModuleList-style names: layers.0, layers.1, ...
        for index, value in enumerate(obj):
            _flatten(value, f"{prefix}.{index}" if prefix else str(index), out, where, depth + 1)
    # other leaves (ints, strings, optimizer hyper-parameters) carry no weights: skipped


def _shared_storage_notes(tensors: dict[str, torch.Tensor], where: Path) -> list[str]:
    """Tensors that share storage (tied weights): each is stored, which costs the bytes twice."""
    first: dict[tuple[int, int], str] = {}
    notes = []
    for name, tensor in tensors.items():
        if tensor.numel() == 0:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in first:
            notes.append(f"{where}: {name!r} shares storage with {first[key]!r} (tied weights); both are stored")
        else:
            first[key] = name
    return notes


def _from_state_dict(file: Path) -> tuple[list[str], dict, list[str], dict]:
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise InputError(
            f"{file}: refused: loading it would unpickle arbitrary Python objects{what}; only plain tensors "
            "are accepted (torch.load weights_only=True): save a state_dict or safetensors instead") from exc
    except (RuntimeError, OSError, EOFError, ValueError, MemoryError) as exc:
        # torch's own text speaks of its internals (mmap, zip records): not for the user
        raise InputError(f"{file}: not a checkpoint ncz can read (expected a torch.save state_dict, "
                         "a .safetensors file or a Hugging Face model folder)") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors: dict[str, torch.Tensor] = {}
    _flatten(obj, "", tensors, file)
    if not tensors:
        raise InputError(f"{file}: holds no tensors")
    for name, tensor in tensors.items():
        check_tensor(name, tensor, file)
    return (list(tensors), {k: (lambda t=t: t) for k, t in tensors.items()}, _shared_storage_notes(tensors, file),
            {k: t.numel() * t.element_size() for k, t in tensors.items()})


def open_checkpoint(path: str | Path) -> TensorSource:
    """A checkpoint file (``.safetensors``, ``.pt``/``.pth``/``.bin``) or a
    Hugging Face model folder (``model.safetensors``, sharded or not, else
    ``pytorch_model.bin``)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            names, loaders, notes, sizes = _from_safetensors(_shards(index))
        elif (path / "model.safetensors").exists():
            names, loaders, notes, sizes = _from_safetensors([path / "model.safetensors"])
        elif (path / "pytorch_model.bin").exists():
            names, loaders, notes, sizes = _from_state_dict(path / "pytorch_model.bin")
        else:
            raise InputError(f"{path}: folder has no model.safetensors or pytorch_model.bin")
    elif path.suffix == ".safetensors":
        names, loaders, notes, sizes = _from_safetensors([path])
    else:
        with open(path, "rb") as handle:
            magic = handle.read(8)
        header_length = int.from_bytes(magic, "little") if len(magic) == 8 else None  # safetensors starts with it
        pickled_suffix = path.suffix in (".pt", ".pth", ".bin", ".ckpt")
        if magic[:1] == b"{" or (header_length is not None and header_length < 100_000_000 and not pickled_suffix):
            names, loaders, notes, sizes = _from_safetensors([path])
        else:
            names, loaders, notes, sizes = _from_state_dict(path)
    for name in names:
        check_name(name, path)
    return TensorSource(path, names, loaders, notes, sizes)


def _shards(index: Path) -> list[Path]:
    """The shard files a sharded safetensors index names, each inside the index's folder."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{index}: not a valid safetensors index (needs a weight_map object)") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index}: weight_map must map tensor names to shard file names (strings)")
    shards = []
    for shard in sorted(set(weight_map.values())):
        # a bare file name: no folders, no '..', nothing absolute (symlinks, as in the
        # Hugging Face cache, are the owner's business and are followed)
        if not shard or shard in (".", "..") or any(c in shard for c in "/\\\0") or Path(shard).is_absolute():
            raise InputError(f"{index}: shard {shard!r} is not a file name inside {index.parent}")
        shards.append(index.parent / shard)
    return shards
