"""The metrics behind bench/rd.py's numbers: MS-SSIM, PSNR and the Bjøntegaard delta rate.

Kept apart from the benchmark driver so tests (tests/test_metrics.py) and other scripts use the
same functions; ``python bench/rd.py --selftest`` runs :func:`selftest`.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["MS_SSIM_WEIGHTS", "ms_ssim", "mse_rgb", "psnr_from_mse", "bd_rate", "selftest"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, Table / eq. (7)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _ssim_components(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, data_range: float,
                     k1: float = 0.01, k2: float = 0.03) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and mean contrast-structure term per channel; x, y: (1, C, H, W) float64.

    Gaussian-weighted local statistics (separable window, 'valid' filtering, no
    padding), population (biased) variances, as in Wang's reference code.
    """
    c = x.shape[1]
    kh = window.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    kv = window.view(1, 1, -1, 1).expand(c, 1, -1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kh, groups=c), kv, groups=c)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x ** 2
    syy = blur(y * y) - mu_y ** 2
    sxy = blur(x * y) - mu_x * mu_y
    cs_map = (2 * sxy + c2) / (sxx + syy + c2)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1) * cs_map
    return ssim_map.mean(dim=(0, 2, 3)), cs_map.mean(dim=(0, 2, 3))


def ms_ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, dtype: torch.dtype = torch.float32) -> float:
    """5-scale MS-SSIM (Wang, Simoncelli & Bovik 2003) of two (H, W, C) images.

    Standard parameters: Gaussian window 11x11, σ = 1.5, K1 = 0.01, K2 = 0.03,
    weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), 2x2 average-pool
    downsampling between scales; contrast-structure at scales 1-4, full SSIM at
    scale 5. Computed per channel (negative terms clamped to 0 as in
    pytorch-msssim / TF) and averaged over the channels (RGB).

    The local statistics run in ``dtype`` on data scaled to [0, 1] (float32 by
    default: 4x faster than float64 on CPU and within ~2e-7 of it on Kodak,
    see :func:`selftest`); the final product is float64.
    """
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    levels = len(MS_SSIM_WEIGHTS)
    if min(a.shape[:2]) < (11 - 1) * 2 ** (levels - 1) + 1:
        raise ValueError(f"image {a.shape[1]}x{a.shape[0]} too small for {levels}-scale MS-SSIM (needs >= 161 px)")
    x = torch.from_numpy(np.array(a, dtype=np.float64) / data_range).permute(2, 0, 1)[None].to(dtype)
    y = torch.from_numpy(np.array(b, dtype=np.float64) / data_range).permute(2, 0, 1)[None].to(dtype)
    window = _gaussian_window().to(dtype)
    weights = torch.tensor(MS_SSIM_WEIGHTS, dtype=torch.float64)
    terms = []
    for level in range(levels):
        ssim_c, cs_c = _ssim_components(x, y, window, 1.0)
        if level < levels - 1:
            terms.append(torch.relu(cs_c).double())
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)  # floor on odd sizes, like pytorch-msssim / TF
        else:
            terms.append(torch.relu(ssim_c).double())
    stacked = torch.stack(terms)  # (levels, C)
    per_channel = torch.prod(stacked ** weights[:, None], dim=0)
    return float(per_channel.mean())


def mse_rgb(a: np.ndarray, b: np.ndarray) -> float:
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(np.mean(d * d))


def psnr_from_mse(mse: float, peak: float = 255.0) -> float:
    """PSNR of an 8-bit MSE: the project's one PSNR (``ncz.codec.train.psnr``) at peak 255."""
    from ncz.codec.train import psnr

    return psnr(mse, peak=peak)


# --------------------------------------------------------------------------
# BD-rate
# --------------------------------------------------------------------------


