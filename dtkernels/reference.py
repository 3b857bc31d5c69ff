"""Pure-PyTorch oracles, one function per op: the ground truth of every test and
benchmark, and the kernels of the "reference" backend. They take the public API's
arguments and use only ATen ops, so they run on any device and dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def residual_add(x: Tensor, fx: Tensor, alpha: float = 1.0, activation: str | None = "relu") -> Tensor:
    """act(x + alpha * fx), as eager PyTorch computes it (one rounding, in opmath)."""
    y = torch.add(x, fx, alpha=alpha)
    return torch.relu(y) if activation == "relu" else y


def residual_add_backward(grad_out: Tensor, out: Tensor, scale: float = 1.0) -> Tensor:
    """scale * grad_out where out > 0, else 0: the ReLU mask rebuilt from the output."""
    g = grad_out if scale == 1.0 else grad_out * scale
    return torch.where(out > 0, g, torch.zeros((), dtype=g.dtype, device=g.device))


def _interpolate_kwargs(upsample: str) -> dict:
    return {"mode": upsample, "align_corners": False} if upsample == "bilinear" else {"mode": upsample}


def concat_skip(x: Tensor, skip: Tensor, upsample: str | None = None, scale_factor: int = 2) -> Tensor:
    """cat([up(x), skip], 1) as eager PyTorch writes it: F.interpolate, then torch.cat."""
    if upsample is None:
        up = x
    elif x.numel() == 0:  # F.interpolate refuses empty tensors; any mode repeats nothing
        up = x.repeat_interleave(scale_factor, 2).repeat_interleave(scale_factor, 3)
    else:
        up = F.interpolate(x, scale_factor=scale_factor, **_interpolate_kwargs(upsample))
    return torch.cat([up, skip], 1)


def concat_skip_backward(grad_up: Tensor, upsample: str | None, scale_factor: int) -> Tensor:
    """The upsample's adjoint, by ATen's own backward kernels: x's gradient from the
    x-part (N, Cx, H*s, W*s) of the output gradient."""
    n, c, h, w = grad_up.shape
    s = scale_factor
    if upsample is None or grad_up.numel() == 0:
        return grad_up.clone() if upsample is None else grad_up.new_empty(n, c, h // s, w // s)
    args = ([h, w], [n, c, h // s, w // s])
    if upsample == "nearest":
        return torch.ops.aten.upsample_nearest2d_backward(grad_up, *args, float(s), float(s))
    return torch.ops.aten.upsample_bilinear2d_backward(grad_up, *args, False, float(s), float(s))


class TorchvisionDenseLayer(nn.Module):
    """torchvision.models.densenet._DenseLayer (drop_rate=0, memory_efficient=False),
    transcribed: every layer concatenates all earlier features, and autograd keeps
    the concatenation, both BN-ReLU outputs and the bottleneck."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, prev_features: list[Tensor]) -> Tensor:
        concated_features = torch.cat(prev_features, 1)
        bottleneck_output = self.conv1(self.relu1(self.norm1(concated_features)))
        return self.conv2(self.relu2(self.norm2(bottleneck_output)))


class TorchvisionDenseBlock(nn.ModuleDict):
    """torchvision.models.densenet._DenseBlock, transcribed (torchvision is not a
    dependency): the oracle and baseline of dtkernels.nn.DenseBlock, with the same
    module names and state_dict keys."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int):
        super().__init__()
        for i in range(num_layers):
            layer = TorchvisionDenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size)
            self.add_module("denselayer%d" % (i + 1), layer)

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)
