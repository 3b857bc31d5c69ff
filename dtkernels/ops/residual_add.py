"""residual_add(x, fx, *, alpha=1.0, activation="relu") = act(x + alpha * fx).

One pass instead of eager's two (add, then relu), one output allocation instead of
two. Backward keeps only the output: the ReLU mask is ``out > 0``, and with
alpha == 1 one gradient tensor serves both addends.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _C, backends, reference
from ._common import (check_activation, check_real, check_same, check_tensor, decomposition, like,
                      transform_active, unboxed_ok)

OP = "residual_add"


def _check(x, fx, alpha=1.0, relu=True):
    check_tensor(OP, "x", x)
    check_tensor(OP, "fx", fx)
    check_same(OP, "x", x, "fx", fx)
    _check_alpha(x, alpha)


_ALPHA_TYPES = {torch.float16: "c10::Half", torch.bfloat16: "c10::BFloat16", torch.float32: "float"}


def _check_alpha(x, alpha):
    """ATen's add converts alpha to the tensor's dtype on the CPU and to float (opmath)
    on CUDA, raising on overflow (csrc/common.h: checked_alpha agrees)."""
    dtype = x.dtype if x.device.type == "cpu" or x.dtype == torch.float64 else torch.float32
    if dtype in _ALPHA_TYPES and abs(alpha) != float("inf") and abs(alpha) > torch.finfo(dtype).max:
        raise RuntimeError(f"value cannot be converted to type {_ALPHA_TYPES[dtype]} without overflow")


def _check_backward(grad_out, out, scale=1.0):
    check_tensor(OP + "_backward", "grad_out", grad_out)
    check_same(OP + "_backward", "grad_out", grad_out, "out", out)


def _reference(x, fx, alpha, relu):
    return like(reference.residual_add(x, fx, alpha, "relu" if relu else None), x)


def _reference_backward(grad_out, out, scale):
    return like(reference.residual_add_backward(grad_out, out, scale), out)


@decomposition(OP)
def _decompose(x, fx, alpha=1.0, relu=True):
    return reference.residual_add(x, fx, alpha, "relu" if relu else None)


@decomposition(OP + "_backward")
def _decompose_backward(grad_out, out, scale=1.0):
    return reference.residual_add_backward(grad_out, out, scale)


# auto on CUDA tensors: CUDA C++ first, measured faster than Triton in every H100 case
# (benchmarks/results/h100-20261126.md).
backends.register(OP, native="_residual_add", triton="residual_add:residual_add",
                  reference=_reference, auto_cuda=("cuda", "triton"), check=_check)
backends.register(OP + "_backward", native="_residual_add_backward",
                  triton="residual_add:residual_add_backward", reference=_reference_backward,
                  auto_cuda=("cuda", "triton"), check=_check_backward)


@torch.library.register_fake("dtkernels::residual_add")
@torch.library.register_fake("dtkernels::_residual_add")
@torch.library.register_fake("dtkernels::_residual_add_py")
def _fake(x, fx, alpha=1.0, relu=True):
    _check(x, fx, alpha)
    return torch.empty_like(x)


@torch.library.register_fake("dtkernels::residual_add_backward")
@torch.library.register_fake("dtkernels::_residual_add_backward")
@torch.library.register_fake("dtkernels::_residual_add_backward_py")
def _fake_backward(grad_out, out, scale=1.0):
    _check_backward(grad_out, out)
    return torch.empty_like(out)


# Forward autograd is C++ (csrc/ops/residual_add.cpp): the default path never enters
# Python. Double backward, rare, is here: residual_add_backward's own autograd.
def _setup_backward(ctx, inputs, output):
    _, out, scale = inputs
    ctx.scale = scale
    ctx.backend = backends.get_backend()
    ctx.save_for_backward(out)


def _backward_backward(ctx, gg):
    # d/d(grad_out) of scale * grad_out * [out > 0] is the same mask; the mask is
    # piecewise constant in out, so out gets no gradient.
    (out,) = ctx.saved_tensors
    with backends._scope(ctx.backend):
        return torch.ops.dtkernels.residual_add_backward(gg, out, ctx.scale), None, None


torch.library.register_autograd("dtkernels::residual_add_backward", _backward_backward,
                                setup_context=_setup_backward)


def residual_add(x: Tensor, fx: Tensor, *, alpha: float = 1.0, activation: str | None = "relu") -> Tensor:
    """``act(x + alpha * fx)``, fused: ResNet's ``relu(x + F(x))`` in one pass.

    x and fx must have the same shape, dtype and device (no broadcasting). The
    output keeps x's memory format. ``activation`` is "relu" or None.
    """
    relu = check_activation(OP, activation)
    alpha = check_real(OP, "alpha", alpha)
    if not (isinstance(x, Tensor) and isinstance(fx, Tensor)):
        _check(x, fx)  # the friendly TypeError; the op's own kernels check tensors (no second pass here)
    if transform_active():
        _check(x, fx, alpha, relu)
        return _decompose(x, fx, alpha, relu)
    op = _C._unboxed_residual_add if unboxed_ok(x, fx) else torch.ops.dtkernels.residual_add.default
    return op(x, fx, alpha, relu)
