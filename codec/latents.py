r"""Entropy coding of one image's latents, one coder per architecture.

An architecture declares its streams here; the image section (FORMAT.md §5.3)
stores them back to back with their byte lengths. Every probability the
coder sees comes from integer networks (:mod:`ncz.codec.integer`) and the
fixed grid, so encoder and decoder agree bit for bit::

    hyperprior     z ──tables──► "z"      s = round(y − μ) ──N(0, σ)──► "y"
    checkerboard   z ──tables──► "z"      anchors s = round(y − μ)         ──► "y-anchors"
                                          rest    s = round(y − μ − Δμ)    ──► "y-rest"
                                          (Δμ, Δσ from the integer context of ŷ_anchors)

Symbol order in every y stream: channel-major, then raster order over the
positions the stream holds (C order of ``s[:, mask]``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ncz.format import InputError
from ncz.format import entropy as E
from ncz.format.entropy_tables import Family

from .context import anchor_mask

__all__ = ["LatentShape", "CodedLatents", "HyperpriorLatents", "CheckerboardLatents", "latent_coder_for"]

Z_CLAMP = 1 << 20  # ẑ beyond this is not a real image's; keeps the integer h_s inside its exact range


@dataclass(frozen=True)
class LatentShape:
    """Latent grid of a padded image: y is (M, h, w), z is (N, h/4, w/4)."""

    M: int
    N: int
    height: int  # y rows
    width: int   # y columns

    @property
    def z_shape(self) -> tuple[int, int, int]:
        return (self.N, self.height // 4, self.width // 4)

    @property
    def y_shape(self) -> tuple[int, int, int]:
        return (self.M, self.height, self.width)


@dataclass(frozen=True)
class CodedLatents:
    """Streams in the architecture's order, and ŷ exactly as the decoder will rebuild it."""

    streams: list[bytes]
    y_hat: np.ndarray  # float64 (M, h, w)
    z_hat: np.ndarray  # int64 (N, h/4, w/4)


def _z_model(runtime, shape: tuple[int, int, int]) -> E.IndexedModel:
    ids = np.repeat(np.arange(shape[0], dtype=np.int32), shape[1] * shape[2])
    return E.IndexedModel(runtime.z_tables, ids)


def _y_model(raw_scale: np.ndarray) -> E.ConditionalModel:
    return E.ConditionalModel.from_mean_scale(Family.GAUSSIAN, np.zeros(raw_scale.size), raw_scale.ravel())


def _quantize_z(z: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(z, np.float64)), -Z_CLAMP, Z_CLAMP).astype(np.int64)


class HyperpriorLatents:
    """Mean-scale hyperprior: streams ``z`` then ``y``."""

    stream_names = ("z", "y")

    def __init__(self, runtime):
        self.runtime = runtime

    def encode(self, y: np.ndarray, z: np.ndarray) -> CodedLatents:
        """``y`` (M, h, w) float, ``z`` (N, h/4, w/4) float or integer (rounded here)."""
        z_hat = _quantize_z(z)
        mean, raw_scale = self.runtime.int_hs(z_hat)
        mean, raw_scale = mean[0], raw_scale[0]
        symbols = np.rint(np.asarray(y, np.float64) - mean).astype(np.int32)
        streams = [E.encode(z_hat.astype(np.int32).ravel(), _z_model(self.runtime, z_hat.shape)),
                   E.encode(symbols.ravel(), _y_model(raw_scale))]
        return CodedLatents(streams, symbols + mean, z_hat)

    def decode(self, streams: list[bytes], shape: LatentShape, where: str) -> np.ndarray:
        z_hat = self._decode_z(streams[0], shape, where)
        mean, raw_scale = self.runtime.int_hs(z_hat)
        symbols = E.decode(streams[1], _y_model(raw_scale[0]), where=f"{where} y stream")
        return symbols.reshape(shape.y_shape) + mean[0]

    def _decode_z(self, stream: bytes, shape: LatentShape, where: str) -> np.ndarray:
        z = E.decode(stream, _z_model(self.runtime, shape.z_shape), where=f"{where} z stream")
        return z.reshape(shape.z_shape).astype(np.int64)


class CheckerboardLatents(HyperpriorLatents):
    """Checkerboard context (He et al. 2021): streams ``z``, ``y-anchors``, ``y-rest``."""

    stream_names = ("z", "y-anchors", "y-rest")

    def encode(self, y: np.ndarray, z: np.ndarray) -> CodedLatents:
        z_hat = _quantize_z(z)
        mean, raw_scale = self.runtime.int_hs(z_hat)
        mean, raw_scale = mean[0], raw_scale[0]
        y = np.asarray(y, np.float64)
        anchors = anchor_mask(*y.shape[1:]).numpy()[0, 0].astype(bool)
        symbols = np.rint(y - mean).astype(np.int32)
        y_anchor_hat = np.where(anchors, symbols + mean, 0.0)
        mean, raw_scale = self._refine(y_anchor_hat, mean, raw_scale, anchors)
        symbols = np.where(anchors, symbols, np.rint(y - mean).astype(np.int32))
        rest = ~anchors
        streams = [E.encode(z_hat.astype(np.int32).ravel(), _z_model(self.runtime, z_hat.shape)),
                   E.encode(symbols[:, anchors].ravel(), _y_model(raw_scale[:, anchors])),
                   E.encode(symbols[:, rest].ravel(), _y_model(raw_scale[:, rest]))]
        return CodedLatents(streams, symbols + mean, z_hat)

    def decode(self, streams: list[bytes], shape: LatentShape, where: str) -> np.ndarray:
        z_hat = self._decode_z(streams[0], shape, where)
        mean, raw_scale = self.runtime.int_hs(z_hat)
        mean, raw_scale = mean[0], raw_scale[0]
        anchors = anchor_mask(shape.height, shape.width).numpy()[0, 0].astype(bool)
        symbols = np.zeros(shape.y_shape, np.int32)
        symbols[:, anchors] = E.decode(streams[1], _y_model(raw_scale[:, anchors]),
                                       where=f"{where} y-anchors stream").reshape(shape.M, -1)
        y_anchor_hat = np.where(anchors, symbols + mean, 0.0)
        mean, raw_scale = self._refine(y_anchor_hat, mean, raw_scale, anchors)
        rest = ~anchors
        symbols[:, rest] = E.decode(streams[2], _y_model(raw_scale[:, rest]),
                                    where=f"{where} y-rest stream").reshape(shape.M, -1)
        return symbols + mean

    def _refine(self, y_anchor_hat: np.ndarray, mean: np.ndarray, raw_scale: np.ndarray,
                anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d_mean, d_scale = self.runtime.int_context(y_anchor_hat, mean, raw_scale)
        return (np.where(anchors, mean, mean + d_mean[0]), np.where(anchors, raw_scale, raw_scale + d_scale[0]))


def latent_coder_for(runtime):
    """The latent coder of the runtime's architecture."""
    if runtime.int_context is not None:
        return CheckerboardLatents(runtime)
    if runtime.int_hs is None:
        raise InputError(f"{runtime.path}: weights have no integer hyper-synthesis")
    return HyperpriorLatents(runtime)
