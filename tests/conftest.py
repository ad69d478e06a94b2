"""Shared helpers: paths to shared data, and a forger for hostile files."""

from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path
from types import ModuleType

import msgpack
import pytest

from ncz.format import canonical
from ncz.format.checksum import xxh3_64
from ncz.format.container import FOOTER, PRELUDE, PRELUDE_COVERED

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
VECTORS = REPO / "tests" / "vectors"


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for tests of small models and ops: on a shared 2-core machine OpenMP's
    barriers made two threads many times slower than one (MS-SSIM: 1.6 s of CPU against 0.06 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_bench(name: str) -> ModuleType:
    """``bench/<name>.py`` executed afresh as module ``bench_<name>`` (registered in ``sys.modules``:
    dataclasses look their module up while a class is built)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the shared datasets next to the repo); not present here")
    return path


def split(data: bytes) -> tuple[dict, list, bytes]:
    """(header, table, payload region) of a well-formed file."""
    _, _, _, header_length, _ = PRELUDE.unpack_from(data, 0)
    header = msgpack.unpackb(data[PRELUDE.size:PRELUDE.size + header_length])
    table_offset, table_length, _, _ = FOOTER.unpack_from(data, len(data) - FOOTER.size)
    table = msgpack.unpackb(data[table_offset:table_offset + table_length])
    return header, table, data[PRELUDE.size + header_length:table_offset]


def forge(*, header: dict | bytes, table: list | bytes, payloads: bytes, major: int = 1, minor: int = 0,
          magic: bytes = b"\x89NCZ\r\n\x1a\n", fix_offsets: bool = False) -> bytes:
    """Assemble a file with *valid checksums* around arbitrary content, so a test
    reaches the rule it targets instead of failing on a checksum."""
    header_bytes = header if isinstance(header, bytes) else canonical.pack(header)
    table_bytes = table if isinstance(table, bytes) else canonical.pack(table)
    head = struct.pack("<8sHHI", magic, major, minor, len(header_bytes))
    prelude = head + struct.pack("<Q", xxh3_64(head[:PRELUDE_COVERED] + header_bytes))
    body = prelude + header_bytes + payloads
    return body + table_bytes + FOOTER.pack(len(body), len(table_bytes), xxh3_64(table_bytes), b"NCZTABLE")


def reforge(data: bytes, mutate_table=None, mutate_header=None, payloads: bytes | None = None, **kw) -> bytes:
    header, table, region = split(data)
    if mutate_header:
        header = mutate_header(header)
    if mutate_table:
        table = mutate_table(table)
    return forge(header=header, table=table, payloads=region if payloads is None else payloads, **kw)
