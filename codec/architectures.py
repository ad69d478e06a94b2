"""The codec architectures a weights file may name, and the one place that builds them.

A weights file records its :class:`~ncz.codec.networks.CodecConfig`, whose
``arch`` tag picks the network class; an unknown tag is refused, never
guessed. Adding an architecture is one entry here.
"""
from __future__ import annotations

from .context import CHECKERBOARD_ARCH, CheckerboardCodec
from .networks import CodecConfig, HyperpriorCodec

__all__ = ["ARCHITECTURES", "HYPERPRIOR_ARCH", "CHECKERBOARD_ARCH", "build_codec", "is_known_arch"]

HYPERPRIOR_ARCH = CodecConfig().arch

ARCHITECTURES: dict[str, type[HyperpriorCodec]] = {
    HYPERPRIOR_ARCH: HyperpriorCodec,
    CHECKERBOARD_ARCH: CheckerboardCodec,
}


def is_known_arch(arch: str) -> bool:
    return arch in ARCHITECTURES


def build_codec(config: CodecConfig) -> HyperpriorCodec:
    """A fresh network of the architecture ``config.arch`` names (ValueError if unknown)."""
    try:
        cls = ARCHITECTURES[config.arch]
    except KeyError:
        raise ValueError(f"unknown codec architecture {config.arch!r}; known: {sorted(ARCHITECTURES)}") from None
    return cls(config)
