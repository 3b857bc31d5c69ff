"""max_pool2d: a drop-in for F.max_pool2d, exact to ATen.

The op returns (out, indices, offsets). ``indices`` are PyTorch's flat int64 indices
(``max_unpool2d`` works with them), computed only when asked for. ``offsets`` are
what backward keeps: the tap i*kw + j of each window's maximum, int8 for windows of up
to 128 taps (int16 up to 32768, int32 beyond): an eighth of ATen's int64 indices, and
neither the input nor the indices are saved. They are computed only when asked for
or when autograd records (the autograd kernel asks). Unused outputs are empty tensors.

Semantics are ATen's CPU kernel's on every backend (see dtkernels.reference): NaN
propagates and reports the last NaN's index, ties keep the first maximum in scan
order, an all -inf window gives -inf, ceil_mode drops windows that start in the right
padding. Argument checks and their wording are ATen's, in ATen's order.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _C, backends, reference
from ._common import (check_tensor, decomposition, empty_in, int_pair, suggest_memory_format, transform_active,
                      unboxed_ok)

OP = "max_pool2d"


def _empty(shape, like, channels_last: bool, dtype=None):
    """What the native kernels allocate: NCHW or channels_last, on like's device."""
    return empty_in(shape, like, torch.channels_last if channels_last else torch.contiguous_format, dtype)


def offsets_dtype(taps: int) -> torch.dtype:
    """The smallest integer type for tap numbers 0..taps-1 (csrc/max_pool2d.h agrees)."""
    return torch.int8 if taps <= 128 else torch.int16 if taps <= 32768 else torch.int32


def _trunc_div(a: int, b: int) -> int:  # C++ integer division (ATen's checks use it)
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


_INT_MAX = 2**31 - 1


def check_pool_ints(kernel_size, stride, padding, dilation) -> None:
    """ATen keeps these arguments in int (csrc/max_pool2d.h: check_pool_ints agrees)."""
    for v in (*kernel_size, *stride, *padding, *dilation):
        if not -_INT_MAX - 1 <= v <= _INT_MAX:
            raise RuntimeError("value cannot be converted to type int without overflow")
    kh, kw = kernel_size
    if kh > 0 and kw > 0 and kh * kw > _INT_MAX:
        raise RuntimeError(f"max_pool2d: windows of more than 2^31 - 1 elements are not supported, got kernel_size "
                           f"{list(kernel_size)}")


def _output_size(size, k, s, p, d, ceil_mode):
    if s == 0:
        raise RuntimeError("stride should not be zero")
    if p < 0:
        raise RuntimeError(f"pad must be non-negative, but got pad: {p}")
    if p > _trunc_div((k - 1) * d + 1, 2):
        raise RuntimeError(f"pad should be at most half of effective kernel size, but got pad={p}, "
                           f"kernel_size={k} and dilation={d}")
    return reference.pool_output_size(size, k, s, p, d, ceil_mode)


