"""Packing and unpacking at LLM scale: speed and peak memory on synthetic Llama-shaped checkpoints.

What is measured, per size (``--sizes``, default ``120m 480m``):

* **Checkpoint**: a Llama-shaped model (token embedding, per layer q/k/v/o and
  gate/up/down projections, RMS norms, untied ``lm_head``) in bf16 safetensors,
  generated deterministically on disk (no download): weights ~ N(0, σ²) with
  log-normal row and column scales (a few columns of small weights, as trained
  projections reading outlier features have), norms ≈ 1. The larger size is
  sharded (``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json``)
  and packs as one archive.
* **Pack**: ``ncz pack FOLDER -o OUT.ncz --preset q8`` (data-free), and the same with
  ``--fast-decode`` (``--variants``), each in a fresh process: wall and CPU seconds, MB/s
  of bf16 input (the checkpoint's tensor bytes), bits per weight.
* **Unpack**: ``ncz.models.unpack(OUT.ncz, OUT.safetensors, workers=N)`` (what ``ncz unpack``
  runs), fresh process: MB/s of output (bf16 safetensors bytes).
* **Memory**: the child's own peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``: interpreter,
  torch and every buffer), its decoder processes' largest peak RSS, and the peak
  proportional set size of all its processes together (sampled); the largest of
  these against the issue's bound 2 × the largest tensor in fp32 + 512 MiB.

The machine is shared (2 cores, other jobs): ``load_average`` is recorded, and
CPU seconds are given beside wall seconds (on an idle 2-core machine the wall time
lies between CPU/2 and CPU).

Usage::

    python bench/scale.py                      # both sizes (~5 min on 2 busy cores)
    python bench/scale.py --sizes 120m         # one size
    python bench/scale.py --keep /tmp/ckpt     # keep the generated checkpoints there

Prints JSON and writes ``bench/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
MiB = 1 << 20


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    shards: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in Hugging Face Llama order and spelling."""
        h, kv = self.hidden, self.hidden * self.kv_heads // self.heads
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "mlp.gate_proj.weight", (self.intermediate, h)),
                    (p + "mlp.up_proj.weight", (self.intermediate, h)),
                    (p + "mlp.down_proj.weight", (h, self.intermediate)),
                    (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def parameters(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors())

    @property
    def largest(self) -> int:
        return max(math.prod(shape) for _, shape in self.tensors())


SIZES = {
    "120m": LlamaShape(hidden=768, intermediate=2048, layers=12, vocab=32000, heads=12, kv_heads=12, shards=1),
    "480m": LlamaShape(hidden=1024, intermediate=2816, layers=32, vocab=32000, heads=16, kv_heads=16, shards=4),
}


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (uint16), round to nearest even."""
    u = values.astype(np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def _tensor_rows(name: str, shape: tuple[int, ...], chunk_rows: int = 2048):
    """The bf16 bits of one synthetic tensor, in chunks of rows (seeded by its name: deterministic)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if len(shape) == 1:
        yield _bf16_bits(1.0 + 0.05 * rng.standard_normal(shape[0], dtype=np.float32))
        return
    rows, cols = shape
    sigma = np.float32(0.02 if "embed" in name or "lm_head" in name else 1.0 / math.sqrt(cols))
    col_scale = np.exp(0.3 * rng.standard_normal(cols)).astype(np.float32)
    col_scale[rng.choice(cols, size=max(1, cols // 256), replace=False)] *= np.float32(0.1)  # outlier features
    for start in range(0, rows, chunk_rows):
        n = min(chunk_rows, rows - start)
        row_scale = np.exp(0.2 * rng.standard_normal((n, 1))).astype(np.float32)
        block = rng.standard_normal((n, cols), dtype=np.float32)
        block *= sigma * row_scale * col_scale
        yield _bf16_bits(block).ravel()


def _write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]]) -> None:
    header, offset = {}, 0
    for name, shape in tensors:
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as handle:
        handle.write(len(blob).to_bytes(8, "little") + blob)
        for name, shape in tensors:
            for chunk in _tensor_rows(name, shape):
                handle.write(chunk.tobytes())


def make_checkpoint(folder: Path, shape: LlamaShape) -> int:
    """Write the checkpoint into ``folder`` (sharded with an index when ``shape.shards`` > 1); returns its bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = shape.tensors()
    if shape.shards == 1:
        _write_safetensors(folder / "model.safetensors", tensors)
    else:
        total = sum(math.prod(s) for _, s in tensors)
        bounds, acc, shard = [], 0, 0
        for _, s in tensors:  # split by cumulative size, whole tensors per shard
            bounds.append(min(shape.shards - 1, acc * shape.shards // total))
            acc += math.prod(s)
        weight_map = {}
        for shard in range(shape.shards):
            file = f"model-{shard + 1:05d}-of-{shape.shards:05d}.safetensors"
            members = [t for t, b in zip(tensors, bounds) if b == shard]
            _write_safetensors(folder / file, members)
            weight_map.update({name: file for name, _ in members})
        index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
        "vocab_size": shape.vocab, "torch_dtype": "bfloat16", "note": "synthetic weights (ncz bench/scale.py)"}),
        encoding="utf-8")
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _tree_pss_kib(root: int) -> int:
    """Proportional set size of ``root`` and its descendants (KiB): pages shared after fork() counted
    once in all, where summing RSS would count them once per process."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as handle:
                total += next(int(line.split()[1]) for line in handle if line.startswith("Pss:"))
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as handle:
                    todo += [int(child) for child in handle.read().split()]
        except (OSError, StopIteration, ValueError):  # it ended meanwhile
            continue
    return total


def run_child(code: str, threads: int) -> dict[str, float]:
    """Wall seconds, CPU seconds and peak memory of ``code`` in a fresh Python process: its own peak RSS
    (RUSAGE_SELF), the largest of its worker processes' (RUSAGE_CHILDREN), and the peak proportional set
    size of the whole process tree, sampled every 100 ms (what all its processes held together)."""
    wrapper = (f"import sys,resource,torch;torch.set_num_threads({threads});{code};"
               "u=resource.getrusage(resource.RUSAGE_SELF);c=resource.getrusage(resource.RUSAGE_CHILDREN);"
               "print('RUSAGE',u.ru_maxrss,u.ru_utime+u.ru_stime,c.ru_maxrss,c.ru_utime+c.ru_stime)")
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", wrapper], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    tree_peak = 0
    while child.poll() is None:
        tree_peak = max(tree_peak, _tree_pss_kib(child.pid))
        time.sleep(0.1)
    wall = time.perf_counter() - start
    stdout, stderr = child.communicate()
    if child.returncode:
        raise RuntimeError(f"{code} failed ({child.returncode}): {stderr.strip()[-2000:]}")
    line = next(ln for ln in stdout.splitlines() if ln.startswith("RUSAGE"))
    _, rss_kib, cpu, child_rss_kib, child_cpu = line.split()
    result = {"wall_s": wall, "cpu_s": float(cpu) + float(child_cpu), "peak_rss_MiB": int(rss_kib) / 1024,
              "peak_tree_pss_MiB": tree_peak / 1024}
    if int(child_rss_kib):
        result.update({"worker_processes_peak_rss_MiB": int(child_rss_kib) / 1024, "own_cpu_s": float(cpu)})
    return result


def _peak_MiB(run: dict[str, float]) -> float:
    """The memory held at the worst moment: the largest single process, or all of them together."""
    return max(run["peak_rss_MiB"], run.get("worker_processes_peak_rss_MiB", 0), run["peak_tree_pss_MiB"])


# what is packed: the q8 preset as it ships (indices ANS-coded, the smallest), and with --fast-decode
# (indices as bytes under zstd, FORMAT.md §5.4 format 1.2: ~1 % larger, unpacked several times faster)
VARIANTS = {"q8": [], "q8 --fast-decode": ["--fast-decode"]}


def memory_bound_MiB(shape: LlamaShape) -> float:
    """The issue's bound on peak memory: 2 × the largest tensor in fp32 + 512 MiB."""
    return 2 * 4 * shape.largest / MiB + 512


def measure_variant(ckpt: Path, work: Path, flags: list[str], shape: LlamaShape, threads: int, workers: int,
                    log) -> dict:
    """Pack ``ckpt`` with ``ncz pack --preset q8 FLAGS`` and unpack the archive, each in a fresh process."""
    label = " ".join(["q8", *flags])
    archive, restored = work / "model.ncz", work / "restored.safetensors"
    pack_args = ["pack", str(ckpt), "-o", str(archive), "--preset", "q8", *flags, "--workers", str(workers), "-q"]
    pack = run_child(f"from ncz.tools.cli import main;rc=main({pack_args!r});rc and sys.exit(rc)", threads)
    log(f"{ckpt.name} {label}: pack {pack['wall_s']:.1f} s wall / {pack['cpu_s']:.1f} s cpu, "
        f"{pack['peak_rss_MiB']:.0f} MiB")
    archive_bytes = archive.stat().st_size
    unpack = run_child(f"from ncz.models import unpack;unpack({str(archive)!r},{str(restored)!r},"
                       f"workers={workers})", threads)
    log(f"{ckpt.name} {label}: unpack {unpack['wall_s']:.1f} s wall / {unpack['cpu_s']:.1f} s cpu, "
        f"{unpack['peak_rss_MiB']:.0f} MiB")
    output_bytes = restored.stat().st_size
    archive.unlink()
    restored.unlink()
    bound = memory_bound_MiB(shape)
    for run, mb in ((pack, 2 * shape.parameters / 1e6), (unpack, output_bytes / 1e6)):
        run["MBps_wall"] = mb / run["wall_s"]
        run["MBps_cpu_one_core"] = mb / run["cpu_s"]
        run["MBps_cpu_2cores_ideal"] = mb / (run["cpu_s"] / 2)  # both cores busy all along: an upper bound
    return {"archive_bytes": archive_bytes, "bits_per_weight": 8 * archive_bytes / shape.parameters,
            "output_bytes": output_bytes, "pack": pack, "unpack": unpack,
            "targets": {"pack_ge_40MBps_wall": pack["MBps_wall"] >= 40,
                        "unpack_ge_150MBps_wall": unpack["MBps_wall"] >= 150,
                        "pack_memory_within_bound": _peak_MiB(pack) <= bound,
                        "unpack_memory_within_bound": _peak_MiB(unpack) <= bound}}


def measure(name: str, shape: LlamaShape, folder: Path, threads: int, workers: int, log,
            variants: list[str]) -> dict:
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        ckpt = folder / name
        if not (ckpt / "config.json").exists():
            start = time.perf_counter()
            make_checkpoint(ckpt, shape)
            log(f"{name}: checkpoint written in {time.perf_counter() - start:.1f} s")
        measured = {v: measure_variant(ckpt, Path(tmp), VARIANTS[v], shape, threads, workers, log) for v in variants}
    return {"shape": shape.__dict__, "parameters": shape.parameters, "largest_tensor": shape.largest,
            "input_bf16_bytes": 2 * shape.parameters, "memory_bound_MiB": memory_bound_MiB(shape),
            "variants": measured}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the children")
    parser.add_argument("--workers", type=int, default=2, help="ncz pack --workers")
    parser.add_argument("--keep", type=Path, help="folder for the generated checkpoints (kept; reused when present)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    results = {"load_average_start": os.getloadavg()[0], "threads": args.threads, "workers": args.workers,
               "cores": os.cpu_count(), "preset": "q8 (data-free)", "sizes": {}}
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        log(f"note: load average {os.getloadavg()[0]:.1f}: wall times will not be those of an idle machine")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        for name in args.sizes:
            results["sizes"][name] = measure(name, SIZES[name], folder, args.threads, args.workers, log,
                                             args.variants)
    results["load_average_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
