"""Compact modules holding a weight as its factors: ``LowRankLinear``, ``LowRankConv2d``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ncz.format import UsageError

__all__ = ["LowRankLinear", "LowRankConv2d"]


class LowRankLinear(nn.Module):
    """``nn.Linear`` with its weight held as factors: y = (x·Vᵀ)·Uᵀ + b.

    r·(in + out) parameters instead of in·out, and as many multiply-adds per
    input row: cheaper in memory and compute whenever r < in·out/(in + out).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise UsageError(f"rank {rank} is outside 1..{min(in_features, out_features)}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = {"device": device, "dtype": dtype}
        self.u = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.v = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features, **kw)) if bias else None)
        nn.init.normal_(self.u, std=rank**-0.5)
        nn.init.normal_(self.v, std=in_features**-0.5)

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """A module holding copies of ``u`` [out, r] and ``v`` [r, in]; a ``bias`` that is an
        ``nn.Parameter`` is shared, not copied (so loads into the original's bias still land)."""
        module = cls(v.shape[1], u.shape[0], u.shape[1], bias is not None, device=u.device, dtype=u.dtype)
        with torch.no_grad():
            module.u.copy_(u)
            module.v.copy_(v)
            if isinstance(bias, nn.Parameter):
                module.bias = bias
            elif bias is not None:
                module.bias.copy_(bias)
        return module

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight U·V (computed on demand; not a parameter)."""
        return self.u @ self.v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v), self.u, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


class LowRankConv2d(nn.Module):
    """``nn.Conv2d`` (groups = 1) as a conv to ``rank`` channels (V) followed by a 1×1 conv (U) + bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], rank: int, *,
                 stride=1, padding=0, dilation=1, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kh, kw_ = kernel_size
        if not 1 <= rank <= min(out_channels, in_channels * kh * kw_):
            raise UsageError(f"rank {rank} is outside 1..{min(out_channels, in_channels * kh * kw_)}")
        self.in_channels, self.out_channels, self.kernel_size, self.rank = in_channels, out_channels, (kh, kw_), rank
        self.stride, self.padding, self.dilation = stride, padding, dilation
        kw = {"device": device, "dtype": dtype}
        self.u = nn.Parameter(torch.empty(out_channels, rank, **kw))
        self.v = nn.Parameter(torch.empty(rank, in_channels * kh * kw_, **kw))
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_channels, **kw)) if bias else None)
        nn.init.normal_(self.u, std=rank**-0.5)
        nn.init.normal_(self.v, std=(in_channels * kh * kw_) ** -0.5)

    @property
    def weight(self) -> torch.Tensor:
        return (self.u @ self.v).reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.conv2d(x, self.v.reshape(self.rank, self.in_channels, *self.kernel_size), None,
                          self.stride, self.padding, self.dilation)
        return F.conv2d(hidden, self.u[:, :, None, None], self.bias)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
                f"stride={self.stride}, padding={self.padding}")
