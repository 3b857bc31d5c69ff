"""Modules over the dtkernels ops, drop-in for their torch.nn counterparts."""
from __future__ import annotations

from torch import Tensor, nn

from . import ops


class ResidualAdd(nn.Module):
    """``act(x + alpha * fx)``: the ResNet block's closing ``relu(x + F(x))``."""

    def __init__(self, alpha: float = 1.0, activation: str | None = "relu"):
        super().__init__()
        ops._common.check_activation("ResidualAdd", activation)
        self.alpha, self.activation = float(alpha), activation

    def forward(self, x: Tensor, fx: Tensor) -> Tensor:
        return ops.residual_add(x, fx, alpha=self.alpha, activation=self.activation)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, activation={self.activation!r}"


class ConcatSkip(nn.Module):
    """``cat([up(x), skip], 1)``: the U-Net decoder's upsample-and-concatenate, in one
    pass. ``upsample`` is None, "nearest" or "bilinear" (align_corners=False)."""

    def __init__(self, upsample: str | None = "nearest", scale_factor: int = 2):
        super().__init__()
        ops._common.check_upsample("ConcatSkip", upsample)
        self.upsample = upsample
        self.scale_factor = ops._common.check_scale_factor("ConcatSkip", scale_factor)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return ops.concat_skip(x, skip, upsample=self.upsample, scale_factor=self.scale_factor)

    def extra_repr(self) -> str:
        return f"upsample={self.upsample!r}, scale_factor={self.scale_factor}"