def output_shape(input, kernel_size, stride, padding, dilation, ceil_mode, channels_last) -> list:
    """The output shape; raises ATen's errors (same order and wording) on bad arguments."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    check_pool_ints(kernel_size, stride, padding, dilation)
    if input.dim() not in (3, 4):
        raise RuntimeError("non-empty 3D or 4D (batch mode) tensor expected for input")
    if channels_last and input.dim() != 4:
        raise RuntimeError("non-empty 4D (batch mode) tensor expected for input with channels_last layout")
    C, H, W = input.shape[-3:]
    Ho = _output_size(H, kh, sh, ph, dh, ceil_mode)
    Wo = _output_size(W, kw, sw, pw, dw, ceil_mode)
    if kh <= 0 or kw <= 0:
        raise RuntimeError(f"kernel size should be greater than zero, but got kH: {kh} kW: {kw}")
    if sh <= 0 or sw <= 0:
        raise RuntimeError(f"stride should be greater than zero, but got dH: {sh} dW: {sw}")
    if dh <= 0 or dw <= 0:
        raise RuntimeError(f"dilation should be greater than zero, but got dilationH: {dh} dilationW: {dw}")
    if C == 0 or H == 0 or W == 0:
        raise RuntimeError("Expected 3D or 4D (batch mode) tensor with optional 0 dim batch size for input, "
                           f"but got:{list(input.shape)}")
    if kw // 2 < pw or kh // 2 < ph:
        raise RuntimeError(f"pad should be smaller than or equal to half of kernel size, but got padW = {pw}, "
                           f"padH = {ph}, kW = {kw}, kH = {kh}")
    if Wo < 1 or Ho < 1:
        raise RuntimeError(f"Given input size: ({C}x{H}x{W}). Calculated output size: ({C}x{Ho}x{Wo}). "
                           "Output size is too small")
    return [*input.shape[:-2], Ho, Wo]


def _check(input, kernel_size, stride, padding, dilation, ceil_mode=False, channels_last=False,
           return_indices=False, return_offsets=False):
    check_tensor(OP, "input", input)
    return output_shape(input, kernel_size, stride, padding, dilation, ceil_mode, channels_last)


def _check_backward(grad_out, offsets, input_size, kernel_size, stride, padding, dilation, channels_last=False):
    op = OP + "_backward"
    check_pool_ints(kernel_size, stride, padding, dilation)
    check_tensor(op, "grad_out", grad_out)
    if not isinstance(offsets, Tensor) or offsets.shape != grad_out.shape:
        raise RuntimeError(f"{op}: offsets must have grad_out's shape {list(grad_out.shape)} (were they saved by "
                           "a forward called with return_offsets=True?)")
    want = offsets_dtype(kernel_size[0] * kernel_size[1])
    if offsets.dtype != want:
        raise RuntimeError(f"{op}: offsets must be {want} for a {kernel_size[0]}x{kernel_size[1]} window, "
                           f"got {offsets.dtype}")
    if offsets.device != grad_out.device:
        raise RuntimeError(f"{op}: offsets and grad_out must be on the same device")
    if len(input_size) != grad_out.dim() or list(input_size[:-2]) != list(grad_out.shape[:-2]):
        raise RuntimeError(f"{op}: grad_out of size {list(grad_out.shape)} does not match input size "
                           f"{list(input_size)}")


def _reference(input, kernel_size, stride, padding, dilation, ceil_mode, channels_last, return_indices,
               return_offsets):
    out, index, taps = reference.max_pool2d_with_taps(input, kernel_size, stride, padding, dilation, ceil_mode)
    res = [_empty(out.shape, input, channels_last).copy_(out)]
    res.append(_empty(out.shape, input, channels_last, torch.int64).copy_(index)
               if return_indices else input.new_empty(0, dtype=torch.int64))
    odt = offsets_dtype(kernel_size[0] * kernel_size[1])
    res.append(_empty(out.shape, input, channels_last, odt).copy_(taps)
               if return_offsets else input.new_empty(0, dtype=torch.int8))
    return tuple(res)


def _reference_backward(grad_out, offsets, input_size, kernel_size, stride, padding, dilation, channels_last):
    gi = reference.max_pool2d_backward(grad_out, offsets, input_size, kernel_size, stride, padding, dilation)
    return _empty(gi.shape, grad_out, channels_last).copy_(gi)


@decomposition(OP)
def _decompose(input, kernel_size, stride, padding, dilation, ceil_mode=False, channels_last=False,
               return_indices=False, return_offsets=False):
    # F.max_pool2d is ATen's own kernel: the same values and indices as ours.
    args = (input, kernel_size, stride, padding, dilation, ceil_mode)
    no_idx, no_off = input.new_empty(0, dtype=torch.int64), input.new_empty(0, dtype=torch.int8)
    if not (return_indices or return_offsets):
        return torch.nn.functional.max_pool2d(*args), no_idx, no_off
    out, idx = torch.nn.functional.max_pool2d(*args, return_indices=True)
    off = no_off
    if return_offsets:  # tap i*kw + j from the flat index ih*W + iw
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
        W, (Ho, Wo) = input.shape[-1], idx.shape[-2:]
        i = (idx // W - (torch.arange(Ho, device=idx.device) * sh - ph)[:, None]) // dh
        j = (idx % W - (torch.arange(Wo, device=idx.device) * sw - pw)) // dw
        off = (i * kw + j).to(offsets_dtype(kh * kw))
    return out, (idx if return_indices else no_idx), off


@decomposition(OP + "_backward")
def _decompose_backward(grad_out, offsets, input_size, kernel_size, stride, padding, dilation, channels_last=False):
    return reference.max_pool2d_backward(grad_out, offsets, input_size, kernel_size, stride, padding, dilation)


# auto on CUDA tensors: CUDA C++ first, measured faster than Triton in every H100 case
# (benchmarks/results/h100-20261126.md).
backends.register(OP, native="_max_pool2d", triton="max_pool2d:max_pool2d", reference=_reference,
                  auto_cuda=("cuda", "triton"), check=_check)
backends.register(OP + "_backward", native="_max_pool2d_backward", triton="max_pool2d:max_pool2d_backward",
                  reference=_reference_backward, auto_cuda=("cuda", "triton"), check=_check_backward)


@torch.library.register_fake("dtkernels::max_pool2d")
@torch.library.register_fake("dtkernels::_max_pool2d")
@torch.library.register_fake("dtkernels::_max_pool2d_py")
def _fake(input, kernel_size, stride, padding, dilation, ceil_mode=False, channels_last=False,
          return_indices=False, return_offsets=False):
    shape = _check(input, kernel_size, stride, padding, dilation, ceil_mode, channels_last)
    out = _empty(shape, input, channels_last)
    idx = (_empty(shape, input, channels_last, torch.int64) if return_indices
           else input.new_empty(0, dtype=torch.int64))
    odt = offsets_dtype(kernel_size[0] * kernel_size[1])
    off = (_empty(shape, input, channels_last, odt) if return_offsets
           else input.new_empty(0, dtype=torch.int8))
    return out, idx, off


@torch.library.register_fake("dtkernels::max_pool2d_backward")
@torch.library.register_fake("dtkernels::_max_pool2d_backward")
@torch.library.register_fake("dtkernels::_max_pool2d_backward_py")
def _fake_backward(grad_out, offsets, input_size, kernel_size, stride, padding, dilation, channels_last=False):
    _check_backward(grad_out, offsets, input_size, kernel_size, stride, padding, dilation)
    return _empty(input_size, grad_out, channels_last)


# Forward autograd is C++ (csrc/ops/max_pool2d.cpp): the default path never enters
# Python. Double backward, rare, is here: max_pool2d_backward's own autograd.
def _setup_backward(ctx, inputs, output):
    _, offsets, input_size, kernel_size, stride, padding, dilation, _ = inputs
    ctx.args = (list(input_size[-2:]), kernel_size, stride, padding, dilation)
    ctx.save_for_backward(offsets)


def _backward_backward(ctx, gg):
    # backward is linear in grad_out: its adjoint reads gg at each window's maximum.
    (offsets,) = ctx.saved_tensors
    (H, W), k, s, p, d = ctx.args
    index, inside = reference.max_pool2d_indices(offsets, (H, W), k, s, p, d)
    flat = gg.reshape(*gg.shape[:-2], H * W)
    picked = flat.gather(-1, torch.where(inside, index, 0).flatten(-2)).reshape(offsets.shape)
    ggo = torch.where(inside, picked, torch.zeros((), dtype=gg.dtype, device=gg.device))
    return ggo, None, None, None, None, None, None, None


torch.library.register_autograd("dtkernels::max_pool2d_backward", _backward_backward,
                                setup_context=_setup_backward)


def normalize_args(kernel_size, stride=None, padding=0, dilation=1):
    """F.max_pool2d's int-or-pair arguments as four pairs (stride defaults to the kernel)."""
    k = int_pair(OP, "kernel_size", kernel_size)
    s = int_pair(OP, "stride", stride, omitted_ok=True) or k
    p = int_pair(OP, "padding", padding)
    d = int_pair(OP, "dilation", dilation, wording="must be either")
    return k, s, p, d


def _channels_last(input: Tensor) -> bool:
    """ATen's choice (suggest_memory_format), which also decides the output's format."""
    return input.dim() == 4 and suggest_memory_format(input) == torch.channels_last


def max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False):
    """``F.max_pool2d``, exactly: same arguments, results and errors, 3-D or 4-D input,
    NCHW or channels_last (the output keeps the input's format).

    With ``return_indices=True`` also returns PyTorch's flat int64 indices. For
    backward only a small window offset per output is kept, and only when the input
    requires grad.
    """
    check_tensor(OP, "input", input)
    k, s, p, d = normalize_args(kernel_size, stride, padding, dilation)
    cl = _channels_last(input)
    if transform_active():
        _check(input, k, s, p, d, ceil_mode, cl)
        out, indices, _ = _decompose(input, k, s, p, d, bool(ceil_mode), cl, bool(return_indices))
        return (out, indices) if return_indices else out
    op = _C._unboxed_max_pool2d if unboxed_ok(input) else torch.ops.dtkernels.max_pool2d.default
    # return_offsets=False: the op's autograd kernel makes them when it records
    out, indices, _ = op(input, k, s, p, d, bool(ceil_mode), cl, bool(return_indices), False)
    return (out, indices) if return_indices else out
