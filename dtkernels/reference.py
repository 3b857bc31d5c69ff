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
    """Eager's gradient of relu(x + scale * fx) w.r.t. fx (x: scale 1): the ReLU mask
    rebuilt from the output, as ATen's threshold_backward (a NaN output passes its
    gradient), then times scale (a blocked element is 0 * scale)."""
    g = torch.where(out <= 0, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device), grad_out)
    return g if scale == 1.0 else g * scale


def _interpolate_kwargs(upsample: str, align_corners: bool = False) -> dict:
    return {"mode": upsample, "align_corners": align_corners} if upsample == "bilinear" else {"mode": upsample}


def concat_skip(x: Tensor, skip: Tensor, upsample: str | None = None, scale_factor: int = 2,
                align_corners: bool = False, skip_first: bool = False) -> Tensor:
    """cat([up(x), skip], 1) (or cat([skip, up(x)], 1)) as eager PyTorch writes it:
    F.interpolate, then torch.cat."""
    if upsample is None:
        up = x
    elif x.numel() == 0:  # F.interpolate refuses empty tensors; any mode repeats nothing
        up = x.repeat_interleave(scale_factor, 2).repeat_interleave(scale_factor, 3)
    else:
        up = F.interpolate(x, scale_factor=scale_factor, **_interpolate_kwargs(upsample, align_corners))
    return torch.cat([skip, up] if skip_first else [up, skip], 1)


