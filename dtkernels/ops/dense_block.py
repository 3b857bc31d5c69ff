"""dense_block: the DenseNet-BC block on one shared buffer (dtkernels.nn.DenseBlock).

torchvision's block concatenates every earlier feature map again in every layer and
keeps, per layer, the concatenation, the BN1-ReLU output, the bottleneck and the
BN2-ReLU output for backward: saved memory grows with the square of the depth. Here:

Forward: one (N, C0 + L*g, H, W) buffer in x's memory format, which is also the
output. x is copied into its first C0 channels; layer i reads the prefix
buf[:, :C0 + i*g] (a view), computes BN1-ReLU -> 1x1 conv -> BN2-ReLU -> 3x3 conv
and copies its g new channels into its slice. In training, batch statistics are
per channel and a channel never changes once written, so each channel's mean and
variance are computed once, when it is written, and reused by every later layer's
BN1 (which only differs in its affine weights).

Saved for backward: the buffer (once: it is the output), each layer's bottleneck
(the 1x1 conv's output, bn_size*g channels: linear in depth), the per-channel
batch statistics (training) and the weights. Nothing else: BN1-ReLU of the prefix
and BN2-ReLU of the bottleneck are recomputed in backward from those, with the
forward's statistics (train) or the running ones (eval), so running statistics are
updated once, by the module, from the statistics this op returns. (Recomputing the
1x1 convolution too would cut saved memory from 0.22x to 0.05x of torchvision's at
the issue's shape, for one more convolution per layer; the bottleneck is kept.)

Backward: one gradient buffer, a copy of the output's gradient; walking the layers
backwards, layer i's gradient is complete in its slice when it is reached, and its
input gradient is added in place into the prefix slice: no per-layer concatenation
or split, no copy of the prefix. BN1 is recomputed from the prefix view as a dense
x_hat, and ATen's batch-norm backward runs on x_hat (mean 0, invstd 1, weight
scaled by invstd), which is exact and avoids ATen's slow strided path.

The ops are ATen compositions (convolutions, batch-norm backward) and run on any
device; they are registered for CPU and CUDA directly, not through the backend
registry (there is no kernel family to choose).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import check_tensor, new_empty_poisoned, suggest_memory_format

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
    for i in range(layers):
        n1w, _, c1w, _, _, c2w = weights[PER_LAYER * i:PER_LAYER * (i + 1)]
        if n1w.shape[0] != c + i * growth_rate or c1w.shape[1] != c + i * growth_rate:
            raise ValueError(f"{OP}: layer {i + 1} expects {c1w.shape[1]} input channels, but x has {c} and "
                             f"growth_rate is {growth_rate}")
        if c2w.shape[0] != growth_rate or c2w.shape[1] != c1w.shape[0]:
            raise ValueError(f"{OP}: layer {i + 1}'s conv2 must map {c1w.shape[0]} to {growth_rate} channels, "
                             f"got weight {list(c2w.shape)}")
        for t in weights[PER_LAYER * i:PER_LAYER * (i + 1)]:
            if t.dtype != x.dtype or t.device != x.device:
                raise ValueError(f"{OP}: weights must match x's dtype and device ({x.dtype}, {x.device}), got "
                                 f"{t.dtype} on {t.device}")
    if training and x.shape[0] * x.shape[2] * x.shape[3] <= 1:
        raise ValueError(f"{OP}: expected more than 1 value per channel when training, got input size "
                         f"{list(x.shape)}")


def _layer(weights, i):
    return weights[PER_LAYER * i:PER_LAYER * (i + 1)]


def _invstd(var: Tensor, eps: float) -> Tensor:
    return torch.rsqrt(var + eps)


def _bn_relu(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """relu(batch_norm(x)) with given statistics, as ATen's CPU kernel computes it
    (x * scale + shift); reads a channel-sliced view without copying it first."""
    scale = weight * invstd
    shift = bias - mean * scale
    return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1)).relu_()


def _batch_norm_train(t: Tensor, weight, bias, eps: float):
    """ATen's training-mode batch norm, as torchvision's BatchNorm2d runs it: the
    normalised output and the batch mean, unbiased variance and invstd. The running
    buffers handed to it are zeros with momentum 1, so they come back holding exactly
    the batch mean and unbiased variance ATen folds into running statistics."""
    mean, var = t.new_zeros(t.shape[1]), t.new_zeros(t.shape[1])
    y, _, invstd = torch.ops.aten.native_batch_norm(t, weight, bias, mean, var, True, 1.0, eps)
    return y, mean, var, invstd


def _forward(x, weights, running, growth_rate, training, eps):
    n, c0, h, w = x.shape
    layers, g = len(weights) // PER_LAYER, growth_rate
    fmt = _format(x)
    out = new_empty_poisoned((n, c0 + layers * g, h, w), x, fmt)  # every channel is written below
    out[:, :c0].copy_(x)
    bottlenecks, stats = [], []
    if training:
        # Per buffer channel (the last layer's features feed no norm1), then per
        # layer's bottleneck: mean, unbiased variance (for the running statistics) and
        # invstd (for backward).
        c1, width = c0 + (layers - 1) * g, weights[2].shape[0]
        stats = [x.new_empty(c1), x.new_empty(c1), x.new_empty(c1)] + [x.new_empty(layers, width) for _ in range(3)]
        mean1, var1, invstd1, mean2, var2, invstd2 = stats
        _, mean1[:c0], var1[:c0], invstd1[:c0] = _batch_norm_train(x, None, None, eps)
    for i in range(layers):
        ci = c0 + i * g
        n1w, n1b, c1w, n2w, n2b, c2w = _layer(weights, i)
        if training:
            m1, is1 = mean1[:ci], invstd1[:ci]
        else:
            m1, is1 = running[4 * i], _invstd(running[4 * i + 1], eps)
        z = F.conv2d(_bn_relu(out[:, :ci], m1, is1, n1w, n1b), c1w).contiguous(memory_format=fmt)
        if training:
            a2, mean2[i], var2[i], invstd2[i] = _batch_norm_train(z, n2w, n2b, eps)
            a2 = a2.relu_()
        else:
            a2 = _bn_relu(z, running[4 * i + 2], _invstd(running[4 * i + 3], eps), n2w, n2b)
        new = F.conv2d(a2, c2w, padding=1)
        del a2
        out[:, ci:ci + g].copy_(new)
        if training and i + 1 < layers:  # the new channels' statistics, for every later norm1
            _, mean1[ci:ci + g], var1[ci:ci + g], invstd1[ci:ci + g] = _batch_norm_train(new, None, None, eps)
        bottlenecks.append(z)
    return out, bottlenecks, stats


def _bn_relu_backward(grad: Tensor, y: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor,
                      running_mean, running_var, training: bool, eps: float):
    """Gradients of relu(batch_norm(x)) = y w.r.t. x, weight and bias, by ATen's own
    ReLU and batch-norm backward kernels."""
    grad = torch.ops.aten.threshold_backward(grad, y, 0)
    if training:
        return torch.ops.aten.native_batch_norm_backward(grad, x, weight, None, None, mean, invstd, True, eps,
                                                         [True, True, True])
    # Eval: empty saved statistics, as autograd passes them (ATen's CUDA kernel asserts
    # they are defined, then recomputes invstd from the running variance).
    none = x.new_empty(0)
    return torch.ops.aten.native_batch_norm_backward(grad, x, weight, running_mean, running_var, none, none,
                                                     False, eps, [True, True, True])


def _normalized(x: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """x_hat = (x - mean) * invstd, dense, from a (channel-sliced) view."""
    return torch.addcmul((-mean * invstd).view(1, -1, 1, 1), x, invstd.view(1, -1, 1, 1))


def _bn_relu_backward_normalized(grad: Tensor, y: Tensor, xhat: Tensor, weight: Tensor, invstd: Tensor,
                                 training: bool):
    """Gradients of y = relu(xhat * weight + bias), xhat = (x - mean) * invstd, w.r.t.
    x, weight and bias from the recomputed dense xhat, so the prefix is never copied.
    Training: ATen's batch-norm backward run on xhat as if its mean were 0 and its
    invstd 1, with weight * invstd, is exactly the batch-statistics gradient. Eval:
    the statistics are constants, x's gradient a per-channel scale."""
    grad = torch.ops.aten.threshold_backward(grad, y, 0)
    if training:
        ones = xhat.new_ones(xhat.shape[1])
        return torch.ops.aten.native_batch_norm_backward(grad, xhat, weight * invstd, None, None, ones * 0, ones,
                                                         True, 0.0, [True, True, True])
    dims = (0, 2, 3)
    return grad * (weight * invstd).view(1, -1, 1, 1), (grad * xhat).sum(dims), grad.sum(dims)