def _monotone_curve(rate: list[float], psnr: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Points sorted by PSNR, keeping only those that raise both rate and PSNR (an RD curve)."""
    pts = sorted((p, r) for r, p in zip(rate, psnr) if r > 0 and math.isfinite(p))
    keep: list[tuple[float, float]] = []
    for p, r in pts:
        if keep and (p <= keep[-1][0] + 1e-9 or r <= keep[-1][1]):
            continue
        keep.append((p, r))
    return np.array([p for p, _ in keep]), np.log10(np.array([r for _, r in keep]))


def bd_rate(rate_ref: list[float], psnr_ref: list[float], rate_test: list[float], psnr_test: list[float],
            method: str = "pchip") -> dict[str, Any]:
    """Bjøntegaard delta rate of ``test`` against ``ref`` in percent (negative: test saves bits).

    ``method``: ``"pchip"`` (monotone piecewise cubic in log10 rate vs PSNR,
    integrated exactly) or ``"cubic"`` (VCEG-M33's 3rd-order polynomial fit).
    """
    from scipy.interpolate import PchipInterpolator

    p1, l1 = _monotone_curve(rate_ref, psnr_ref)
    p2, l2 = _monotone_curve(rate_test, psnr_test)
    out: dict[str, Any] = {"method": method, "points_ref": int(p1.size), "points_test": int(p2.size),
                           "psnr_range_ref": [float(p1.min()), float(p1.max())] if p1.size else None,
                           "psnr_range_test": [float(p2.min()), float(p2.max())] if p2.size else None}
    need = 2 if method == "pchip" else 4
    if p1.size < need or p2.size < need:
        out.update(bd_rate=None, note=f"need >= {need} monotone RD points per curve")
        return out
    lo, hi = max(p1.min(), p2.min()), min(p1.max(), p2.max())
    out["overlap_psnr"] = [float(lo), float(hi)] if hi > lo else None
    out["overlap_db"] = float(max(hi - lo, 0.0))
    if hi <= lo:
        out.update(bd_rate=None, note=f"PSNR ranges do not overlap (gap {lo - hi:.2f} dB)")
        return out
    if method == "pchip":
        int1 = PchipInterpolator(p1, l1).integrate(lo, hi)
        int2 = PchipInterpolator(p2, l2).integrate(lo, hi)
    else:
        poly1, poly2 = np.polyint(np.polyfit(p1, l1, 3)), np.polyint(np.polyfit(p2, l2, 3))
        int1 = np.polyval(poly1, hi) - np.polyval(poly1, lo)
        int2 = np.polyval(poly2, hi) - np.polyval(poly2, lo)
    avg_diff = (int2 - int1) / (hi - lo)
    out["bd_rate"] = float((10.0 ** avg_diff - 1.0) * 100.0)
    frac = out["overlap_db"] / min(p1.max() - p1.min(), p2.max() - p2.min())
    out["overlap_fraction_of_shorter"] = float(frac)
    if out["overlap_db"] < 1.0 or frac < 0.3:
        out["note"] = (f"ranges barely overlap ({out['overlap_db']:.2f} dB, {100 * frac:.0f}% of the shorter curve): "
                       "the number describes only that sliver")
    return out


# --------------------------------------------------------------------------
# self-test
# --------------------------------------------------------------------------


def selftest() -> int:
    rng = np.random.default_rng(0)
    base = np.clip(rng.normal(128, 40, (256, 320, 3)), 0, 255)
    # smooth it so it looks a bit more like an image
    img = torch.from_numpy(base).permute(2, 0, 1)[None]
    img = F.avg_pool2d(F.pad(img, (2, 2, 2, 2), mode="replicate"), 5, stride=1)[0].permute(1, 2, 0).numpy()
    img = np.rint(img).astype(np.uint8)
    v = ms_ssim(img, img)
    assert abs(v - 1.0) < 1e-12, v
    last = 1.0
    for sigma in (1, 2, 5, 10, 20, 40):
        noisy = np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)
        s = ms_ssim(img, noisy)
        assert 0 < s < last, (sigma, s, last)
        last = s
    noisy = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    d = abs(ms_ssim(img, noisy) - ms_ssim(img, noisy, dtype=torch.float64))
    assert d < 1e-6, d
    # single-scale SSIM of a constant shift: luminance term only, closed form
    const = np.full((200, 200, 3), 100.0)
    ssim_c, cs_c = _ssim_components(torch.from_numpy(const).permute(2, 0, 1)[None],
                                    torch.from_numpy(const + 10).permute(2, 0, 1)[None], _gaussian_window(), 255.0)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 110 + c1) / (100 ** 2 + 110 ** 2 + c1)
    assert torch.allclose(ssim_c, torch.full_like(ssim_c, expected)) and torch.allclose(cs_c, torch.ones_like(cs_c))
    # BD-rate: a curve against itself is 0 %; a curve with every rate ×0.8 is -20 %
    rate, psnr = [0.2, 0.4, 0.8, 1.6], [28.0, 31.0, 34.0, 37.0]
    for method in ("pchip", "cubic"):
        assert abs(bd_rate(rate, psnr, rate, psnr, method)["bd_rate"]) < 1e-9
        assert abs(bd_rate(rate, psnr, [0.8 * r for r in rate], psnr, method)["bd_rate"] + 20.0) < 1e-6
    try:  # optional cross-check against an independent implementation
        from pytorch_msssim import ms_ssim as ref_ms_ssim

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a.astype(np.float64)).permute(2, 0, 1)[None]

        ref = float(ref_ms_ssim(t(img), t(noisy), data_range=255.0, size_average=True))
        ours = ms_ssim(img, noisy, dtype=torch.float64)
        assert abs(ref - ours) < 1e-6, (ref, ours)
        log(f"selftest: pytorch-msssim agrees ({ours:.6f} vs {ref:.6f})")
    except ImportError:
        log("selftest: pytorch-msssim not installed; skipped the cross-check")
    log("selftest: OK")
    return 0
