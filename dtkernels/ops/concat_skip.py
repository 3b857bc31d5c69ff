"""concat_skip(x, skip, *, upsample=None, scale_factor=2, align_corners=False, skip_first=False)
= cat([up(x), skip], 1), or cat([skip, up(x)], 1) with skip_first.

The U-Net decoder's "upsample, then concatenate with the encoder's skip" in one pass
that reads each input once and writes one output (eager writes the upsampled x, then
copies it again into the concatenation). Backward keeps nothing: skip's gradient
is a view of the output gradient, and so is x's when there is no upsample; only the
upsample's adjoint (concat_skip_backward) runs a kernel, a deterministic gather.

Schema encoding: ``upsample`` is ``str?`` (None, "nearest" or "bilinear"),
``scale_factor`` a positive int that is ignored when upsample is None,
``align_corners`` F.interpolate's (bilinear only; ATen's scale (in - 1) / (out - 1)). The output's spatial size is skip's; x's H and W
times scale_factor must equal it. The output is channels_last when x and skip both
are, NCHW otherwise: the format torch.cat gives.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _C, backends, reference
from ._common import (cat_memory_format, check_align_corners, check_same, check_scale_factor, check_tensor,
                      check_upsample, decomposition, empty_in, suggest_memory_format, transform_active, unboxed_ok)

OP = "concat_skip"


def _check(x, skip, upsample=None, scale_factor=2, align_corners=False, skip_first=False):
    check_tensor(OP, "x", x)
    check_tensor(OP, "skip", skip)
    if x.dim() != 4 or skip.dim() != 4:
        raise ValueError(f"{OP}: x and skip must be 4-D (N, C, H, W), got {x.dim()}-D and {skip.dim()}-D")
    check_same(OP, "x", x, "skip", skip, shape=False)
    check_upsample(OP, upsample)
    check_align_corners(OP, upsample, align_corners)
    if x.shape[0] != skip.shape[0]:
        raise ValueError(f"{OP}: x and skip must have the same batch size, got {x.shape[0]} and {skip.shape[0]}")
    s = 1 if upsample is None else check_scale_factor(OP, scale_factor)
    if x.shape[2] * s != skip.shape[2] or x.shape[3] * s != skip.shape[3]:
        times = "" if upsample is None else f" times scale_factor {s}"
        raise ValueError(f"{OP}: x's spatial size {list(x.shape[2:])}{times} must equal skip's "
                         f"{list(skip.shape[2:])}")


def _check_backward(grad_up, upsample, scale_factor, align_corners=False):
    op = OP + "_backward"
    check_tensor(op, "grad_up", grad_up)
    if grad_up.dim() != 4:
        raise ValueError(f"{op}: grad_up must be 4-D (N, C, H, W), got {grad_up.dim()}-D")
    check_upsample(op, upsample)
    check_align_corners(op, upsample, align_corners)
    s = 1 if upsample is None else check_scale_factor(op, scale_factor)
    if grad_up.shape[2] % s or grad_up.shape[3] % s:
        raise ValueError(f"{op}: grad_up's spatial size {list(grad_up.shape[2:])} must be a multiple of "
                         f"scale_factor {s}")


def _out_shape(x, skip):
    return (x.shape[0], x.shape[1] + skip.shape[1], skip.shape[2], skip.shape[3])


def _grad_x_shape(grad_up, upsample, scale_factor):
    s = 1 if upsample is None else scale_factor
    n, c, h, w = grad_up.shape
    return (n, c, h // s, w // s)


def _reference(x, skip, upsample, scale_factor, align_corners=False, skip_first=False):
    out = empty_in(_out_shape(x, skip), x, cat_memory_format(x, skip))
    return out.copy_(reference.concat_skip(x, skip, upsample, scale_factor, align_corners, skip_first))


def _reference_backward(grad_up, upsample, scale_factor, align_corners=False):
    out = empty_in(_grad_x_shape(grad_up, upsample, scale_factor), grad_up, suggest_memory_format(grad_up))
    return out.copy_(reference.concat_skip_backward(grad_up, upsample, scale_factor, align_corners))


@decomposition(OP)
def _decompose(x, skip, upsample=None, scale_factor=2, align_corners=False, skip_first=False):
    return reference.concat_skip(x, skip, upsample, scale_factor, align_corners, skip_first)


@decomposition(OP + "_backward")
def _decompose_backward(grad_up, upsample, scale_factor, align_corners=False):
    return reference.concat_skip_backward(grad_up, upsample, scale_factor, align_corners)


# auto on CUDA tensors: CUDA C++ first, measured faster than Triton in every H100 case
# (benchmarks/results/h100-20261126.md).
backends.register(OP, native="_concat_skip", triton="concat_skip:concat_skip", reference=_reference,
                  auto_cuda=("cuda", "triton"), check=_check)
backends.register(OP + "_backward", native="_concat_skip_backward", triton="concat_skip:concat_skip_backward",
                  reference=_reference_backward, auto_cuda=("cuda", "triton"), check=_check_backward)


def _fake(x, skip, upsample=None, scale_factor=2, align_corners=False, skip_first=False):
    _check(x, skip, upsample, scale_factor, align_corners, skip_first)
    return empty_in(_out_shape(x, skip), x, cat_memory_format(x, skip))


def _fake_backward(grad_up, upsample, scale_factor, align_corners=False):
    _check_backward(grad_up, upsample, scale_factor, align_corners)
    return empty_in(_grad_x_shape(grad_up, upsample, scale_factor), grad_up, suggest_memory_format(grad_up))


# The kernel ops get the same fake kernels, so they too can be traced and opchecked.
for _name, _fn in (("concat_skip", _fake), ("concat_skip_backward", _fake_backward)):
    for _prefix, _suffix in (("", ""), ("_", ""), ("_", "_py")):
        torch.library.register_fake(f"dtkernels::{_prefix}{_name}{_suffix}", _fn)


# Forward autograd is C++ (csrc/ops/concat_skip.cpp): the default path never enters
# Python. Double backward, rare, is here: concat_skip_backward's own autograd.
def _setup_backward(ctx, inputs, output):
    grad_up, upsample, scale_factor, align_corners = inputs
    ctx.upsample, ctx.scale_factor, ctx.align_corners = upsample, scale_factor, align_corners
    ctx.shape = grad_up.shape
    ctx.backend = backends.get_backend()


def _backward_backward(ctx, gg):
    # The adjoint is linear; its own adjoint is the upsample: concat_skip with an
    # empty skip.
    n, _, h, w = ctx.shape
    empty_skip = gg.new_empty((n, 0, h, w))
    with backends._scope(ctx.backend):
        up = torch.ops.dtkernels.concat_skip(gg, empty_skip, ctx.upsample, ctx.scale_factor, ctx.align_corners)
        return up, None, None, None


torch.library.register_autograd("dtkernels::concat_skip_backward", _backward_backward,
                                setup_context=_setup_backward)


def concat_skip(x: Tensor, skip: Tensor, *, upsample: str | None = None, scale_factor: int = 2,
                align_corners: bool = False, skip_first: bool = False) -> Tensor:
    """``torch.cat([up(x), skip], dim=1)`` in one pass: the U-Net decoder's skip
    (``skip_first=True``: ``torch.cat([skip, up(x)], dim=1)``, the order of mmseg's
    and MONAI's U-Nets).

    ``upsample`` is None (x already has skip's H and W), "nearest" or "bilinear"
    (``align_corners`` as F.interpolate's: False by default, True as
    nn.UpsamplingBilinear2d), by the positive integer
    ``scale_factor`` (ignored when upsample is None): x's H and W times
    scale_factor must equal skip's. x and skip need the same batch size, dtype and
    device. The output is channels_last when both inputs are, else NCHW (as
    torch.cat). Backward is views plus, with an upsample, one deterministic gather.
    """
    check_upsample(OP, upsample)
    ac = check_align_corners(OP, upsample, align_corners)
    if not isinstance(skip_first, bool):
        raise TypeError(f"{OP}: skip_first must be a bool, got {type(skip_first).__name__}")
    s = 2 if upsample is None else check_scale_factor(OP, scale_factor)
    if not (isinstance(x, Tensor) and isinstance(skip, Tensor)):
        _check(x, skip, upsample, s)  # the friendly TypeError; the op's own kernels check tensors
    if transform_active():
        _check(x, skip, upsample, s, ac)
        return _decompose(x, skip, upsample, s, ac, skip_first)
    op = _C._unboxed_concat_skip if unboxed_ok(x, skip) else torch.ops.dtkernels.concat_skip.default
    return op(x, skip, upsample, s, ac, skip_first)
