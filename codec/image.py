"""Image sections: pixels <-> entropy-coded latents of the hyperprior codec.

Encode (per tile of at most ``TILE`` × ``TILE`` pixels, padded to a multiple of 64)::

    x ─g_a·gain(q)─► y ─h_a─► z ─round─► ẑ ──IndexedModel(z tables)──► z stream (ANS)
                                      └─int h_s─► (μ, σ) exact ─┐
    s = round(y − μ) ──ConditionalModel(Gaussian, 0, σ)──► y stream (ANS)

Decode mirrors it: ẑ from the z stream, (μ, σ) from the integer h_s (identical
bits on every machine), s from the y stream, ŷ = s + μ, x̂ = g_s(ŷ·inv_gain(q)),
cropped, rounded to 8 bits. Alpha, when present, is a separate lossless part.

Section (kind IMAGE, FORMAT.md §5.3): params ``width``, ``height``,
``channels`` (1 or 3), ``quality`` (float), ``model`` (model id), ``weights``
(bin: the first 16 bytes of the sha256 of the weights file), ``tile``, ``streams`` (byte lengths, two per
tile: z then y); payload = the streams back to back. Alpha: part ``#alpha``
(uint8 [h, w]).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ncz.format import Codec, InputError, Kind, Reader, SectionInfo, UsageError, Writer, encode_payload
from ncz.format import entropy as E
from ncz.format.entropy_tables import Family

from .imageio import MAX_PIXELS, MAX_SIDE, Pixels
from .networks import crop
from .refine import SGASchedule, refine_latents
from .weights import CodecRuntime

__all__ = ["TILE", "encode_pixels", "decode_section", "write_image_section"]

TILE = 1024  # pixels per tile side: bounds memory (a 4000×3000 photo stays well under 4 GiB)
PAD = 64


def _tiles(height: int, width: int) -> list[tuple[int, int, int, int]]:
    return [(top, left, min(TILE, height - top), min(TILE, width - left))
            for top in range(0, height, TILE) for left in range(0, width, TILE)]


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)[None]
    if x.shape[1] == 1:
        x = x.expand(1, 3, *x.shape[2:])
    return x


def _pad_replicate(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[2:]
    ph, pw = (-h) % PAD, (-w) % PAD
    if ph or pw:  # replicate edges: cheaper to code than a black border
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)


def _z_model(runtime: CodecRuntime, shape: tuple[int, ...]) -> E.IndexedModel:
    channels = shape[0]
    ids = np.repeat(np.arange(channels, dtype=np.int32), int(np.prod(shape[1:])))
    return E.IndexedModel(runtime.z_tables, ids)


def _y_model(mean_scale: tuple[np.ndarray, np.ndarray]) -> E.ConditionalModel:
    _, raw_scale = mean_scale
    return E.ConditionalModel.from_mean_scale(Family.GAUSSIAN, np.zeros(raw_scale.size), raw_scale.ravel())


def encode_pixels(runtime: CodecRuntime, pixels: Pixels, quality: float,
                  progress: Callable[[int, int], None] | None = None, *,
                  sga: SGASchedule | None = None) -> tuple[dict, bytes]:
    """(params, payload) of an image section for ``pixels`` at ``quality``.

    ``sga``: refine each tile's latents with stochastic Gumbel annealing
    (:mod:`ncz.codec.refine`) instead of coding g_a's amortized guess; the
    decoder is the same. ``progress(done, total)`` counts tiles, or SGA
    iterations over all tiles when refining.
    """
    levels = runtime.config.num_levels
    if not (0.0 <= quality <= levels - 1) or math.isnan(quality):
        raise UsageError(f"quality must be in [0, {levels - 1}], got {quality}")
    h, w = pixels.height, pixels.width
    if h == 0 or w == 0 or h > MAX_SIDE or w > MAX_SIDE or h * w > MAX_PIXELS:
        raise UsageError(f"image size {w}x{h} is outside 1..{MAX_SIDE} per side")
    streams: list[bytes] = []
    tiles = _tiles(h, w)
    for index, (top, left, th, tw) in enumerate(tiles):
        x, _ = _pad_replicate(_to_tensor(pixels.rgb[top:top + th, left:left + tw]))
        if sga is None:
            with torch.no_grad():
                y = runtime.analyze(x, float(quality))
                z = torch.round(runtime.net.hyper_analysis(y))
        else:
            def tile_progress(done: int, total: int, index: int = index) -> None:
                if progress:
                    progress(index * total + done, len(tiles) * total)
            refined = refine_latents(runtime, x, (th, tw), float(quality), sga, seed=index, progress=tile_progress)
            y, z = refined.y, refined.z
        z_hat = np.clip(z[0].numpy().astype(np.int64), -(2**20), 2**20)
        mean, raw_scale = runtime.int_hs(z_hat)
        symbols = np.rint(y[0].double().numpy() - mean[0]).astype(np.int32)
        streams.append(E.encode(z_hat.astype(np.int32).ravel(), _z_model(runtime, z_hat.shape)))
        streams.append(E.encode(symbols.ravel(), _y_model((mean, raw_scale))))
        if progress and sga is None:
            progress(index + 1, len(tiles))
    params = {"width": w, "height": h, "channels": pixels.channels, "quality": float(quality),
              "model": runtime.model_id, "weights": bytes.fromhex(runtime.weights_hash[:32]), "tile": TILE,
              "streams": [len(s) for s in streams]}
    return params, b"".join(streams)


def write_image_section(writer: Writer, name: str, runtime: CodecRuntime, pixels: Pixels, quality: float,
                        progress: Callable[[int, int], None] | None = None, *,
                        sga: SGASchedule | None = None, encoded: tuple[dict, bytes] | None = None) -> None:
    """Add one image (and its alpha part) to ``writer``; ``encoded`` reuses an :func:`encode_pixels` result."""
    params, payload = encoded if encoded is not None else encode_pixels(runtime, pixels, quality, progress, sga=sga)
    writer.add(name, payload, kind=Kind.IMAGE, codec=Codec.RAW, params=params, aligned=False)
    if pixels.alpha is not None:
        alpha = pixels.alpha
        candidates = [encode_payload(alpha.tobytes(), Codec.ZSTD, {"level": 19}),
                      encode_payload(alpha.astype("<i4").tobytes(), Codec.ANS)]
        best = min(candidates, key=lambda p: p.stored_length)
        dtype = "uint8" if best.codec == Codec.ZSTD else "int32"
        writer.add_encoded(f"{name}#alpha", best, kind=Kind.PART, params={"dtype": dtype, "shape": list(alpha.shape)})


def _check(info: SectionInfo, runtime: CodecRuntime, where: str) -> tuple[int, int, int, float, list[int]]:
    p = info.params
    try:
        w, h, c, q, tile, lengths = int(p["width"]), int(p["height"]), int(p["channels"]), float(p["quality"]), \
            int(p["tile"]), list(p["streams"])
        model, weights = str(p["model"]), p["weights"]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{where}: image params incomplete or mistyped ({exc})") from exc
    if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE and w * h <= MAX_PIXELS):
        raise InputError(f"{where}: params width×height {w}x{h} outside 1..{MAX_SIDE}")
    if c not in (1, 3):
        raise InputError(f"{where}: params.channels must be 1 or 3, got {c}")
    if tile != TILE:
        raise InputError(f"{where}: params.tile is {tile}; this decoder uses {TILE}")
    if not (0.0 <= q <= runtime.config.num_levels - 1):
        raise InputError(f"{where}: params.quality {q} outside the model's 0..{runtime.config.num_levels - 1}")
    if model != runtime.model_id or not isinstance(weights, bytes) or weights.hex() != runtime.weights_hash[:32]:
        shown = weights.hex()[:12] if isinstance(weights, bytes) else repr(weights)
        raise InputError(f"{where}: coded with model {model} weights {shown}…; the loaded weights are "
                         f"{runtime.model_id} {runtime.weights_hash[:12]}… (pass --model with the right file)")
    if len(lengths) != 2 * len(_tiles(h, w)) or any(not isinstance(n, int) or n < 0 for n in lengths):
        raise InputError(f"{where}: params.streams must list 2 byte lengths per tile ({2 * len(_tiles(h, w))})")
    if sum(lengths) != info.decoded_length:
        raise InputError(f"{where}: stream lengths sum to {sum(lengths)}, the payload has {info.decoded_length} bytes")
    return w, h, c, q, lengths


@torch.no_grad()
def decode_section(reader: Reader, name: str, runtime: CodecRuntime,
                   progress: Callable[[int, int], None] | None = None) -> Pixels:
    """Pixels of image section ``name``."""
    info = reader.info(name)
    where = f"{reader.name}: section {name!r}"
    if info.kind != Kind.IMAGE:
        raise InputError(f"{where}: not an image section (kind {info.kind_name})")
    w, h, c, q, lengths = _check(info, runtime, where)
    payload = reader.read(name)
    out = np.empty((h, w, 3), np.uint8)
    cursor = 0
    tiles = _tiles(h, w)
    for index, (top, left, th, tw) in enumerate(tiles):
        ph, pw = th + (-th) % PAD, tw + (-tw) % PAD
        z_shape = (runtime.config.N, ph // 64, pw // 64)
        z_stream = payload[cursor:cursor + lengths[2 * index]]
        cursor += lengths[2 * index]
        y_stream = payload[cursor:cursor + lengths[2 * index + 1]]
        cursor += lengths[2 * index + 1]
        z_hat = E.decode(z_stream, _z_model(runtime, z_shape), where=f"{where} z stream").reshape(z_shape)
        mean, raw_scale = runtime.int_hs(z_hat.astype(np.int64))
        symbols = E.decode(y_stream, _y_model((mean, raw_scale)), where=f"{where} y stream")
        y_hat = torch.from_numpy((symbols.reshape(mean.shape[1:]) + mean[0]).astype(np.float32))[None]
        x_hat = crop(runtime.synthesize(y_hat, q), (th, tw)).clamp_(0, 1)
        out[top:top + th, left:left + tw] = (x_hat[0].permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
        if progress:
            progress(index + 1, len(tiles))
    rgb = out if c == 3 else np.rint(out.astype(np.float32).mean(axis=2, keepdims=True)).astype(np.uint8)
    alpha = None
    if f"{name}#alpha" in reader:
        part = reader.info(f"{name}#alpha")
        data = np.frombuffer(reader.read(part.name), dtype=np.uint8 if part.params.get("dtype") == "uint8" else "<i4")
        if data.size != h * w or (data.size and (data.min() < 0 or data.max() > 255)):
            raise InputError(f"{where}: alpha part does not match the image size or 8-bit range")
        alpha = data.astype(np.uint8).reshape(h, w)
    return Pixels(rgb, alpha)
