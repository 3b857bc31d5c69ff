"""residual_add in Triton: a flat, masked, vectorised pass over dense storage."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import as_layout_of, autotune, cdiv, configs, is_fp64, new_empty_like

_CONFIGS = configs(
    [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 4), (4096, 8), (8192, 8))],
    [triton.Config({"BLOCK": 256}, num_warps=4)],
)


# alpha and scale are annotated float64: a plain Python float argument launches as
# fp32, which would round alpha for float64 tensors (ATen keeps it double there).
@autotune(configs=_CONFIGS, key=["n"])
@triton.jit
def _residual_add_kernel(x_ptr, fx_ptr, out_ptr, n, alpha: tl.float64,
                         RELU: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    f = tl.load(fx_ptr + offs, mask=mask)
    if FP64:
        v = x + alpha * f
    else:
        v = x.to(tl.float32) + tl.cast(alpha, tl.float32) * f.to(tl.float32)  # ATen's opmath: alpha as float
    if RELU:
        v = tl.where(v < 0, 0.0, v)  # keeps NaN, as torch.relu
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@autotune(configs=_CONFIGS, key=["n"])
@triton.jit
def _residual_add_backward_kernel(g_ptr, y_ptr, gin_ptr, n, scale: tl.float64,
                                  FP64: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    # threshold_backward (a NaN output passes its gradient), then times alpha as eager:
    # a blocked element is 0 * alpha (-0 for a negative alpha, NaN for an infinite one).
    g = tl.where(y <= 0, 0.0, g)
    if FP64:
        v = g * scale
    else:
        v = g.to(tl.float32) * tl.cast(scale, tl.float32)
    tl.store(gin_ptr + offs, v.to(gin_ptr.dtype.element_ty), mask=mask)


def _grid(n):
    return lambda meta: (cdiv(n, meta["BLOCK"]),)


def residual_add(x: torch.Tensor, fx: torch.Tensor, alpha: float, relu: bool) -> torch.Tensor:
    out = new_empty_like(x)
    n = out.numel()
    if n:
        _residual_add_kernel[_grid(n)](as_layout_of(x, out), as_layout_of(fx, out), out, n,
                                       float(alpha), RELU=bool(relu), FP64=is_fp64(x))
    return out


def residual_add_backward(grad_out: torch.Tensor, out: torch.Tensor, scale: float) -> torch.Tensor:
    gin = new_empty_like(out)
    n = gin.numel()
    if n:
        _residual_add_backward_kernel[_grid(n)](as_layout_of(grad_out, gin), as_layout_of(out, gin),
                                                gin, n, float(scale), FP64=is_fp64(out))
    return gin
