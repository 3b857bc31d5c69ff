"""Pure-PyTorch oracles, one function per op: the ground truth of every test and
benchmark, and the kernels of the "reference" backend. They take the public API's
arguments and use only ATen ops, so they run on any device and dtype."""
from __future__ import annotations

import torch
from torch import Tensor


def residual_add(x: Tensor, fx: Tensor, alpha: float = 1.0, activation: str | None = "relu") -> Tensor:
    """act(x + alpha * fx), as eager PyTorch computes it (one rounding, in opmath)."""
    y = torch.add(x, fx, alpha=alpha)
    return torch.relu(y) if activation == "relu" else y


def residual_add_backward(grad_out: Tensor, out: Tensor, scale: float = 1.0) -> Tensor:
    """scale * grad_out where out > 0, else 0: the ReLU mask rebuilt from the output."""
    g = grad_out if scale == 1.0 else grad_out * scale
    return torch.where(out > 0, g, torch.zeros((), dtype=g.dtype, device=g.device))