def _conv_backward(grad: Tensor, inp: Tensor, weight: Tensor, padding: int):
    gi, gw, _ = torch.ops.aten.convolution_backward(grad, inp, weight, None, [1, 1], [padding, padding], [1, 1],
                                                    False, [0, 0], 1, [True, True, False])
    return gi, gw


def _like(grad: Tensor, weight: Tensor) -> Tensor:
    """The gradient in its weight's layout (what the fake kernel promises)."""
    return grad if grad.stride() == weight.stride() else torch.empty_like(weight).copy_(grad)


def _backward(grad_out, out, bottlenecks, stats, weights, running, growth_rate, training, eps):
    layers, g = len(bottlenecks), growth_rate
    c0 = out.shape[1] - layers * g
    fmt = _format(out)
    # One gradient buffer for the whole block: each layer's input gradient is added
    # into its prefix, so a layer's own slice is complete when the walk reaches it.
    gbuf = torch.empty_like(out, memory_format=fmt).copy_(grad_out)
    if training:
        mean1, _, invstd1, mean2, _, invstd2 = stats
    grads: list[Tensor] = [None] * len(weights)  # type: ignore[list-item]
    for i in reversed(range(layers)):
        ci = c0 + i * g
        n1w, n1b, c1w, n2w, n2b, c2w = _layer(weights, i)
        if training:
            m1, is1, m2, is2, rm2, rv2 = mean1[:ci], invstd1[:ci], mean2[i], invstd2[i], None, None
        else:
            rm1, rv1, rm2, rv2 = running[4 * i:4 * i + 4]
            m1, is1, m2, is2 = rm1, _invstd(rv1, eps), rm2, _invstd(rv2, eps)
        z = bottlenecks[i]
        a2 = _bn_relu(z, m2, is2, n2w, n2b)  # recomputed, not saved
        ga2, gw2 = _conv_backward(gbuf[:, ci:ci + g], a2, c2w, 1)
        gz, gn2w, gn2b = _bn_relu_backward(ga2, a2, z, n2w, m2, is2, rm2, rv2, training, eps)
        del a2, ga2
        # BN1 is recomputed from the prefix view as a dense x_hat (ATen's batch-norm
        # backward is several times slower on a channel-sliced view), then ReLU.
        xhat = _normalized(out[:, :ci], m1, is1)
        a1 = torch.addcmul(n1b.view(1, -1, 1, 1), xhat, n1w.view(1, -1, 1, 1)).relu_()
        ga1, gw1 = _conv_backward(gz, a1, c1w, 0)
        del gz
        gp, gn1w, gn1b = _bn_relu_backward_normalized(ga1, a1, xhat, n1w, is1, training)
        del a1, ga1, xhat
        gbuf[:, :ci].add_(gp)
        layer = [gn1w, gn1b, gw1, gn2w, gn2b, gw2]
        grads[PER_LAYER * i:PER_LAYER * (i + 1)] = [_like(gr, wt) for gr, wt in zip(layer, _layer(weights, i))]
    return gbuf[:, :c0].clone(memory_format=fmt), grads


