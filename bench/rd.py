"""Rate-distortion benchmark of the ncz image codec against JPEG, WebP, AVIF and JPEG XL on Kodak.

For every codec and quality setting, every image is encoded to a real file and
decoded back, and the benchmark records, averaged over the images:

* ``bpp``: bits per pixel from the WHOLE file size (ncz: a complete ``.ncz``
  written with :class:`ncz.format.Writer` + :func:`ncz.codec.write_image_section`,
  container header and section table included; others: the bytes Pillow writes);
* ``psnr``: PSNR on 8-bit RGB (MSE over the three channels), mean of the
  per-image PSNRs; ``psnr_of_mean_mse``: PSNR of the mean MSE;
* ``ms_ssim``: 5-scale MS-SSIM (Wang, Simoncelli & Bovik 2003) on RGB, see
  :func:`ms_ssim`; ``ms_ssim_db`` = -10·log10(1 - MS-SSIM);
* ``enc_s`` / ``dec_s``: wall seconds per image (encode: pixels in memory ->
  file on disk; decode: file on disk -> pixels in memory), and ``enc_cpu_s`` /
  ``dec_cpu_s``: CPU seconds of this process for the same work (all threads),
  which is less sensitive to other load on the machine.

Codecs and settings (recorded in the JSON under each codec's ``effort``):

* ``ncz``: the codec's quality levels (default: every integer level of the model),
  with each encoder effort of ``--effort``: ``fast`` (the amortized encoder, codec
  ``ncz``), ``sga`` (the tuned SGA schedule, ``SGASchedule.default()``, codec
  ``ncz-sga``), ``sga:N`` (that schedule stretched to N iterations, ``ncz-sgaN``),
  ``paper`` / ``paper:N`` (Yang, Bamler & Mandt 2020's schedule, 2,000 iterations
  unless N is given, ``ncz-paperN``); each effort gets BD-rates against ``ncz``
  from the real file sizes;
* ``jpeg``: Pillow / libjpeg-turbo, 4:2:0, optimized Huffman tables;
* ``webp``: Pillow / libwebp, method 4 (the default), 4:2:0 (lossy VP8);
* ``avif``: Pillow's native AVIF (libavif + aom), speed 4, 4:4:4 (avifenc's
  default for RGB input), full range;
* ``jxl``: ``pillow-jxl-plugin`` (libjxl), effort 7 (the default).

Every codec runs with ``--threads`` threads (default 2): torch for ncz, aom /
libjxl threads for AVIF / JPEG XL (JPEG and WebP are single-threaded).

BD-rate (Bjøntegaard 2001, VCEG-M33) of ncz against each other codec: log10(rate)
is interpolated as a function of PSNR with a monotone piecewise-cubic (PCHIP,
as in the common reference implementations) -- and, for comparison, the
original cubic-polynomial fit -- integrated over the overlapping PSNR interval
only, and the mean difference turned into a percentage (negative = ncz needs
fewer bits for the same PSNR). When the PSNR ranges overlap little the number
is flagged (``overlap_db`` / ``note``).

MS-SSIM and BD-rate are computed here rather than imported (pytorch-msssim,
bjontegaard): the benchmark then runs on the test extras alone, and both are
small enough to read in full. tests/test_metrics.py holds them to those
libraries (BD-rates identical to 1e-9 on rd_kodak.json, MS-SSIM within 2e-6,
pytorch-msssim's float32 window being the difference) in CI's second step.

Published curves (``bench/reference/*.json``, ``--published``) are drawn dashed
and get BD-rates of their own (``published``): ncz against each, and each
against the codecs measured in this run. They are not measured here; each file
names its source and what its bpp counts.

Usage (from the repository root)::

    python bench/rd.py --data ../shared/data/kodak                  # full run, shipped weights
    python bench/rd.py --data ../shared/data/kodak --images 4 --qualities 0 2 4 --model W.ncz
    python bench/rd.py --data ../shared/data/kodak --markdown docs/RESULTS.md
    python bench/rd.py --from-json bench/results/rd_kodak.json --markdown docs/RESULTS.md  # re-render only
    python bench/rd.py --images 4 --qualities 0 2 4 6 --codecs ncz --effort fast sga --json J  # SGA vs fast
    python bench/rd.py --images 2 --qualities 0 2 4 6 --codecs ncz --effort paper --add-to J --json J
    python bench/rd.py --selftest                                    # MS-SSIM / BD-rate checks

Writes ``bench/results/rd_kodak.json`` and ``bench/results/rd_kodak.png`` and
prints the JSON to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "bench" / "results" / "rd_kodak.json"
DEFAULT_PLOT = REPO / "bench" / "results" / "rd_kodak.png"
PUBLISHED_DIR = REPO / "bench" / "reference"

# Quality sweeps chosen to span ~0.1-2 bpp on Kodak (and a little beyond).
SWEEPS: dict[str, list[int]] = {
# (measured on 4 images: jpeg 0.12-2.2, webp 0.08-1.8, avif 0.09-1.6, jxl 0.16-1.9 bpp).
    "jpeg": [5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90],
    "webp": [0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90],
    "avif": [10, 20, 30, 40, 50, 60, 70, 80],
    "jxl": [5, 10, 20, 30, 40, 50, 60, 70, 80, 90],
}
AVIF_SPEED = 4
AVIF_SUBSAMPLING = "4:4:4"
JXL_EFFORT = 7
WEBP_METHOD = 4


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sibling(name: str):
    """A module of bench/ (not a package), loaded once by path (rd.py also runs as a loaded file)."""
    import importlib.util

    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).resolve().parent / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


_metrics = _sibling("rd_metrics")  # MS-SSIM, PSNR, BD-rate and their self-test
_report = _sibling("rd_report")  # the plot and the Markdown page
GAP_BPP, OTHER_CODECS, markdown, _write_page = (_report.GAP_BPP, _report.OTHER_CODECS, _report.markdown,
                                                _report.write_page)
ms_ssim, mse_rgb, psnr_from_mse, bd_rate, selftest = (_metrics.ms_ssim, _metrics.mse_rgb, _metrics.psnr_from_mse,
                                                      _metrics.bd_rate, _metrics.selftest)


# --------------------------------------------------------------------------
# codecs
# --------------------------------------------------------------------------


class Measure:
    """Wall and CPU time of a block."""

    def __enter__(self) -> Measure:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


Encoder = Callable[[np.ndarray, int], bytes]
Decoder = Callable[[bytes], np.ndarray]


def _pil_codec(name: str, threads: int) -> tuple[Encoder, Decoder, str, str]:
    """(encode(rgb, q) -> bytes, decode(bytes) -> rgb, effort description, library version)."""
    from PIL import Image
    from PIL import features as pil_features

    def decode(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im.convert("RGB") if im.mode != "RGB" else im)

    def saver(fmt: str, **opts: Any) -> Callable[[np.ndarray, int], bytes]:
        def encode(rgb: np.ndarray, q: int) -> bytes:
            buf = io.BytesIO()
            Image.fromarray(rgb, "RGB").save(buf, format=fmt, quality=int(q), **opts)
            return buf.getvalue()
        return encode

    if name == "jpeg":
        version = f"libjpeg-turbo {pil_features.version('libjpeg_turbo')}" if pil_features.check("libjpeg_turbo") \
            else f"libjpeg {pil_features.version('jpg')}"
        return saver("JPEG", subsampling="4:2:0", optimize=True), decode, \
            "Pillow JPEG, 4:2:0, optimize=True (Huffman tables), baseline", version
    if name == "webp":
        return saver("WEBP", method=WEBP_METHOD), decode, f"method {WEBP_METHOD} (default), lossy, 4:2:0", \
            f"libwebp {pil_features.version('webp')}"
    if name == "avif":
        if not pil_features.check("avif"):
            try:
                import pillow_avif  # noqa: F401  (registers the plugin)
            except ImportError as exc:
                raise RuntimeError("AVIF needs Pillow >= 11.3 built with libavif, "
                                   "or `pip install pillow-avif-plugin`") from exc
        from PIL import _avif  # type: ignore[attr-defined]

        versions = _avif.codec_versions() if hasattr(_avif, "codec_versions") else ""
        return saver("AVIF", speed=AVIF_SPEED, subsampling=AVIF_SUBSAMPLING, range="full", max_threads=threads), \
            decode, f"speed {AVIF_SPEED}, {AVIF_SUBSAMPLING}, full range, max_threads {threads}", \
            f"libavif {pil_features.version('avif')} ({versions})"
    if name == "jxl":
        try:
            import pillow_jxl  # noqa: F401  (registers the plugin)
            from pillow_jxl import JpegXLImagePlugin
        except ImportError as exc:
            raise RuntimeError("JPEG XL needs `pip install pillow-jxl-plugin`") from exc
        JpegXLImagePlugin.DECODE_THREADS = threads
        return saver("JXL", effort=JXL_EFFORT, num_threads=threads), decode, \
            f"effort {JXL_EFFORT} (default), lossy (VarDCT, XYB), bare codestream, num_threads {threads}", \
            _jxl_version()
    raise ValueError(name)


def _jxl_version() -> str:
    from importlib.metadata import version

    text = f"pillow-jxl-plugin {version('pillow-jxl-plugin')}"
    try:  # the plugin bundles libjxl through the jpegxl-rs crate; its build string names the libjxl version
        import pillow_jxl

        so = next(Path(pillow_jxl.__file__).parent.glob("pillow_jxl*.so"))
        m = re.search(rb"jpegxl-rs-[0-9.]+\+libjxl-[0-9.]+", so.read_bytes())
        if m:
            text += f" ({m.group().decode()})"
    except (StopIteration, OSError):
        pass
    return text


def _lib_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _new_entry(effort: str, version: str) -> dict[str, Any]:
    return {"effort": effort, "version": version, "quality": [], "bpp": [], "psnr": [], "psnr_of_mean_mse": [],
            "ms_ssim": [], "ms_ssim_db": [], "enc_s": [], "dec_s": [], "enc_cpu_s": [], "dec_cpu_s": [],
            "per_image": []}


def _append(entry: dict[str, Any], quality: float, rows: list[dict[str, float]]) -> None:
    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows]))

    mses = [r["mse"] for r in rows]
    entry["quality"].append(quality)
    entry["bpp"].append(mean("bpp"))
    entry["psnr"].append(mean("psnr"))
    entry["psnr_of_mean_mse"].append(psnr_from_mse(float(np.mean(mses))))
    entry["ms_ssim"].append(mean("ms_ssim"))
    entry["ms_ssim_db"].append(-10.0 * math.log10(max(1.0 - entry["ms_ssim"][-1], 1e-12)))
    for key in ("enc_s", "dec_s", "enc_cpu_s", "dec_cpu_s"):
        entry[key].append(mean(key))
    entry["per_image"].append({k: [round(r[k], 6) if r[k] is not None and math.isfinite(r[k]) else None for r in rows]
                               for k in PER_IMAGE})


PER_IMAGE = ("bpp", "psnr", "ms_ssim", "enc_s", "dec_s", "enc_cpu_s", "dec_cpu_s")


def _subset(entry: dict[str, Any], indices: list[int]) -> dict[str, Any]:
    """``entry`` averaged over some of its images only (from ``per_image``; CPU seconds when they were kept)."""
    out = _new_entry(entry["effort"], entry["version"])
    for qi, q in enumerate(entry["quality"]):
        per = entry["per_image"][qi]
        rows = [{**{k: per[k][i] if k in per and per[k][i] is not None else math.nan for k in PER_IMAGE},
                 "mse": 10.0 ** (-per["psnr"][i] / 10.0) * 255.0 ** 2} for i in indices]
        _append(out, q, rows)
        for key in ("enc_cpu_s", "dec_cpu_s"):
            if not math.isfinite(out[key][-1]):
                out[key][-1] = None
    return out


def _on_images(entry: dict[str, Any], names: list[str], wanted: list[str] | None) -> dict[str, Any]:
    """``entry`` (measured on ``names``) averaged over the images ``wanted`` (None or the same: unchanged)."""
    if wanted is None or wanted == names:
        return entry
    return _subset(entry, [names.index(n) for n in wanted])


def _row(original: np.ndarray, decoded: np.ndarray, nbytes: int, enc: Measure, dec: Measure) -> dict[str, float]:
    if decoded.shape != original.shape:
        raise RuntimeError(f"decoded shape {decoded.shape} != original {original.shape}")
    mse = mse_rgb(original, decoded)
    h, w = original.shape[:2]
    return {"bpp": 8.0 * nbytes / (h * w), "mse": mse, "psnr": psnr_from_mse(mse),
            "ms_ssim": ms_ssim(original, decoded), "enc_s": enc.wall, "dec_s": dec.wall, "enc_cpu_s": enc.cpu,
            "dec_cpu_s": dec.cpu}


def export_checkpoint(checkpoint: Path, output: Path, calibration_dir: Path, crops: int = 2) -> Path:
    """Export a training checkpoint (``codec/train.py`` format) to a weights file for benchmarking.

    Uses ``ncz.tools.export_codec`` when present (the project's exporter);
    otherwise calibrates the integer hyper-synthesis on ``crops`` 256x256
    centre crops of the first training images (never Kodak).
    """
    try:
        from ncz.tools.export_codec import main as export_main
    except ImportError:
        export_main = None
    if export_main is not None:
        log(f"rd: exporting {checkpoint} with ncz.tools.export_codec")
        if export_main([str(checkpoint), "-o", str(output), "--calibration", str(calibration_dir),
                        "--images", str(crops)]) != 0:
            raise SystemExit(f"{checkpoint}: export failed")
        return output
    from PIL import Image

    from ncz.codec import CodecConfig, export_codec
    from ncz.codec.architectures import build_codec

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    net = build_codec(CodecConfig.from_dict(state["model_config"]))
    net.load_state_dict(state["model"])
    files = sorted(f for f in calibration_dir.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))[:crops]
    calibration = []
    for f in files:
        with Image.open(f) as im:
            rgb = np.asarray(im.convert("RGB"))
        h, w = rgb.shape[:2]
        top, left = max((h - 256) // 2, 0), max((w - 256) // 2, 0)
        crop = rgb[top:top + 256, left:left + 256]
        if crop.shape[:2] == (256, 256):
            calibration.append(torch.from_numpy(crop.copy()).permute(2, 0, 1).float().div(255.0)[None])
    if not calibration:
        raise SystemExit(f"no 256x256 calibration crops in {calibration_dir}")
    log(f"rd: exporting {checkpoint} (step {state.get('step')}) to {output}")
    return export_codec(net.eval(), output, calibration, step=state.get("step"))


def effort_schedule(effort: str, time_budget: float | None = None) -> tuple[str, Any]:
    """(codec name, SGA schedule or None) of an ``--effort`` value: fast, sga, sga:N, paper, paper:N."""
    from ncz.codec.refine import SGASchedule

    kind, _, count = effort.partition(":")
    if not (kind in ("fast", "sga", "paper") and (count == "" or (count.isdigit() and kind != "fast"))):
        raise SystemExit(f"--effort {effort!r}: expected fast, sga, sga:N, paper or paper:N")
    if kind == "fast":
        return "ncz", None
    if kind == "sga":
        schedule = SGASchedule.default()
        name = "ncz-sga"
        if count:
            schedule, name = dataclasses.replace(schedule, iterations=int(count)), f"ncz-sga{int(count)}"
    else:
        schedule = SGASchedule.paper(int(count)) if count else SGASchedule.paper()
        name = f"ncz-paper{schedule.iterations}"
    if time_budget is not None:
        schedule, name = dataclasses.replace(schedule, time_budget=time_budget), f"{name}-{time_budget:g}s"
    return name, schedule


def describe_schedule(schedule: Any) -> str:
    """One line on what an SGA schedule does."""
    lr_end = schedule.lr * schedule.lr_end
    return (f"SGA {schedule.iterations} iterations on {'y and z' if schedule.optimize_z else 'y (z from h_a)'}, "
            f"Adam lr {schedule.lr:g}" + (f"→{lr_end:.2g} (cosine)" if schedule.lr_end < 1 else " constant")
            + f", τ {schedule.tau_max:g} for {schedule.warmup:.0%} then →{schedule.tau_min:.3g} (exponential), "
            f"{schedule.checks} coded-cost check{'s' if schedule.checks != 1 else ''}"
            + (f", time budget {schedule.time_budget:g} s" if schedule.time_budget else ""))


def run_ncz(images: list[tuple[str, np.ndarray]], model: Path, qualities: list[float] | None,
            workdir: Path, schedule: Any = None, label: str = "ncz") -> tuple[dict[str, Any], dict[str, Any]]:
    from ncz.codec import decode_section, load_codec, write_image_section
    from ncz.codec.image import LAYOUT
    from ncz.codec.imageio import Pixels
    from ncz.format import Writer
    from ncz.format import open as open_archive

    with Measure() as load_t:
        runtime = load_codec(model)
    levels = runtime.config.num_levels
    if qualities is None:
        qualities = list(range(levels))
    with open_archive(model) as reader:
        meta = dict(reader.metadata)
    resolved = model.resolve()
    model_info = {"path": str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(resolved),
                  "model_id": runtime.model_id, "train_steps": meta.get("train_steps"),
                  "sha256": runtime.weights_hash, "file_bytes": model.stat().st_size, "levels": levels,
                  "lambdas": list(runtime.config.lambdas), "load_s": round(load_t.wall, 3)}
    sga = schedule
    entry = _new_entry(f"model {runtime.model_id}, quality levels 0..{levels - 1} (fractional = gain interpolation), "
                       f"torch threads {torch.get_num_threads()}, image layout {LAYOUT}, "
                       + (describe_schedule(sga) if sga else "amortized encoder (effort fast)"),
                       f"ncz {_lib_version('ncz')}, torch {torch.__version__}")
    entry["image_names"] = [name for name, _ in images]
    threads = torch.get_num_threads()
    entry["schedule"] = (f"{describe_schedule(sga)}; {threads} thread{'s' if threads != 1 else ''}" if sga
                         else "amortized")
    entry["loadavg_start"] = _loadavg()

    # warm-up (not timed): first convolutions allocate and pick kernels
    warm = Pixels(images[0][1][:128, :128].copy())
    with Writer(workdir / "warm.ncz", metadata={"format": "ncz-images", "images": 1}) as writer:
        write_image_section(writer, "image", runtime, warm, float(qualities[0]))
    with open_archive(workdir / "warm.ncz") as reader:
        decode_section(reader, "image", runtime)

    for q in qualities:
        rows = []
        for name, rgb in images:
            path = workdir / f"{name}.ncz"
            pixels = Pixels(rgb)
            with Measure() as enc, Writer(path, metadata={"format": "ncz-images", "images": 1}) as writer:
                write_image_section(writer, name, runtime, pixels, float(q), sga=sga)
            nbytes = path.stat().st_size
            with Measure() as dec, open_archive(path) as reader:
                out = decode_section(reader, name, runtime).rgb
            rows.append(_row(rgb, out, nbytes, enc, dec))
            path.unlink()
        _append(entry, float(q), rows)
        log(f"  {label} q={q:g}: {entry['bpp'][-1]:.4f} bpp, {entry['psnr'][-1]:.2f} dB, "
            f"MS-SSIM {entry['ms_ssim'][-1]:.4f}, enc {entry['enc_s'][-1]:.2f} s "
            f"(CPU {entry['enc_cpu_s'][-1]:.2f}), dec {entry['dec_s'][-1]:.2f} s")
    entry["loadavg_end"] = _loadavg()
    return entry, model_info


def run_pil(name: str, images: list[tuple[str, np.ndarray]], qualities: list[int], threads: int) -> dict[str, Any]:
    encode, decode, effort, version = _pil_codec(name, threads)
    entry = _new_entry(effort, version)
    encode(images[0][1][:64, :64].copy(), qualities[0])  # warm-up
    for q in qualities:
        rows = []
        for _, rgb in images:
            with Measure() as enc:
                data = encode(rgb, q)
            with Measure() as dec:
                out = decode(data)
            rows.append(_row(rgb, out, len(data), enc, dec))
        _append(entry, q, rows)
        log(f"  {name} q={q}: {entry['bpp'][-1]:.4f} bpp, {entry['psnr'][-1]:.2f} dB, "
            f"MS-SSIM {entry['ms_ssim'][-1]:.4f}, enc {entry['enc_s'][-1]:.3f} s, dec {entry['dec_s'][-1]:.3f} s")
    return entry


# --------------------------------------------------------------------------
# machine, plot, markdown
# --------------------------------------------------------------------------


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": threads,
                            "env": {k: v for k, v in os.environ.items() if k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")},
                            "python": platform.python_version(), "platform": platform.platform(),
                            "torch": torch.__version__, "numpy": np.__version__, "pillow": _lib_version("pillow")}
    try:
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return info


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def load_published(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Published RD curves by name; each file: name, source, bpp_counts, bpp and psnr lists (rising)."""
    out = {}
    for path in paths:
        ref = json.loads(path.read_text())
        missing = {"name", "source", "bpp_counts", "bpp", "psnr"} - set(ref)
        if missing or len(ref["bpp"]) != len(ref["psnr"]) or len(ref["bpp"]) < 4:
            raise SystemExit(f"{path}: a published curve needs name, source, bpp_counts and >= 4 (bpp, psnr) pairs")
        if any(b <= a for a, b in zip(ref["bpp"], ref["bpp"][1:])):
            raise SystemExit(f"{path}: bpp must rise")
        out[ref["name"]] = {k: ref[k] for k in ("source", "bpp_counts", "bpp", "psnr", "what") if k in ref}
    return out


def _psnr_at(curve: dict[str, Any], bpp: float) -> float:
    """PSNR of a rising RD curve at ``bpp``, linear in log bpp."""
    return float(np.interp(math.log(bpp), np.log(curve["bpp"]), curve["psnr"]))


def compute_bd(result: dict[str, Any]) -> None:
    """Fill ``bd_rate_vs`` (PCHIP, percent), ``bd_rate_detail`` and ``bd_rate_detail_cubic`` of ncz vs each codec."""
    result["bd_rate_vs"], result["bd_rate_detail"], result["bd_rate_detail_cubic"] = {}, {}, {}
    ncz_entry = result["codecs"].get("ncz")
    if ncz_entry is None:
        return
    for name in OTHER_CODECS:
        if name not in result["codecs"]:
            continue
        other = result["codecs"][name]
        detail = bd_rate(other["bpp"], other["psnr"], ncz_entry["bpp"], ncz_entry["psnr"], "pchip")
        result["bd_rate_vs"][name] = detail["bd_rate"]
        result["bd_rate_detail"][name] = detail
        result["bd_rate_detail_cubic"][name] = bd_rate(other["bpp"], other["psnr"], ncz_entry["bpp"],
                                                       ncz_entry["psnr"], "cubic")
    for ref in result.get("published", {}).values():
        ref["bd_rate_of_ncz"] = bd_rate(ref["bpp"], ref["psnr"], ncz_entry["bpp"], ncz_entry["psnr"],
                                        "pchip")["bd_rate"]
        ref["bd_rate_vs"] = {name: bd_rate(result["codecs"][name]["bpp"], result["codecs"][name]["psnr"],
                                           ref["bpp"], ref["psnr"], "pchip")["bd_rate"]
                             for name in OTHER_CODECS if name in result["codecs"]}
        lo, hi = max(ref["bpp"][0], ncz_entry["bpp"][0]), min(ref["bpp"][-1], ncz_entry["bpp"][-1])
        ref["psnr_gap_db"] = {f"{b:g}": _psnr_at(ref, b) - _psnr_at(ncz_entry, b) for b in GAP_BPP if lo <= b <= hi}
    # each slower encoder effort against the amortized encoder (and the others), on the images it was measured on
    result.pop("bd_rate_sga_vs", None)
    result["bd_rate_effort_vs"] = {}
    for key, entry in result["codecs"].items():
        if not key.startswith("ncz-"):
            continue
        wanted = entry.get("image_names")
        result["bd_rate_effort_vs"][key] = {}
        for name in ("ncz", *OTHER_CODECS):
            other = result["codecs"].get(name)
            if other is not None:
                other = _on_images(other, result["image_names"], wanted)
                result["bd_rate_effort_vs"][key][name] = bd_rate(other["bpp"], other["psnr"], entry["bpp"],
                                                                 entry["psnr"], "pchip")["bd_rate"]


def _add_to(earlier: dict[str, Any], run: dict[str, Any], where: str, runtime_s: float) -> dict[str, Any]:
    """``earlier`` with this run's ncz efforts added (same weights; its images or some of them)."""
    if run.get("model", {}).get("sha256") != earlier.get("model", {}).get("sha256"):
        raise SystemExit(f"{where}: measured with other codec weights than this run")
    if not set(run["image_names"]) <= set(earlier["image_names"]):
        raise SystemExit(f"{where}: this run's images are not among its images")
    for codec, entry in run["codecs"].items():
        earlier["codecs"][codec] = entry
    earlier.setdefault("added", []).append({"command": run["command"], "date": run["date"], "runtime_s": runtime_s,
                                            "codecs": list(run["codecs"]), "image_names": run["image_names"]})
    return earlier


def _command_line(argv: list[str]) -> str:
    return "python bench/rd.py " + " ".join(a if re.fullmatch(r"[\w./=:+-]+", a) else repr(a) for a in argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/rd.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "kodak"), help="folder of kodim*.png")
    p.add_argument("--model", default=None, help="codec weights .ncz (default: the shipped weights), or a training "
                   "checkpoint .pt (runs/codec/latest.pt), exported first with calibration crops from --calibration")
    p.add_argument("--calibration", default=str(REPO.parent / "shared" / "data" / "train_images"),
                   help="training images for exporting a .pt checkpoint")
    p.add_argument("--images", type=int, default=None, help="use only the first N images (sorted by name)")
    p.add_argument("--qualities", type=float, nargs="+", default=None,
                   help="ncz quality values (default: every integer level of the model)")
    p.add_argument("--codecs", nargs="+", default=["ncz", *OTHER_CODECS], choices=["ncz", *OTHER_CODECS])
    p.add_argument("--effort", nargs="+", default=["fast"], metavar="EFFORT",
                   help="ncz encoder efforts to measure: fast (amortized), sga (SGASchedule.default()), sga:N "
                        "(that schedule with N iterations), paper or paper:N (Yang et al. 2020, 2000 iterations "
                        "unless N); the SGA ones take minutes per image")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="time budget per image for the SGA efforts (SGASchedule.time_budget)")
    p.add_argument("--add-to", default=None, metavar="JSON",
                   help="add this run's ncz efforts to an earlier result (e.g. a slow effort on fewer of its "
                        "images: BD-rates then use the earlier results of the same images)")
    for name in OTHER_CODECS:
        p.add_argument(f"--{name}-qualities", type=int, nargs="+", default=SWEEPS[name], help=f"{name} quality sweep")
    p.add_argument("--threads", type=int, default=2, help="threads per codec (torch, aom, libjxl)")
    p.add_argument("--json", default=str(DEFAULT_JSON), help="output JSON")
    p.add_argument("--plot", default=None,
                   help=f"output PNG (default: --json's path as .png, {DEFAULT_PLOT.name} for the default JSON)")
    p.add_argument("--markdown", default=None, help="also write this Markdown page (e.g. docs/RESULTS.md)")
    p.add_argument("--from-json", default=None,
                   help="skip the measurements: recompute BD-rates and re-render --json / --plot / --markdown "
                        "from this JSON")
    p.add_argument("--baselines-from", default=None,
                   help="take the other codecs' measurements from this earlier JSON (same images, or a superset: "
                        "its per-image numbers are averaged over ours) instead of re-running them: the model "
                        "changes, JPEG/WebP/AVIF/JPEG XL do not")
    p.add_argument("--published", type=Path, nargs="*", default=sorted(PUBLISHED_DIR.glob("*.json")),
                   help="published RD curves to draw and compare against (default: bench/reference/*.json)")
    p.add_argument("--selftest", action="store_true", help="check MS-SSIM and BD-rate, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.selftest:
        return selftest()
    json_path = Path(args.json)
    plot_path = Path(args.plot) if args.plot is not None else json_path.with_suffix(".png")
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        result["published"] = load_published(args.published)
        compute_bd(result)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1))
        _report.plot(result, plot_path, _on_images)
        if args.markdown:
            _write_page(Path(args.markdown), markdown(result, plot_path, Path(args.markdown)))
        return 0

    if args.add_to and set(args.codecs) != {"ncz"}:
        raise SystemExit("--add-to adds ncz efforts only: pass --codecs ncz")
    efforts = [effort_schedule(e, args.time_budget) for e in args.effort] if "ncz" in args.codecs else []
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load_start = _loadavg()
    files = sorted(Path(args.data).glob("*.png"))
    if args.images:
        files = files[: args.images]
    if not files:
        raise SystemExit(f"no PNG images in {args.data}")
    from PIL import Image

    images = []
    for f in files:
        with Image.open(f) as im:
            images.append((f.stem, np.asarray(im.convert("RGB")).copy()))
    log(f"rd: {len(images)} images from {args.data}, codecs {' '.join(args.codecs)}, {args.threads} threads")

    result: dict[str, Any] = {"command": _command_line(argv),
                              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "images": len(images), "image_names": [n for n, _ in images],
                              "dataset": os.path.relpath(Path(args.data).resolve(), REPO), "codecs": {}}
    model_path = Path(args.model) if args.model else None
    if model_path is None:
        from ncz.codec import default_weights_path

        model_path = default_weights_path()
    for codec, schedule in efforts:
        if not model_path.exists():
            raise SystemExit(f"{model_path}: codec weights not found (train and export them, or pass --model)")
        log(f"rd: {codec}")
        with tempfile.TemporaryDirectory(prefix="rd_ncz_") as tmp:
            source = None
            if model_path.suffix == ".pt":
                source = model_path
                model_path = export_checkpoint(model_path, Path(tmp) / "exported.ncz", Path(args.calibration))
            entry, model_info = run_ncz(images, model_path, args.qualities, Path(tmp), schedule=schedule, label=codec)
            if source is not None:
                resolved = source.resolve()
                model_info["path"] = str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(resolved)
                model_info["exported_from_checkpoint"] = True
                model_path = source
        result["codecs"][codec] = entry
        result["model"] = model_info
    earlier = json.loads(Path(args.baselines_from).read_text()) if args.baselines_from else None
    subset = None
    if earlier is not None and earlier.get("image_names") != result["image_names"]:
        names = earlier.get("image_names") or []
        if not set(result["image_names"]) <= set(names):
            raise SystemExit(f"{args.baselines_from}: measured on other images than this run")
        subset = [names.index(n) for n in result["image_names"]]  # average its per-image numbers over ours
    for name in OTHER_CODECS:
        if name in args.codecs:
            if earlier is not None and name in earlier.get("codecs", {}):
                theirs = earlier["codecs"][name]
                result["codecs"][name] = theirs if subset is None else _subset(theirs, subset)
                result.setdefault("baselines_from", {"file": args.baselines_from, "date": earlier.get("date"),
                                                     "command": earlier.get("command")})
                continue
            log(f"rd: {name}")
            result["codecs"][name] = run_pil(name, images, getattr(args, f"{name}_qualities"), args.threads)

    if args.add_to:
        result = _add_to(json.loads(Path(args.add_to).read_text()), result, args.add_to,
                         round(time.perf_counter() - t0, 1))
    else:
        result["machine"] = machine_info(args.threads)
        result["loadavg_start"], result["loadavg_end"] = load_start, _loadavg()
        result["runtime_s"] = round(time.perf_counter() - t0, 1)
    result["published"] = load_published(args.published)
    compute_bd(result)

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    _report.plot(result, plot_path, _on_images)
    if args.markdown:
        _write_page(Path(args.markdown), markdown(result, plot_path, Path(args.markdown)))
    print(json.dumps(result))
    log(f"rd: wrote {json_path} and {plot_path} in {result['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
