"""concat_skip in Triton: cat([up(x), skip], 1) and the upsample's adjoint.

Both kernels walk their dense output as a 2-D array of tiles: NCHW as
[N*C*H rows, W columns], channels_last as [N*H*W pixels, C columns], so stores
are contiguous along the tile's columns. Inputs are read through their own four
strides: NCHW, channels_last, channel slices of a larger buffer and mixed formats
need no copy. The adjoint is a gather in a fixed order (no atomics), summing what
ATen's CPU kernels sum in the order they sum it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import align_corners_scale, autotune, block_columns, cdiv, column_tiles, configs, is_fp64, linear_source, new_empty

_MODES = {None: 0, "nearest": 1, "bilinear": 2}

_CONFIGS = configs(
    [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((2048, 4), (4096, 8), (1024, 4), (8192, 8))],
    [triton.Config({"BLOCK": 256}, num_warps=4)],
)


@triton.jit
def _tile(R, COLS, C, H, W, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, CL: tl.constexpr):
    """This program's tile of a dense 4-D output: its (n, c, h, w) per element (as
    broadcastable 2-D blocks), the flat offsets and the mask."""
    BLOCK_R: tl.constexpr = BLOCK // BLOCK_C
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)[:, None]
    k = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)[None, :]
    mask = (r < R) & (k < COLS)
    # Divisions one size at a time: H * W or C * H (int32) could wrap.
    if CL:  # rows are pixels, columns channels
        t = r // W
        w = r - t * W
        h = t % H
        n = t // H
        c = k
    else:  # rows are (n, c, h), columns w
        t = r // H
        h = r - t * H
        c = t % C
        n = t // C
        w = k
    return n, c, h, w, r * COLS + k, mask


# Triton compiles a variant per pattern of integer arguments equal to 1 or divisible
# by 16. Only the ones that make accesses contiguous and aligned are specialised:
# the row length (16-byte stores) and the unit strides; sizes and outer strides
# would multiply compilations (minutes of a GPU test run) for no speed.
_NO_SPEC = ["R", "C", "CX", "X0", "S0", "H", "W", "HI", "WI", "HO", "WO", "xs0", "xs2", "ss0", "ss2", "gs0", "gs2"]


def _jit(fn):
    return triton.jit(fn, do_not_specialize=[a for a in _NO_SPEC if a in fn.__code__.co_varnames])


# sh, sw: align_corners' scales for float32, float32-exact from the host
# (align_corners_scale); float64 (interpreter-only) computes its own in linear_source.
@autotune(configs=_CONFIGS, key=["R", "COLS", "CL", "MODE", "S", "ALIGN"])
@_jit
def _concat_skip_kernel(x_ptr, skip_ptr, out_ptr, R, COLS, C, CX, X0, S0, H, W, HI, WI,
                        xs0, xs1, xs2, xs3, ss0, ss1, ss2, ss3, sh: tl.float64, sw: tl.float64,
                        CL: tl.constexpr, MODE: tl.constexpr, S: tl.constexpr, FP64: tl.constexpr,
                        ALIGN: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    n, c, h, w, offs, mask = _tile(R, COLS, C, H, W, BLOCK, BLOCK_C, CL)
    # up(x) fills output channels [X0, X0 + CX), skip the others from S0 (skip_first: S0 = 0)
    from_x = (c >= X0) & (c < X0 + CX)
    xm = mask & from_x
    v = tl.load(skip_ptr + n * ss0 + (c - S0) * ss1 + h * ss2 + w * ss3, mask=mask & ~from_x, other=0.0)
    xb = x_ptr + n * xs0 + (c - X0) * xs1
    if MODE == 0:
        up = tl.load(xb + h * xs2 + w * xs3, mask=xm, other=0.0)
    elif MODE == 1:
        up = tl.load(xb + (h // S) * xs2 + (w // S) * xs3, mask=xm, other=0.0)
    else:
        h0, h1, hl0, hl1 = linear_source(h, HI, S, FP64, ALIGN, sh)
        w0, w1, wl0, wl1 = linear_source(w, WI, S, FP64, ALIGN, sw)
        x00 = tl.load(xb + h0 * xs2 + w0 * xs3, mask=xm, other=0.0).to(hl0.dtype)
        x01 = tl.load(xb + h0 * xs2 + w1 * xs3, mask=xm, other=0.0).to(hl0.dtype)
        x10 = tl.load(xb + h1 * xs2 + w0 * xs3, mask=xm, other=0.0).to(hl0.dtype)
        x11 = tl.load(xb + h1 * xs2 + w1 * xs3, mask=xm, other=0.0).to(hl0.dtype)
        # ATen's generic kernel: rows first, then columns, each a fused multiply-add.
        t0 = tl.fma(x00, wl0, x01 * wl1)
        t1 = tl.fma(x10, wl0, x11 * wl1)
        up = tl.fma(t0, hl0, t1 * hl1)
    v = tl.where(from_x, up.to(v.dtype), v)
    tl.store(out_ptr + offs, v, mask=mask)


@triton.jit
def _reads(o, i, n_in, n_out, S: tl.constexpr, FP64: tl.constexpr, ALIGN: tl.constexpr, scale):
    """Whether output index o (maybe out of range) reads input index i through its
    first / second source index, and the two weights."""
    i0, i1, l0, l1 = linear_source(o, n_in, S, FP64, ALIGN, scale)
    ok = (o >= 0) & (o < n_out)
    return ok & (i0 == i), ok & (i1 == i), l0, l1


@autotune(configs=_CONFIGS, key=["R", "COLS", "CL", "MODE", "S", "ALIGN"])
@_jit
def _concat_skip_backward_kernel(g_ptr, gx_ptr, R, COLS, C, H, W, HO, WO, gs0, gs1, gs2, gs3,
                                 sh: tl.float64, sw: tl.float64,
                                 CL: tl.constexpr, MODE: tl.constexpr, S: tl.constexpr, FP64: tl.constexpr,
                                 ALIGN: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """gx (N, C, H, W) from g (N, C, H*S, W*S): each x pixel gathers the gradient of
    the output pixels that read it."""
    n, c, h, w, offs, mask = _tile(R, COLS, C, H, W, BLOCK, BLOCK_C, CL)
    gb = g_ptr + n * gs0 + c * gs1
    acc = tl.zeros([BLOCK // BLOCK_C, BLOCK_C], tl.float64 if FP64 else tl.float32)
    if MODE == 0:
        acc += tl.load(gb + h * gs2 + w * gs3, mask=mask, other=0.0)
    elif MODE == 1:  # the S x S block, row by row
        for dy in tl.static_range(S):
            for dx in tl.static_range(S):
                acc += tl.load(gb + (h * S + dy) * gs2 + (w * S + dx) * gs3, mask=mask, other=0.0).to(acc.dtype)
    else:
        # Output rows/columns that can read input index i lie in [S*i - S, S*i + 2S)
        # (align_corners: [S*i - S, S*i + 3S), csrc/concat_skip.h); each is kept when
        # one of its two source indices is i. Order: output row, output column, then
        # corners 00, 01, 10, 11 (zero weights included). Runtime loops: unrolled, the
        # 9*S*S bodies take minutes to compile.
        SPAN: tl.constexpr = (4 if ALIGN else 3) * S
        for kh in range(SPAN):
            oh = h * S - S + kh
            a0, a1, hl0, hl1 = _reads(oh, h, H, HO, S, FP64, ALIGN, sh)
            for kw in range(SPAN):
                ow = w * S - S + kw
                b0, b1, wl0, wl1 = _reads(ow, w, W, WO, S, FP64, ALIGN, sw)
                g = tl.load(gb + oh * gs2 + ow * gs3, mask=mask & (a0 | a1) & (b0 | b1), other=0.0).to(acc.dtype)
                acc = tl.where(a0 & b0, tl.fma(hl0 * wl0, g, acc), acc)
                acc = tl.where(a0 & b1, tl.fma(hl0 * wl1, g, acc), acc)
                acc = tl.where(a1 & b0, tl.fma(hl1 * wl0, g, acc), acc)
                acc = tl.where(a1 & b1, tl.fma(hl1 * wl1, g, acc), acc)
    tl.store(gx_ptr + offs, acc.to(gx_ptr.dtype.element_ty), mask=mask)


def _launch(kernel, out: torch.Tensor, cl: bool, *args, **meta):
    n, c, h, w = out.shape
    rows, cols = (n * h * w, c) if cl else (n * c * h, w)
    bc = block_columns(cols, 256)
    tiles = column_tiles(cols, bc, "concat_skip", "channels_last outputs with channels" if cl else "rows")
    grid = lambda m: (cdiv(rows, max(m["BLOCK"] // bc, 1)), tiles)  # noqa: E731
    kernel[grid](*args[:-1], rows, cols, c, *args[-1], CL=cl, BLOCK_C=bc, **meta)


def _channels_last(fmt) -> bool:
    return fmt == torch.channels_last


def concat_skip(x: torch.Tensor, skip: torch.Tensor, upsample, scale_factor: int,
                align_corners: bool = False, skip_first: bool = False) -> torch.Tensor:
    from ..ops._common import cat_memory_format

    fmt = cat_memory_format(x, skip)
    out = new_empty(x.shape[0], x.shape[1] + skip.shape[1], skip.shape[2], skip.shape[3], dtype=x.dtype,
                    device=x.device, memory_format=fmt)
    if out.numel() == 0:
        return out
    s = 1 if upsample is None else int(scale_factor)
    fp64 = is_fp64(x)
    sh, sw = ((align_corners_scale(x.shape[2], out.shape[2], fp64), align_corners_scale(x.shape[3], out.shape[3], fp64))
              if align_corners else (0.0, 0.0))
    _launch(_concat_skip_kernel, out, _channels_last(fmt), x, skip, out,
            (x.shape[1], skip.shape[1] if skip_first else 0, 0 if skip_first else x.shape[1], out.shape[2],
             out.shape[3], x.shape[2], x.shape[3], *x.stride(), *skip.stride(), sh, sw),
            MODE=_MODES[upsample], S=s, FP64=fp64, ALIGN=bool(align_corners))
    return out


def concat_skip_backward(grad_up: torch.Tensor, upsample, scale_factor: int,
                         align_corners: bool = False) -> torch.Tensor:
    from ..ops._common import suggest_memory_format

    fmt = suggest_memory_format(grad_up)
    s = 1 if upsample is None else int(scale_factor)
    n, c, ho, wo = grad_up.shape
    gx = new_empty(n, c, ho // s, wo // s, dtype=grad_up.dtype, device=grad_up.device, memory_format=fmt)
    if gx.numel() == 0:
        return gx
    fp64 = is_fp64(grad_up)
    sh, sw = ((align_corners_scale(gx.shape[2], ho, fp64), align_corners_scale(gx.shape[3], wo, fp64))
              if align_corners else (0.0, 0.0))
    _launch(_concat_skip_backward_kernel, gx, _channels_last(fmt), grad_up, gx,
            (gx.shape[2], gx.shape[3], ho, wo, *grad_up.stride(), sh, sw),
            MODE=_MODES[upsample], S=s, FP64=fp64, ALIGN=bool(align_corners))
    return gx