# ---- registration: kernels, fake kernels, autograd -------------------------------------


def _fake(x, weights, running, growth_rate, training, eps):
    _check(x, weights, running, growth_rate, training, eps)
    n, c0, h, w = x.shape
    layers, g, width = len(weights) // PER_LAYER, growth_rate, weights[2].shape[0]
    fmt = _format(x)

    def empty(*shape, memory_format=torch.contiguous_format):
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format)

    out = empty(n, c0 + layers * g, h, w, memory_format=fmt)
    bottlenecks = [empty(n, width, h, w, memory_format=fmt) for _ in range(layers)]
    stats = []
    if training:
        c1 = c0 + (layers - 1) * g
        stats = [empty(c1) for _ in range(3)] + [empty(layers, width) for _ in range(3)]
    return out, bottlenecks, stats


def _fake_backward(grad_out, out, bottlenecks, stats, weights, running, growth_rate, training, eps):
    c0 = out.shape[1] - len(bottlenecks) * growth_rate
    gx = torch.empty((out.shape[0], c0, *out.shape[2:]), dtype=out.dtype, device=out.device,
                     memory_format=_format(out))
    return gx, [torch.empty_like(t) for t in weights]


def _forward_kernel(x, weights, running, growth_rate, training, eps):
    _check(x, weights, running, growth_rate, training, eps)
    return _forward(x, weights, running, growth_rate, training, eps)


