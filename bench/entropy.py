"""Entropy-coding throughput and overhead; prints JSON (and writes bench/results/entropy.json).

    python bench/entropy.py [--sizes 1000000 10000000] [--repeat 3]

For each size, on the same symbols in one run:
- categorical: Laplace-distributed integers (like quantized weights), one fitted table;
- conditional: latents drawn from per-symbol Gaussians with spread means and scales
  (like a hyperprior's y), coded through the fixed grid.
Coders: ncz ANS and range; constriction's batch API called directly (categorical
model / QuantizedGaussian with per-symbol parameters); CompressAI's rANS
(``compressai.ans``, 16-bit CDFs, as CompressAI calls it: Python lists); zstd -3/-19
on the int32 bytes. Overhead is measured against the information content under
ncz's own integer model. Times are best of --repeat; Msym/s = symbols / seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import numpy as np

from ncz.format import entropy as E
from ncz.format.entropy_tables import GRID_V1, Family


def best(fn, repeat):
    out, times = None, []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, min(times)


def load_compressai_ans():
    """compressai's package __init__ imports torchvision (broken beside CPU torch):
    load only its rANS extension module."""
    spec = importlib.util.find_spec("compressai")
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = types.ModuleType("compressai")
    pkg.__path__ = list(spec.submodule_search_locations)
    saved = sys.modules.get("compressai")
    sys.modules["compressai"] = pkg
    try:
        import compressai.ans as ans
        return ans
    except ImportError:
        return None
    finally:
        if saved is not None:
            sys.modules["compressai"] = saved


def to_cdf16(freqs24: np.ndarray) -> list[int]:
    """A 24-bit table as a 16-bit CDF for CompressAI (every symbol keeps mass >= 1)."""
    n = freqs24.size
    f = 1 + np.floor(freqs24 / freqs24.sum() * ((1 << 16) - n)).astype(np.int64)
    f[int(np.argmax(f))] += (1 << 16) - int(f.sum())
    return [0] + np.cumsum(f).tolist()


def row(name, n, stream_bytes, enc_s, dec_s, info_bits, ok):
    return {"coder": name, "bytes": int(stream_bytes), "bits_per_symbol": stream_bytes * 8 / n,
            "overhead_vs_information": (stream_bytes * 8 - info_bits) / info_bits if info_bits else None,
            "encode_Msym_s": n / enc_s / 1e6 if enc_s else None, "decode_Msym_s": n / dec_s / 1e6 if dec_s else None,
            "roundtrip_ok": bool(ok)}


def bench_size(n, repeat, ans_mod):
    import constriction
    import zstandard

    rng = np.random.default_rng(0)
    results = {}

    # ---- categorical
    symbols = np.round(rng.laplace(0, 3, n)).astype(np.int32)
    model = E.CategoricalModel.fit(symbols)
    info = E.information(symbols, model)
    rows = []
    for coder in (E.Coder.ANS, E.Coder.RANGE):
        stream, te = best(lambda: E.encode(symbols, model, coder), repeat)
        out, td = best(lambda: E.decode(stream, model, n, coder), repeat)
        rows.append(row(f"ncz_{coder.value}", n, len(stream), te, td, info, np.array_equal(out, symbols)))
    cmodel = constriction.stream.model.Categorical(model.table.probabilities, perfect=False)
    idx, _ = model.table.to_indices(symbols)

    def c_enc():
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(idx, cmodel)
        return coder.get_compressed()

    words, te = best(c_enc, repeat)
    out, td = best(lambda: constriction.stream.stack.AnsCoder(words).decode(cmodel, n), repeat)
    rows.append(row("constriction_ans_direct", n, words.nbytes, te, td, info, np.array_equal(out, idx)))
    if ans_mod is not None:
        cdf = to_cdf16(model.table.freqs)
        rel = (symbols.astype(np.int64) - model.table.lo)

        def ca_enc():
            return ans_mod.RansEncoder().encode_with_indexes(rel.tolist(), [0] * n, [cdf], [len(cdf)], [0])

        data, te = best(ca_enc, repeat)

        def ca_dec():
            return ans_mod.RansDecoder().decode_with_indexes(data, [0] * n, [cdf], [len(cdf)], [0])

        out, td = best(ca_dec, repeat)
        rows.append(row("compressai_rans", n, len(data), te, td, info, np.array_equal(np.array(out), rel)))
    raw = symbols.tobytes()
    for level in (3, 19):
        comp, te = best(lambda: zstandard.ZstdCompressor(level=level).compress(raw), 1 if level == 19 else repeat)
        out, td = best(lambda: zstandard.ZstdDecompressor().decompress(comp), repeat)
        rows.append(row(f"zstd_{level}", n, len(comp), te, td, info, out == raw))
    results["categorical"] = {"information_bits": info, "coders": rows}

    # ---- conditional (mean-scale Gaussian through grid 1)
    means = rng.normal(0, 4, n)
    scales = np.exp(rng.uniform(np.log(0.08), np.log(60), n))
    latents = np.round(rng.normal(means, scales)).astype(np.int32)
    rows = []
    cond, t_model = best(lambda: E.ConditionalModel.from_mean_scale(Family.GAUSSIAN, means, scales), repeat)
    info = E.information(latents, cond)

    def conditional() -> E.ConditionalModel:
        return E.ConditionalModel.from_mean_scale(Family.GAUSSIAN, means, scales)

    for coder in (E.Coder.ANS, E.Coder.RANGE):
        # the model (grid quantization) is part of both encode and decode time
        stream, te = best(lambda: E.encode(latents, conditional(), coder), repeat)
        out, td = best(lambda: E.decode(stream, conditional(), coder=coder), repeat)
        rows.append(row(f"ncz_{coder.value}", n, len(stream), te, td, info, np.array_equal(out, latents)))
    qg = constriction.stream.model.QuantizedGaussian(-(2**15), 2**15)
    m32, s32 = means.astype(np.float64), scales.astype(np.float64)

    def q_enc():
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(latents, qg, m32, s32)
        return coder.get_compressed()

    words, te = best(q_enc, repeat)
    out, td = best(lambda: constriction.stream.stack.AnsCoder(words).decode(qg, m32, s32), repeat)
    rows.append(row("constriction_quantized_gaussian_direct", n, words.nbytes, te, td, info,
                    np.array_equal(out, latents)))
    if ans_mod is not None:
        grid = GRID_V1[Family.GAUSSIAN]
        cdfs = [to_cdf16(grid.table(t).freqs) for t in range(grid.num_tables)]
        lengths = [len(c) for c in cdfs]
        offs = [grid.table(t).lo for t in range(grid.num_tables)]

        def ca_enc():
            m = E.ConditionalModel.from_mean_scale(Family.GAUSSIAN, means, scales)
            rel = latents.astype(np.int64) - m.offsets
            data = ans_mod.RansEncoder().encode_with_indexes(rel.tolist(), m.table_ids.tolist(), cdfs, lengths, offs)
            return data, m, rel

        (data, m, rel), te = best(ca_enc, repeat)

        def ca_dec():
            m2 = E.ConditionalModel.from_mean_scale(Family.GAUSSIAN, means, scales)
            return ans_mod.RansDecoder().decode_with_indexes(data, m2.table_ids.tolist(), cdfs, lengths, offs)

        out, td = best(ca_dec, repeat)
        rows.append(row("compressai_rans", n, len(data), te, td, info, np.array_equal(np.array(out), rel)))
    raw = latents.tobytes()
    comp, te = best(lambda: zstandard.ZstdCompressor(level=19).compress(raw), 1)
    out, td = best(lambda: zstandard.ZstdDecompressor().decompress(comp), repeat)
    rows.append(row("zstd_19", n, len(comp), te, td, info, out == raw))
    results["conditional"] = {"information_bits": info, "grid_quantize_s": t_model, "coders": rows}
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**6, 10**7])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "entropy.json")
    args = parser.parse_args()
    ans_mod = load_compressai_ans()
    report = {"compressai_available": ans_mod is not None,
              "note": "install CompressAI for the comparison with: pip install --no-deps compressai",
              "sizes": {str(n): bench_size(n, args.repeat, ans_mod) for n in args.sizes}}
    text = json.dumps(report, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
