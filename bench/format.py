"""Container throughput and overhead against safetensors; prints JSON.

    python bench/format.py [--mib 256] [--tensors 16] [--repeat 3]

Write and read 256 MiB of float32 tensors (raw and zstd sections) and the same
tensors with safetensors, in one run, page cache warm (best of --repeat).
"Read" means: open the file and load every tensor into process memory
(``clone()``, as loading into a model does), ncz also verifying each section's
xxh3-64 on the way; "lazy open" gets the tensor objects without touching bytes. Also reports the fixed
overhead of an empty archive and the per-section overhead.
Targets (issue 2): raw mmap read within 10% of safetensors or faster; fixed
overhead < 512 bytes + 64 bytes per section.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import ncz.format as nf

warnings.filterwarnings("ignore", message="The given buffer is not writable")


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--zstd-level", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    per = args.mib * (1 << 20) // 4 // args.tensors
    # trained-weight-like values: normal with a few bits of mantissa noise
    arrays = {f"layer{i}.weight": (rng.standard_normal(per) * 0.02).astype(np.float32) for i in range(args.tensors)}
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    total = sum(a.nbytes for a in arrays.values())
    results: dict[str, object] = {"total_bytes": total, "tensors": args.tensors, "repeat": args.repeat}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def write_ncz(codec: nf.Codec, path: Path, durable: bool = True) -> None:
            options = {"level": args.zstd_level} if codec == nf.Codec.ZSTD else None
            with nf.Writer(path, durable=durable) as writer:
                for name, array in arrays.items():
                    writer.add(name, array.data, kind=nf.Kind.TENSOR, codec=codec, options=options,
                               params={"dtype": "float32", "shape": list(array.shape)})

        def read_ncz(path: Path, touch: bool = True) -> None:
            # touch: verify checksums (reads every byte) and sum every tensor
            with nf.open(path) as reader:
                for info in reader.sections:
                    if info.codec == nf.Codec.RAW:
                        tensor = torch.frombuffer(reader.view(info.name, verify=touch), dtype=torch.float32)
                    else:
                        tensor = torch.frombuffer(bytearray(reader.read(info.name)), dtype=torch.float32)
                    tensor.clone() if touch else float(tensor[-1])
                    del tensor

        def read_safetensors(path: Path, touch: bool = True) -> None:
            loaded = load_file(str(path))
            for tensor in loaded.values():
                tensor.clone() if touch else float(tensor[-1])

        def mbps(seconds: float) -> float:
            return round(total / seconds / 1e6, 1)

        rows = {}
        for label, codec in [("ncz_raw", nf.Codec.RAW), ("ncz_zstd", nf.Codec.ZSTD)]:
            path = tmp / f"{label}.ncz"
            rows[label] = {
                "write_MBps_fsync": mbps(_best(lambda: write_ncz(codec, path), args.repeat)),
                "write_MBps": mbps(_best(lambda: write_ncz(codec, path, durable=False), args.repeat)),
                "read_MBps_all_bytes": mbps(_best(lambda: read_ncz(path), args.repeat)),
                "open_MBps_lazy": mbps(_best(lambda: read_ncz(path, touch=False), args.repeat)),
                "file_bytes": os.path.getsize(path),
            }
        path = tmp / "st.safetensors"
        rows["safetensors"] = {
            "write_MBps": mbps(_best(lambda: save_file(tensors, str(path)), args.repeat)),
            "read_MBps_all_bytes": mbps(_best(lambda: read_safetensors(path), args.repeat)),
            "open_MBps_lazy": mbps(_best(lambda: read_safetensors(path, touch=False), args.repeat)),
            "file_bytes": os.path.getsize(path),
        }
        results["throughput"] = rows
        # the comparison that matters: every byte read, ncz also verifying checksums
        ncz_raw, safetensors = rows["ncz_raw"], rows["safetensors"]
        results["raw_read_vs_safetensors"] = ncz_raw["read_MBps_all_bytes"] / safetensors["read_MBps_all_bytes"]
        results["raw_lazy_open_vs_safetensors"] = ncz_raw["open_MBps_lazy"] / safetensors["open_MBps_lazy"]

    def size_of(count: int, payload: int) -> int:
        buffer = io.BytesIO()
        with nf.Writer(buffer) as writer:
            for i in range(count):
                writer.add(f"t{i:04d}", bytes(payload), kind=nf.Kind.TENSOR,
                           params={"dtype": "uint8", "shape": [payload]})
        return len(buffer.getvalue())

    empty = size_of(0, 0)
    # payloads a multiple of 64 so alignment padding is not counted as overhead
    many = size_of(1000, 256)
    per_section = (many - empty - 1000 * 256) / 1000
    results["overhead"] = {"empty_archive_bytes": empty, "per_section_bytes": per_section,
                           "per_section_bytes_unaligned_payload": (size_of(1000, 200) - empty - 200_000) / 1000}
    results["targets"] = {
        "raw_read_within_10pct_of_safetensors": results["raw_read_vs_safetensors"] >= 0.9,
        "fixed_overhead_lt_512": empty < 512,
        "per_section_lt_64": per_section < 64,
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