torch.library.register_kernel("dtkernels::dense_block", ("cpu", "cuda"), _forward_kernel)
torch.library.register_kernel("dtkernels::dense_block_backward", ("cpu", "cuda"), _backward)
torch.library.register_fake("dtkernels::dense_block", _fake)
torch.library.register_fake("dtkernels::dense_block_backward", _fake_backward)


def _setup(ctx, inputs, output):
    x, weights, running, growth_rate, training, eps = inputs
    out, bottlenecks, stats = output
    ctx.mark_non_differentiable(*bottlenecks, *stats)  # returned for backward's sake only
    ctx.counts = (len(bottlenecks), len(stats), len(weights))
    ctx.growth_rate, ctx.training, ctx.eps = growth_rate, training, eps
    # The buffer once (it is the output), the bottlenecks, the statistics, the weights.
    ctx.save_for_backward(out, *bottlenecks, *stats, *weights, *running)


def _backward_formula(ctx, grad_out, _grad_bottlenecks, _grad_stats):
    nb, ns, nw = ctx.counts
    saved = ctx.saved_tensors
    out, bottlenecks = saved[0], list(saved[1:1 + nb])
    stats = list(saved[1 + nb:1 + nb + ns])
    weights = list(saved[1 + nb + ns:1 + nb + ns + nw])
    running = list(saved[1 + nb + ns + nw:])
    gx, gw = torch.ops.dtkernels.dense_block_backward(grad_out, out, bottlenecks, stats, weights, running,
                                                      ctx.growth_rate, ctx.training, ctx.eps)
    return gx, gw, [None] * len(running), None, None, None


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("dtkernels.nn.DenseBlock does not support double backward")


torch.library.register_autograd("dtkernels::dense_block", _backward_formula, setup_context=_setup)
torch.library.register_autograd("dtkernels::dense_block_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def dense_block(x: Tensor, weights: list[Tensor], running: list[Tensor], growth_rate: int, training: bool,
                eps: float = 1e-5):
    """Runs the block; returns (output, batch statistics). The statistics (training
    only: channel means and biased variances of the buffer, then of each layer's
    bottleneck) are what the caller folds into the running statistics."""
    _check(x, weights, running, growth_rate, training, eps)
    out, _, stats = torch.ops.dtkernels.dense_block(x, weights, running, growth_rate, training, eps)
    return out, stats
