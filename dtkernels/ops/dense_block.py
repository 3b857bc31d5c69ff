"""dense_block: the DenseNet-BC block on one shared buffer (dtkernels.nn.DenseBlock).

The op, its backward and its autograd are an ATen composition in C++
(csrc/ops/dense_block.cpp, where the design is described): one output buffer that
every layer writes its features into, backward recomputing both BN-ReLUs from the
saved bottlenecks and statistics, so saved memory grows linearly with depth. This
file holds what the C++ side does not: the argument checks' Python twin (for the
fake kernel, so torch.compile reports bad input at trace time), the fake kernels,
the double-backward error, and the function nn.DenseBlock calls.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ._common import check_tensor, decomposition, suggest_memory_format, transform_active

OP = "dense_block"
PER_LAYER = 6  # norm1.weight, norm1.bias, conv1.weight, norm2.weight, norm2.bias, conv2.weight


def _format(t: Tensor) -> torch.memory_format:
    return torch.channels_last if suggest_memory_format(t) == torch.channels_last else torch.contiguous_format


def _check(x, weights, running, growth_rate, training, eps):
    check_tensor(OP, "x", x)
    if x.dim() != 4:
        raise ValueError(f"{OP}: x must be 4-D (N, C, H, W), got {x.dim()}-D")
    if not weights or len(weights) % PER_LAYER:
        raise ValueError(f"{OP}: weights must hold {PER_LAYER} tensors per layer, got {len(weights)}")
    layers = len(weights) // PER_LAYER
    if len(running) != (0 if training else 4 * layers):
        raise ValueError(f"{OP}: running must be empty in training mode and hold 4 tensors per layer in eval "
                         f"mode, got {len(running)}")
    c = x.shape[1]
    # The convolutions may run in one 16-bit dtype below x's (torch.autocast's mixed precision).
    conv_dtype = weights[2].dtype
    conv_ok = conv_dtype in (x.dtype, torch.float16, torch.bfloat16)
    for i in range(layers):
        n1w, _, c1w, _, _, c2w = weights[PER_LAYER * i:PER_LAYER * (i + 1)]
        if n1w.shape[0] != c + i * growth_rate or c1w.shape[1] != c + i * growth_rate:
            raise ValueError(f"{OP}: layer {i + 1} expects {c1w.shape[1]} input channels, but x has {c} and "
                             f"growth_rate is {growth_rate}")
        if c2w.shape[0] != growth_rate or c2w.shape[1] != c1w.shape[0]:
            raise ValueError(f"{OP}: layer {i + 1}'s conv2 must map {c1w.shape[0]} to {growth_rate} channels, "
                             f"got weight {list(c2w.shape)}")
        for k, t in enumerate(weights[PER_LAYER * i:PER_LAYER * (i + 1)]):
            if t.device != x.device or not (conv_ok and t.dtype == conv_dtype if k in (2, 5) else t.dtype == x.dtype):
                raise ValueError(f"{OP}: weights must match x's dtype and device ({x.dtype}, {x.device}), got "
                                 f"{t.dtype} on {t.device} (the conv weights may instead all be one 16-bit dtype)")
    if training and x.shape[0] * x.shape[2] * x.shape[3] <= 1:
        raise ValueError(f"{OP}: expected more than 1 value per channel when training, got input size "
                         f"{list(x.shape)}")


# ---- registration: fake kernels, double backward, decomposition -----------------------------


@decomposition(OP)
def _decompose(x, weights, running, growth_rate, training, eps):
    return reference.dense_block(x, weights, running, growth_rate, training, eps)


def _fake(x, weights, running, growth_rate, training, eps):
    _check(x, weights, running, growth_rate, training, eps)
    n, c0, h, w = x.shape
    layers, g, width = len(weights) // PER_LAYER, growth_rate, weights[2].shape[0]
    fmt = _format(x)

    def empty(*shape, memory_format=torch.contiguous_format, dtype=x.dtype):
        return torch.empty(shape, dtype=dtype, device=x.device, memory_format=memory_format)

    out = empty(n, c0 + layers * g, h, w, memory_format=fmt)
    # The bottlenecks are conv outputs: in the conv weights' dtype.
    bottlenecks = [empty(n, width, h, w, memory_format=fmt, dtype=weights[2].dtype) for _ in range(layers)]
    stats = []
    if training:
        c1 = c0 + (layers - 1) * g
        stats = [empty(c1) for _ in range(3)] + [empty(layers, width) for _ in range(3)]
    return out, bottlenecks, stats


def _fake_backward(grad_out, out, bottlenecks, stats, weights, running, growth_rate, training, eps):
    layers = len(bottlenecks)
    if not layers or len(weights) != PER_LAYER * layers or len(stats) != (6 if training else 0) or \
            len(running) != (0 if training else 4 * layers):
        raise ValueError(f"{OP}_backward: for {layers} bottlenecks expected {PER_LAYER * layers} weights, "
                         f"{6 if training else 0} statistics and {0 if training else 4 * layers} running statistics, "
                         f"got {len(weights)}, {len(stats)} and {len(running)}")
    c0 = out.shape[1] - len(bottlenecks) * growth_rate
    gx = torch.empty((out.shape[0], c0, *out.shape[2:]), dtype=out.dtype, device=out.device,
                     memory_format=_format(out))
    return gx, [torch.empty_like(t) for t in weights]


torch.library.register_fake("dtkernels::dense_block", _fake)
torch.library.register_fake("dtkernels::dense_block_backward", _fake_backward)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("dtkernels.nn.DenseBlock does not support double backward")


torch.library.register_autograd("dtkernels::dense_block_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def dense_block(x: Tensor, weights: list[Tensor], running: list[Tensor], growth_rate: int, training: bool,
                eps: float = 1e-5):
    """Runs the block; returns (output, batch statistics). The statistics (training
    only: channel means, unbiased variances and invstds of the buffer, then of each layer's
    bottleneck) are what the caller folds into the running statistics."""
    if not isinstance(x, Tensor):
        _check(x, weights, running, growth_rate, training, eps)  # the friendly TypeError; the op checks tensors
    if transform_active():
        _check(x, weights, running, growth_rate, training, eps)
        out, _, stats = _decompose(x, weights, running, growth_rate, training, eps)
        return out, stats
    out, _, stats = torch.ops.dtkernels.dense_block(x, weights, running, growth_rate, training, eps)
    return out, stats
