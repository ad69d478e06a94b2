"""Rate control: find the quality that meets a size target (like cwebp's -size).

With gain units the quality is continuous, so this is a bisection over a real
number, not a pick among discrete levels; the rate is monotone in it.
"""

from __future__ import annotations

from .image import ImageEncoder
from .imageio import Pixels
from .weights import CodecRuntime

__all__ = ["choose_quality"]


def choose_quality(runtime: CodecRuntime, pixels: Pixels | ImageEncoder, target_bits: float, *,
                   iterations: int = 8) -> float:
    """The highest quality whose coded payload fits ``target_bits`` (the lowest if none does).

    Pass an :class:`ImageEncoder` to reuse its analysis (g_a runs once for all probes).
    """
    encoder = pixels if isinstance(pixels, ImageEncoder) else ImageEncoder(runtime, pixels)
    lo, hi = 0.0, float(runtime.config.num_levels - 1)

    def bits(q: float) -> float:
        return 8.0 * len(encoder.encode(q).payload)

    if bits(hi) <= target_bits:
        return hi
    if bits(lo) > target_bits:
        return lo
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if bits(mid) <= target_bits:
            lo = mid
        else:
            hi = mid
    return lo
