"""Codec weights as an ncz model archive, and the runtime built from them.

A weights file is an ordinary model archive (``ncz.models``) whose tensors are
the float transforms (g_a, h_a, g_s, gain units), the integer hyper-synthesis
(``int_hs.*``) and the integer frequency tables of the factorized prior for z
(``z_tables.*``). Everything the *decoder* needs to entropy-decode is integer
and stored, never recomputed, so decoding does not depend on float math:

- ``int_hs.{i}.weight`` int8, ``.scale``/``.bias`` float64, ``.config`` int64
  [transposed, stride, padding, output_padding, leaky], ``.out_step`` float64 [1];
- ``z_tables.freqs`` int64 (C, L) zero-padded, ``z_tables.offsets`` int64 (C,),
  ``z_tables.lengths`` int64 (C,): one table per channel of z, with escape;
- checkerboard architecture only: the integer context ``int_ctx.context.*`` and
  ``int_ctx.params.{i}.*`` (same five tensors per layer as ``int_hs``) and
  ``int_ctx.steps`` float64 [3] (input steps of ŷ, μ, σ_raw).

The float h_s and the float context model are not needed to code images; the
exporter writes them to a separate train-state file so training can continue.

The archive header records ``codec`` (the CodecConfig as a map) and ``model_id``.
The sha256 of the file bytes identifies the weights in every image section.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ncz.format import InputError
from ncz.format import open as open_archive
from ncz.format.entropy_tables import FrequencyTable, quantize_masses
from ncz.models import Recipe, load_state_dict, pack

from .architectures import ARCHITECTURES, CHECKERBOARD_ARCH, build_codec, is_known_arch
from .context import CheckerboardCodec, anchor_mask
from .integer import IntegerContext, IntegerHyperSynthesis, IntegerLayer
from .layers import inference_transform
from .networks import CodecConfig, HyperpriorCodec
from .windows import analyze as analyze_windows
from .windows import synthesize as synthesize_windows

__all__ = ["CodecRuntime", "export_codec", "load_codec", "default_weights_path", "build_z_tables", "float_state"]

#: relative RMS error of the quantized float transforms in a weights file (see :func:`weights_recipe`)
WEIGHT_REL_ERROR = 0.005  # measured: same PSNR as 0.002 (±0.02 dB, kodim01/05/13/23, q 0/3/7), 10% smaller file


def weights_recipe(rel_error: float = WEIGHT_REL_ERROR) -> Recipe:
    """How a weights file stores its tensors: integer parts exactly, large float kernels quantized per
    channel to ``rel_error`` (relative RMS), the rest exactly."""
    return Recipe.from_dict({"name": "codec-weights", "rule": [
        {"pattern": "int_hs.*", "representation": "lossless"},
        {"pattern": "int_ctx.*", "representation": "lossless"},
        {"pattern": "z_tables.*", "representation": "lossless"},
        {"pattern": "*", "ndim": [2, 3, 4], "min_numel": 4096, "representation": "quantized",
         "rel_error": rel_error, "granularity": "channel"},
        {"pattern": "*", "representation": "lossless"},
    ]})


WEIGHTS_RECIPE = weights_recipe()


@dataclass
class CodecRuntime:
    """Everything needed to encode and decode images with one set of weights."""

    model_id: str
    weights_hash: str
    config: CodecConfig
    net: HyperpriorCodec
    int_hs: IntegerHyperSynthesis
    z_tables: tuple[FrequencyTable, ...]
    path: Path | None = None
    g_a: torch.nn.Module | None = None  # coding-only transforms (inference_transform), built on load
    g_s: torch.nn.Module | None = None
    int_context: IntegerContext | None = None  # checkerboard architecture only

    def __post_init__(self) -> None:
        self.net.requires_grad_(False)  # coding only; encoder-side refinement differentiates w.r.t. latents
        if self.g_a is None:
            self.g_a = inference_transform(self.net.g_a)
        if self.g_s is None:
            self.g_s = inference_transform(self.net.g_s)

    @property
    def latents(self):
        """The latent coder of this architecture (:mod:`ncz.codec.latents`)."""
        from .latents import latent_coder_for

        return latent_coder_for(self)

    def _g_a(self, x: torch.Tensor) -> torch.Tensor:
        return self.g_a(x.contiguous(memory_format=torch.channels_last)).contiguous()

    def _g_s(self, y: torch.Tensor) -> torch.Tensor:
        return self.g_s(y.contiguous(memory_format=torch.channels_last)).contiguous()

    def analyze_raw(self, x: torch.Tensor, progress=None) -> torch.Tensor:
        """g_a(x) before the gain, float32, window by window.

        ``x``: (1, 3, H, W) in [0, 1], H and W multiples of 64 (one latent grid for the whole image).
        """
        with torch.no_grad():
            return analyze_windows(self._g_a, x, progress=progress)

    def analyze(self, x: torch.Tensor, quality: float, progress=None) -> torch.Tensor:
        """y = g_a(x) · gain(q) (see :meth:`analyze_raw`)."""
        with torch.no_grad():
            return self.analyze_raw(x, progress) * self.net.gains.gain(quality)

    def synthesize(self, y_hat: torch.Tensor, quality: float) -> torch.Tensor:
        """x̂ = g_s(ŷ · inv_gain(q)) in float32 through the coding-only transform (not clamped), in one piece."""
        with torch.no_grad():
            return self._g_s(y_hat * self.net.gains.inv_gain(quality))

    def synthesize_pixels(self, y_hat: torch.Tensor, quality: float, size: tuple[int, int],
                          progress=None) -> np.ndarray:
        """8-bit RGB ``(h, w, 3)`` of ŷ, cropped to ``size``, window by window (bounded memory)."""
        with torch.no_grad():
            return synthesize_windows(self._g_s, y_hat * self.net.gains.inv_gain(quality), size, progress=progress)


def build_z_tables(net: HyperpriorCodec, tail_mass: float = 1e-9) -> tuple[FrequencyTable, ...]:
    """Integer tables (with escape) of the factorized prior, one per channel of z."""
    eb = net.entropy_bottleneck
    lo, hi = eb.support(tail_mass=tail_mass)
    tables = []
    for c in range(eb.channels):
        low, high = int(lo[c]), int(hi[c])
        if high - low > 4094:
            mid = (low + high) // 2
            low, high = mid - 2047, mid + 2047
        pmf = eb.integer_pmf(low, high)[c].double().numpy()
        escape = max(0.0, 1.0 - float(pmf.sum()))
        tables.append(FrequencyTable(low, quantize_masses(np.append(pmf, max(escape, 1e-12))), escape=True))
    return tuple(tables)


#: float tensors only training needs (the coder runs their integer copies): the train-state file holds them
TRAIN_ONLY = ("h_s.", "context_model.")
#: the coder's integer copies and tables: no float network has them
CODER_ONLY = ("int_hs.", "z_tables.", "int_ctx.")


def float_state(*paths: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], int]:
    """(the float networks' tensors, the largest ``train_steps``) of weights files — a shipped
    ``default.ncz`` and its ``train-state.ncz`` together give the whole float model, as training
    continues from them (``train_codec --init-from``)."""
    state: dict[str, torch.Tensor] = {}
    step = 0
    for path in paths:
        state.update({k: v for k, v in load_state_dict(path).items() if not k.startswith(CODER_ONLY)})
        with open_archive(path) as reader:
            step = max(step, int(reader.metadata.get("train_steps", 0) or 0))
    return state, step


def _int_layers_tensors(prefix: str, layers) -> dict[str, torch.Tensor]:
    out = {}
    for i, layer in enumerate(layers):
        out.update(_int_layer_tensors(f"{prefix}.{i}", layer))
    return out


def _int_layer_tensors(prefix: str, layer: IntegerLayer) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.weight": torch.from_numpy(layer.weight.astype(np.int8)),  # |w| ≤ 127
        f"{prefix}.scale": torch.from_numpy(layer.scale.astype(np.float64)),
        f"{prefix}.bias": torch.from_numpy(layer.bias.astype(np.float64)),
        f"{prefix}.config": torch.tensor(
            [int(layer.transposed), layer.stride, layer.padding, layer.output_padding, int(layer.leaky)],
            dtype=torch.int64),
        f"{prefix}.out_step": torch.tensor([layer.out_step], dtype=torch.float64),
    }


def _int_context_tensors(context: IntegerContext) -> dict[str, torch.Tensor]:
    out = _int_layer_tensors("int_ctx.context", context.context)
    out.update(_int_layers_tensors("int_ctx.params", context.params))
    out["int_ctx.steps"] = torch.tensor(context.steps, dtype=torch.float64)
    return out


@torch.no_grad()
def _calibrate_context(net: CheckerboardCodec, int_hs: IntegerHyperSynthesis,
                       calibration: list[torch.Tensor]) -> IntegerContext:
    """The integer context, its steps sized on what the coder will feed it (integer h_s outputs)."""
    samples = []
    for x in calibration:
        for q in range(net.num_levels):
            y = net.analysis(x, float(q)).double()
            mean, raw = (torch.from_numpy(v) for v in int_hs(torch.round(net.hyper_analysis(y.float()))[0]))
            anchors = anchor_mask(*y.shape[-2:]).double()
            samples.append(((torch.round(y - mean) + mean) * anchors, mean, raw))
    return IntegerContext.from_float(net.context_model, samples)


def _z_table_tensors(tables: tuple[FrequencyTable, ...]) -> dict[str, torch.Tensor]:
    width = max(t.freqs.size for t in tables)
    freqs = np.zeros((len(tables), width), np.int64)
    for c, t in enumerate(tables):
        freqs[c, : t.freqs.size] = t.freqs
    return {"z_tables.freqs": torch.from_numpy(freqs),
            "z_tables.offsets": torch.tensor([t.offset for t in tables], dtype=torch.int64),
            "z_tables.lengths": torch.tensor([t.freqs.size for t in tables], dtype=torch.int64)}


def export_codec(net: HyperpriorCodec, output: str | os.PathLike[str], calibration: list[torch.Tensor], *,
                 step: int | None = None, rel_error: float = WEIGHT_REL_ERROR) -> Path:
    """Write ``net`` as a weights file. ``calibration``: images (B, 3, H, W) in [0, 1], H, W multiples of 64;
    ``rel_error``: of the quantized float transforms (:func:`weights_recipe`)."""
    net = net.eval().float()
    z_cal = []
    with torch.no_grad():
        for x in calibration:
            for q in range(net.num_levels):
                z_cal.append(torch.round(net.hyper_analysis(net.analysis(x, float(q)))))
    int_hs = IntegerHyperSynthesis.from_float(net.h_s, z_cal)
    tensors = {k: v for k, v in net.state_dict().items() if not k.startswith(TRAIN_ONLY)}
    tensors.update(_int_layers_tensors("int_hs", int_hs.layers))
    if isinstance(net, CheckerboardCodec):
        tensors.update(_int_context_tensors(_calibrate_context(net, int_hs, calibration)))
    tensors.update(_z_table_tensors(build_z_tables(net)))
    config = net.config.to_dict()
    metadata = {"codec": config, "model_id": f"{net.config.arch}/N{net.config.N}-M{net.config.M}"}
    if step is not None:
        metadata["train_steps"] = int(step)
    pack(tensors, output, recipe=weights_recipe(rel_error), metadata=metadata)
    return Path(output)


def _int_layer(tensors: dict[str, torch.Tensor], prefix: str, path: Path) -> IntegerLayer:
    try:
        cfg = tensors[f"{prefix}.config"].tolist()
        if len(cfg) != 5:
            raise InputError(f"{path}: {prefix}.config must have 5 entries")
        return IntegerLayer(
            transposed=bool(cfg[0]), weight=tensors[f"{prefix}.weight"].numpy().astype(np.int32),
            scale=tensors[f"{prefix}.scale"].numpy().astype(np.float64),
            bias=tensors[f"{prefix}.bias"].numpy().astype(np.float64), stride=int(cfg[1]), padding=int(cfg[2]),
            output_padding=int(cfg[3]), leaky=bool(cfg[4]), out_step=float(tensors[f"{prefix}.out_step"][0]))
    except KeyError as exc:
        raise InputError(f"{path}: integer layer {prefix} lacks {exc}") from exc


def _load_int_context(tensors: dict[str, torch.Tensor], path: Path) -> IntegerContext:
    layers = []
    while f"int_ctx.params.{len(layers)}.weight" in tensors:
        layers.append(_int_layer(tensors, f"int_ctx.params.{len(layers)}", path))
    if not layers or "int_ctx.steps" not in tensors:
        raise InputError(f"{path}: checkerboard weights lack the integer context (int_ctx.*)")
    return IntegerContext(_int_layer(tensors, "int_ctx.context", path), layers, tensors["int_ctx.steps"].tolist())


def default_weights_path() -> Path:
    """The weights shipped inside the package (``ncz/codec/weights/default.ncz``)."""
    return Path(str(resources.files("ncz.codec").joinpath("weights/default.ncz")))


_CACHE: dict[tuple[str, float], CodecRuntime] = {}


def load_codec(path: str | os.PathLike[str] | None = None) -> CodecRuntime:
    """Load a weights file (default: the shipped one). Cached per path and mtime."""
    path = Path(path) if path is not None else default_weights_path()
    if not path.exists():
        raise InputError(f"{path}: codec weights not found")
    key = (str(path.resolve()), path.stat().st_mtime)
    if key in _CACHE:
        return _CACHE[key]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with open_archive(path) as reader:
        meta = dict(reader.metadata)
    if "codec" not in meta or "model_id" not in meta:
        raise InputError(f"{path}: not an ncz codec weights file (header lacks codec/model_id)")
    try:
        config = CodecConfig.from_dict(meta["codec"])
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: invalid codec config ({exc})") from exc
    if not is_known_arch(config.arch):
        raise InputError(f"{path}: codec architecture {config.arch!r} is not one this version knows "
                         f"({', '.join(sorted(ARCHITECTURES))})")
    tensors = load_state_dict(path)
    layers = []
    i = 0
    while f"int_hs.{i}.weight" in tensors:
        layers.append(_int_layer(tensors, f"int_hs.{i}", path))
        i += 1
    if not layers:
        raise InputError(f"{path}: weights lack the integer hyper-synthesis (int_hs.*)")
    int_hs = IntegerHyperSynthesis(layers)
    freqs = tensors["z_tables.freqs"].numpy()
    offsets = tensors["z_tables.offsets"].numpy()
    lengths = tensors["z_tables.lengths"].numpy()
    if not (freqs.shape[0] == offsets.size == lengths.size == config.N):
        raise InputError(f"{path}: z_tables must have one table per channel of z ({config.N})")
    try:
        z_tables = tuple(FrequencyTable(int(offsets[c]), freqs[c, : int(lengths[c])], escape=True)
                         for c in range(config.N))
    except Exception as exc:  # table validation errors are NczErrors or numpy errors on bad lengths
        raise InputError(f"{path}: invalid z tables ({exc})") from exc
    int_context = _load_int_context(tensors, path) if config.arch == CHECKERBOARD_ARCH else None
    net = build_codec(config).eval()
    missing = net.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(CODER_ONLY)}, strict=False)
    absent = [k for k in missing.missing_keys if not k.startswith(TRAIN_ONLY)]
    if absent or missing.unexpected_keys:
        raise InputError(f"{path}: weights do not match the architecture (missing {absent[:3]}, "
                         f"unexpected {missing.unexpected_keys[:3]})")
    runtime = CodecRuntime(str(meta["model_id"]), digest, config, net, int_hs, z_tables, path,
                           int_context=int_context)
    _CACHE[key] = runtime
    return runtime