def concat_skip_backward(grad_up: Tensor, upsample: str | None, scale_factor: int,
                         align_corners: bool = False) -> Tensor:
    """The upsample's adjoint, by ATen's own backward kernels: x's gradient from the
    x-part (N, Cx, H*s, W*s) of the output gradient."""
    n, c, h, w = grad_up.shape
    s = scale_factor
    if upsample is None or grad_up.numel() == 0:
        return grad_up.clone() if upsample is None else grad_up.new_empty(n, c, h // s, w // s)
    args = ([h, w], [n, c, h // s, w // s])
    if upsample == "nearest":
        return torch.ops.aten.upsample_nearest2d_backward(grad_up, *args, float(s), float(s))
    return torch.ops.aten.upsample_bilinear2d_backward(grad_up, *args, align_corners, float(s), float(s))


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


def dense_block(x: Tensor, weights: list[Tensor], running: list[Tensor], growth_rate: int, training: bool,
                eps: float) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The dense_block op's outputs from ATen ops (the decomposition torch.export
    uses): the block's output, each layer's bottleneck (conv1 output) and, in
    training, the batch statistics: mean, unbiased variance and invstd of the
    buffer's channels (all but the last layer's), then of each bottleneck (one row
    per layer). Convolutions run in the conv weights' dtype, which may be one 16-bit
    dtype below x's (torch.autocast); normalisation in x's."""
    layers = len(weights) // 6
    conv_dtype = weights[2].dtype

    def batch_stats(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        biased, mean = torch.var_mean(t.to(x.dtype), dim=(0, 2, 3), correction=0)
        n = t.numel() // t.shape[1]
        return mean, biased * (n / max(n - 1, 1)), torch.rsqrt(biased + eps)

    def bn_relu(t: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        scale = weight * invstd
        return torch.relu(t * scale[:, None, None] + (bias - mean * scale)[:, None, None])

    features, bottlenecks, stats1, stats2 = [x], [], [], []
    for i in range(layers):
        n1w, n1b, c1w, n2w, n2b, c2w = weights[6 * i:6 * (i + 1)]
        if training:
            stats1.append(batch_stats(features[-1]))
            m1, is1 = (torch.cat([s[k] for s in stats1]) for k in (0, 2))
        else:
            m1, is1 = running[4 * i], torch.rsqrt(running[4 * i + 1] + eps)
        prefix = torch.cat(features, 1) if len(features) > 1 else x
        z = F.conv2d(bn_relu(prefix, m1, is1, n1w, n1b).to(conv_dtype), c1w)
        if training:
            stats2.append(batch_stats(z))
            m2, is2 = stats2[-1][0], stats2[-1][2]
        else:
            m2, is2 = running[4 * i + 2], torch.rsqrt(running[4 * i + 3] + eps)
        a2 = bn_relu(z.to(x.dtype), m2, is2, n2w, n2b)
        features.append(F.conv2d(a2.to(conv_dtype), c2w, padding=1).to(x.dtype))
        bottlenecks.append(z)
    stats = []
    if training:
        stats = [torch.cat([s[k] for s in stats1]) for k in range(3)]
        stats += [torch.stack([s[k] for s in stats2]) for k in range(3)]
    return torch.cat(features, 1), bottlenecks, stats


# --- max_pool2d -----------------------------------------------------------------------
# The oracle reproduces ATen's CPU kernel (NCHW and channels_last agree), found by
# experiment: taps are scanned row-major and a value replaces the running maximum
# when it is greater or NaN, starting from -inf at the window's first tap past the
# top/left padding. So a NaN wins and the *last* NaN's index is reported, ties keep
# the first maximum, an all -inf window reports its first tap inside the input, and a
# window with no tap inside the input (only possible with dilation, e.g. H=2, k=2,
# d=3, p=1) gives -inf with ATen's out-of-range index (its backward then writes out of
# bounds; ours drops that gradient). ATen's CUDA kernels use the same rule.

def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def pool_output_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """ATen's pooling_output_shape: ceil_mode keeps a last window only if it starts
    inside the input or its left padding."""
    o = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (o - 1) * s >= size + p:
        o -= 1
    return o


def _first_tap(o: Tensor, s: int, p: int, d: int) -> Tensor:
    """Per window, the first tap past the leading padding: ceil(max(0, p - o*s) / d)."""
    return ((p - o * s).clamp(min=0) + d - 1) // d


def max_pool2d_indices(taps: Tensor, input_hw, kernel_size, stride, padding, dilation) -> tuple[Tensor, Tensor]:
    """From window taps (i*kw + j, any integer dtype, shape (..., Ho, Wo)) to ATen's
    flat int64 index ih*W + iw, and whether that tap lies inside the input."""
    H, W = input_hw
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(a) for a in (kernel_size, stride, padding, dilation))
    Ho, Wo = taps.shape[-2:]
    dev = taps.device
    t = taps.long()
    ih = (torch.arange(Ho, device=dev) * sh - ph)[:, None] + (t // kw) * dh
    iw = (torch.arange(Wo, device=dev) * sw - pw) + (t % kw) * dw
    inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return ih * W + iw, inside


def max_pool2d_with_taps(input: Tensor, kernel_size, stride=None, padding=0, dilation=1,
                         ceil_mode: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(values, ATen's int64 indices, window taps i*kw + j) of F.max_pool2d, contiguous."""
    k = _pair(kernel_size)
    s = k if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _pair(stride)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = k, s, _pair(padding), _pair(dilation)
    x = input if input.dim() == 4 else input.unsqueeze(0)
    N, C, H, W = x.shape
    Ho = pool_output_size(H, kh, sh, ph, dh, ceil_mode)
    Wo = pool_output_size(W, kw, sw, pw, dw, ceil_mode)
    dev = x.device
    oh, ow = torch.arange(Ho, device=dev), torch.arange(Wo, device=dev)
    ih = oh[:, None] * sh - ph + torch.arange(kh, device=dev) * dh  # (Ho, kh)
    iw = ow[:, None] * sw - pw + torch.arange(kw, device=dev) * dw  # (Wo, kw)
    valid = (((ih >= 0) & (ih < H))[:, None, :, None] & ((iw >= 0) & (iw < W))[None, :, None, :])
    valid = valid.reshape(Ho, Wo, kh * kw)
    v = x[:, :, ih.clamp(0, H - 1)][..., iw.clamp(0, W - 1)]  # (N, C, Ho, kh, Wo, kw)
    v = v.permute(0, 1, 2, 4, 3, 5).reshape(N, C, Ho, Wo, kh * kw)
    K = kh * kw
    nan = v.isnan() & valid
    last_nan = K - 1 - nan.flip(-1).to(torch.uint8).argmax(-1)
    ninf = torch.full((), float("-inf"), dtype=v.dtype, device=dev)
    vv = torch.where(valid & ~nan, v, ninf)
    first_max = ((vv == vv.amax(-1, keepdim=True)) & valid).to(torch.uint8).argmax(-1)
    taps = torch.where(nan.any(-1), last_nan, first_max)
    empty = ~valid.any(-1)  # no tap inside the input: ATen's first tap past the padding
    taps = torch.where(empty, _first_tap(oh, sh, ph, dh)[:, None] * kw + _first_tap(ow, sw, pw, dw), taps)
    index, inside = max_pool2d_indices(taps, (H, W), k, s, (ph, pw), (dh, dw))
    flat = x.reshape(N, C, H * W)
    out = flat.gather(-1, index.clamp(0, H * W - 1).reshape(N, C, Ho * Wo)).reshape(N, C, Ho, Wo)
    out = torch.where(inside, out, ninf)  # differentiable in x: the reference backward
    if input.dim() == 3:
        out, index, taps = out[0], index[0], taps[0]
    return out, index, taps


def max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False):
    """F.max_pool2d with ATen's CPU semantics on any device and dtype; differentiable
    (the gradient goes to each window's maximum, summed in output order)."""
    out, index, _ = max_pool2d_with_taps(input, kernel_size, stride, padding, dilation, ceil_mode)
    return (out, index) if return_indices else out


def max_pool2d_backward(grad_out: Tensor, taps: Tensor, input_size, kernel_size, stride, padding,
                        dilation) -> Tensor:
    """Gradient of max_pool2d from the window taps: each output's gradient added to its
    maximum's input position, in output order (ATen's), in float32 for 16-bit types;
    windows with no tap inside the input add nothing."""
    *lead, H, W = input_size
    index, inside = max_pool2d_indices(taps, (H, W), kernel_size, stride, padding, dilation)
    acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32  # opmath, rounded once
    g = torch.where(inside, grad_out.to(acc), torch.zeros((), dtype=acc, device=grad_out.device))
    gi = torch.zeros(*lead, H * W, dtype=acc, device=grad_out.device)
    gi.scatter_add_(-1, torch.where(inside, index, 0).flatten(-2), g.flatten(-2))
    return gi.reshape(*lead, H, W).to(grad_out.dtype)
