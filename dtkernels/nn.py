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


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments, attributes and repr) on dtkernels.max_pool2d."""

    def forward(self, input: Tensor):
        return ops.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                              ceil_mode=self.ceil_mode, return_indices=self.return_indices)
