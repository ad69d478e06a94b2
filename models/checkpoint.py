"""Safe loading of checkpoints: safetensors, state_dict files, Hugging Face folders.

Nothing is unpickled beyond what ``torch.load(weights_only=True)`` allows: a
checkpoint that needs arbitrary objects is refused with a clear message. Tensors
are yielded one at a time (safetensors and ``mmap=True`` state dicts are read
lazily), so packing streams a large model.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ncz.format import InputError

__all__ = ["TensorSource", "open_checkpoint"]


@dataclass
class TensorSource:
    """Names and lazily loaded tensors of a checkpoint, in file order."""

    path: Path
    names: list[str]
    _loaders: dict

    def load(self, name: str) -> torch.Tensor:
        return self._loaders[name]()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.load(name)

    def __len__(self) -> int:
        return len(self.names)


def _from_safetensors(files: list[Path]) -> tuple[list[str], dict]:
    from safetensors import safe_open

    names, loaders = [], {}
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt")
            keys = list(handle.keys())
        except Exception as exc:  # safetensors raises its own SafetensorError and OSError
            raise InputError(f"{file}: not a readable safetensors file ({exc})") from exc
        for key in keys:
            if key in loaders:
                raise InputError(f"{file}: tensor {key!r} appears in two shards")
            names.append(key)
            loaders[key] = (lambda h=handle, k=key: h.get_tensor(k))
    return names, loaders


def _flatten(obj, prefix: str, out: dict, where: Path) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out, where)
    # other leaves (ints, strings, optimizer hyper-parameters) carry no weights: skipped


def _from_state_dict(file: Path) -> tuple[list[str], dict]:
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise InputError(
            f"{file}: refused: loading it would unpickle arbitrary Python objects{what}; only plain tensors "
            "are accepted (torch.load weights_only=True): save a state_dict or safetensors instead") from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise InputError(f"{file}: not a readable PyTorch checkpoint ({str(exc).splitlines()[0]})") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors: dict[str, torch.Tensor] = {}
    _flatten(obj, "", tensors, file)
    if not tensors:
        raise InputError(f"{file}: holds no tensors")
    return list(tensors), {k: (lambda t=t: t) for k, t in tensors.items()}


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
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as exc:
                raise InputError(f"{index}: not a valid safetensors index ({exc})") from exc
            names, loaders = _from_safetensors([path / s for s in shards])
        elif (path / "model.safetensors").exists():
            names, loaders = _from_safetensors([path / "model.safetensors"])
        elif (path / "pytorch_model.bin").exists():
            names, loaders = _from_state_dict(path / "pytorch_model.bin")
        else:
            raise InputError(f"{path}: folder has no model.safetensors or pytorch_model.bin")
    elif path.suffix == ".safetensors":
        names, loaders = _from_safetensors([path])
    else:
        with open(path, "rb") as handle:
            magic = handle.read(8)
        if magic[:1] == b"{" or (len(magic) == 8 and int.from_bytes(magic, "little") < 100_000_000 and path.suffix not in (".pt", ".pth", ".bin", ".ckpt")):
            names, loaders = _from_safetensors([path])
        else:
            names, loaders = _from_state_dict(path)
    for name in names:
        if "#" in name:
            raise InputError(f"{path}: tensor name {name!r} contains '#', which ncz reserves for parts")
    return TensorSource(path, names, loaders)
