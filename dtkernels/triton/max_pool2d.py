"""max_pool2d in Triton: NCHW and NHWC (channels_last) kernels, forward and backward.

Forward: one lane per output (NCHW) or per (output pixel, channel) (NHWC); the taps
are scanned row-major with ATen's rule (a value replaces the running max when it is
greater or NaN), starting at -inf with the window's first tap past the padding.
Backward is a gather: one lane per input element visits the few windows that can
hold it in ascending (oh, ow) order and adds the gradient of those whose offset
names it. Deterministic, no atomics, every element written once.

Index arithmetic: a flat element index per lane needs 64-bit divisions per element,
each a call to a software routine on the GPU (the first version of these kernels
made three per element and compiled for sm_90 to 115-192 registers,
benchmarks/results/triton-sm90-20261127.md). So NCHW programs take a tile of rows
(plane * height + row, which run on across planes, so small planes fill a tile) by
columns, and divide once per row; NHWC programs divide once per pixel, for all its
channels. Those divisions are int32 (int64, WIDE, only near 2^31 rows or pixels);
memory offsets are int64, formed once per row or pixel.

The window geometry is constexpr (one compile per pooling configuration), so the
tap loops unroll and the divisions by the stride are by constants.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.max_pool2d import offsets_dtype
from ..reference import pool_output_size
from ._utils import autotune, block_columns, cdiv, column_tiles, configs, is_fp64, new_empty

# Four configs, as many as the flat kernels had: each is a compile of every kernel
# variant when the autotuner first meets a shape, inside the GPU check's bench budget.
_CONFIGS = configs(
    [triton.Config({"BLOCK_H": h, "BLOCK_W": w}, num_warps=nw)
     for h, w, nw in ((8, 64, 4), (16, 32, 4), (16, 64, 8), (8, 128, 8))],
    # under the interpreter each program costs milliseconds: the tests' shapes (W up
    # to 19) still span several tiles
    [triton.Config({"BLOCK_H": 16, "BLOCK_W": 16}, num_warps=4)],
)
# 8 or 16 elements per thread (BLOCK_C 64): with 32 (BLOCK_P 64 on 4 warps, 128 on 8)
# the sm_90 compile took 98-255 registers and twice the instructions per element.
_CONFIGS_NHWC = configs(
    [triton.Config({"BLOCK_P": b}, num_warps=w) for b, w in ((16, 4), (32, 4), (32, 8), (64, 8))],
    [triton.Config({"BLOCK_P": 16}, num_warps=4)],
)
# Row (NCHW) or pixel (NHWC; or a row's elements) counts from which the kernels index
# in int64: below 2^31 less a tile, so that no lane of the last tile wraps int32. A
# module variable so that the tests can take the wide path on small inputs.
_WIDE_FROM = 2**31 - 2**16


@triton.jit
def _first_tap(o, S: tl.constexpr, P: tl.constexpr, D: tl.constexpr):
    # the first tap past the leading padding: ceil(max(0, P - o*S) / D)
    return (tl.maximum(P - o * S, 0) + D - 1) // D


@triton.jit
def _pid(WIDE: tl.constexpr):
    """The program id, int64 when WIDE: its tile's first row or pixel (id * BLOCK)
    would wrap int32 there."""
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    return pid


@triton.jit
def _divmod(a, b):
    q = a // b
    return q, a - q * b


@triton.jit
def _row_tile(rows, height, width, WIDE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """NCHW: this program's BLOCK_H rows r = plane * height + row (a tile may span
    planes) by BLOCK_W columns: (r, plane, row, col, mask)."""
    tr, tw = _divmod(_pid(WIDE), tl.cdiv(width, BLOCK_W))
    r = tr * BLOCK_H + tl.arange(0, BLOCK_H)
    plane, row = _divmod(r, height)
    col = tw * BLOCK_W + tl.arange(0, BLOCK_W)
    return r, plane, row, col, (r < rows)[:, None] & (col < width)[None, :]


@triton.jit
def _pixel_tile(npix, height, width, C, WIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """NHWC: this program's BLOCK_P pixels p = (img * height + row) * width + col by
    BLOCK_C channels: (p, img, row, col, c, mask)."""
    p = _pid(WIDE) * BLOCK_P + tl.arange(0, BLOCK_P)
    t, col = _divmod(p, width)
    img, row = _divmod(t, height)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return p, img, row, col, c, (p < npix)[:, None] & (c < C)[None, :]


@triton.jit
def _pool_window(x_ptr, rows, h0, w0, H, W, pix, mask, tap,
                 KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr):
    """Fold of one window per lane: (max, tap), the window's top-left tap at input row
    h0 (of plane or image `rows` / H, int64 `rows` = plane * H) and column w0; x at
    ((rows + ih) * W + iw) * pix. The max is exact in x's own type, so values are
    compared as loaded; taps outside the input (or the tile) read -inf, which never
    replaces the running max."""
    m = tl.full(tap.shape, float("-inf"), x_ptr.dtype.element_ty)
    for i in tl.static_range(KH):
        ih = h0 + i * DH
        row_ok = (ih >= 0) & (ih < H)
        row = x_ptr + (rows + ih) * W * pix
        for j in tl.static_range(KW):
            iw = w0 + j * DW
            ok = mask & row_ok & (iw >= 0) & (iw < W)
            x = tl.load(row + iw * pix, mask=ok, other=float("-inf"))
            upd = (x > m) | (x != x)
            m = tl.where(upd, x, m)
            tap = tl.where(upd, i * KW + j, tap)
    return m, tap


@triton.jit
def _store_results(out_ptr, idx_ptr, off_ptr, o, mask, m, tap, h0, w0, W,
                   KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, IDX: tl.constexpr, OFF: tl.constexpr):
    tl.store(out_ptr + o, m.to(out_ptr.dtype.element_ty), mask=mask)
    if OFF:
        tl.store(off_ptr + o, tap.to(off_ptr.dtype.element_ty), mask=mask)
    if IDX:  # ATen's flat index ih * W + iw
        ih = h0 + (tap // KW) * DH
        tl.store(idx_ptr + o, ih.to(tl.int64) * W + w0 + (tap % KW) * DW, mask=mask)


@autotune(configs=_CONFIGS, key=["rows", "Wo", "KH", "KW", "SH", "SW"])
@triton.jit
def _max_pool2d_nchw_kernel(x_ptr, out_ptr, idx_ptr, off_ptr, rows, H, W, Ho, Wo,
                            KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                            PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                            IDX: tl.constexpr, OFF: tl.constexpr, WIDE: tl.constexpr,
                            BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    r, plane, oh, ow, mask = _row_tile(rows, Ho, Wo, WIDE, BLOCK_H, BLOCK_W)
    h0 = (oh * SH - PH)[:, None]
    w0 = (ow * SW - PW)[None, :]
    tap = (_first_tap(oh, SH, PH, DH)[:, None] * KW + _first_tap(ow, SW, PW, DW)[None, :]).to(tl.int32)
    m, tap = _pool_window(x_ptr, (plane.to(tl.int64) * H)[:, None], h0, w0, H, W, 1, mask, tap, KH, KW, DH, DW)
    o = r.to(tl.int64)[:, None] * Wo + ow[None, :]
    _store_results(out_ptr, idx_ptr, off_ptr, o, mask, m, tap, h0, w0, W, KW, DH, DW, IDX, OFF)


@autotune(configs=_CONFIGS_NHWC, key=["npix", "C", "KH", "KW", "SH", "SW"])
@triton.jit
def _max_pool2d_nhwc_kernel(x_ptr, out_ptr, idx_ptr, off_ptr, npix, C, H, W, Ho, Wo,
                            KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                            PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                            IDX: tl.constexpr, OFF: tl.constexpr, WIDE: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p, img, oh, ow, c, mask = _pixel_tile(npix, Ho, Wo, C, WIDE, BLOCK_P, BLOCK_C)
    h0 = (oh * SH - PH)[:, None]
    w0 = (ow * SW - PW)[:, None]
    tap0 = (_first_tap(oh, SH, PH, DH) * KW + _first_tap(ow, SW, PW, DW)).to(tl.int32)
    tap = tl.broadcast_to(tap0[:, None], (BLOCK_P, BLOCK_C))
    m, tap = _pool_window(x_ptr + c[None, :], (img.to(tl.int64) * H)[:, None], h0, w0, H, W, C, mask, tap,
                          KH, KW, DH, DW)
    o = p.to(tl.int64)[:, None] * C + c[None, :]
    _store_results(out_ptr, idx_ptr, off_ptr, o, mask, m, tap, h0, w0, W, KW, DH, DW, IDX, OFF)


@triton.jit
def _window_of(ih, Ho, S: tl.constexpr, P: tl.constexpr, D: tl.constexpr, i: tl.constexpr):
    """The output row (or column) whose window has input row ih at tap row i, and
    whether there is one."""
    nh = ih + P - i * D
    oh = nh // S
    return oh, (nh >= 0) & (nh % S == 0) & (oh < Ho)


@triton.jit
def _gather_window_grads(g_ptr, off_ptr, orows, ih, iw, Ho, Wo, pix, mask, acc,
                         KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                         PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr):
    """acc += the gradient of every window whose maximum is this input element, in
    ascending (oh, ow) order (descending taps): ATen's summation order. Gradients
    and offsets at ((orows + oh) * Wo + ow) * pix, int64 orows = plane * Ho. Rows and
    columns are tested apart (ih and iw broadcast against each other in the tile)."""
    for ii in tl.static_range(KH):
        i = KH - 1 - ii
        oh, row_ok = _window_of(ih, Ho, SH, PH, DH, i)
        row = (orows + oh) * Wo * pix
        off_row, g_row = off_ptr + row, g_ptr + row  # per row: the taps add int32 columns
        for jj in tl.static_range(KW):
            j = KW - 1 - jj
            ow, col_ok = _window_of(iw, Wo, SW, PW, DW, j)
            ok = mask & row_ok & col_ok
            q = ow * pix
            hit = ok & (tl.load(off_row + q, mask=ok, other=-1).to(tl.int32) == i * KW + j)
            g = tl.load(g_row + q, mask=hit, other=0.0).to(acc.dtype)
            acc += tl.where(hit, g, 0.0)
    return acc


@autotune(configs=_CONFIGS, key=["rows", "W", "KH", "KW", "SH", "SW"])
@triton.jit
def _max_pool2d_backward_nchw_kernel(g_ptr, off_ptr, gi_ptr, rows, H, W, Ho, Wo,
                                     KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                                     PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                                     FP64: tl.constexpr, WIDE: tl.constexpr,
                                     BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    r, plane, ih, iw, mask = _row_tile(rows, H, W, WIDE, BLOCK_H, BLOCK_W)
    if FP64:
        acc = tl.zeros((BLOCK_H, BLOCK_W), tl.float64)
    else:
        acc = tl.zeros((BLOCK_H, BLOCK_W), tl.float32)
    acc = _gather_window_grads(g_ptr, off_ptr, (plane.to(tl.int64) * Ho)[:, None], ih[:, None], iw[None, :],
                               Ho, Wo, 1, mask, acc, KH, KW, SH, SW, PH, PW, DH, DW)
    gi = gi_ptr + r.to(tl.int64)[:, None] * W + iw[None, :]
    tl.store(gi, acc.to(gi_ptr.dtype.element_ty), mask=mask)


@autotune(configs=_CONFIGS_NHWC, key=["npix", "C", "KH", "KW", "SH", "SW"])
@triton.jit
def _max_pool2d_backward_nhwc_kernel(g_ptr, off_ptr, gi_ptr, npix, C, H, W, Ho, Wo,
                                     KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                                     PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                                     FP64: tl.constexpr, WIDE: tl.constexpr,
                                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p, img, ih, iw, c, mask = _pixel_tile(npix, H, W, C, WIDE, BLOCK_P, BLOCK_C)
    if FP64:
        acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float64)
    else:
        acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    acc = _gather_window_grads(g_ptr + c[None, :], off_ptr + c[None, :], (img.to(tl.int64) * Ho)[:, None],
                               ih[:, None], iw[:, None], Ho, Wo, C, mask, acc, KH, KW, SH, SW, PH, PW, DH, DW)
    gi = gi_ptr + p.to(tl.int64)[:, None] * C + c[None, :]
    tl.store(gi, acc.to(gi_ptr.dtype.element_ty), mask=mask)


def _geometry(kernel_size, stride, padding, dilation):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    return dict(KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw)


def _programs(n: int, op: str) -> int:
    """The grid's first axis holds at most 2^31 - 1 programs."""
    if n > 2**31 - 1:
        raise RuntimeError(f"{op} (triton): the input needs {n} tiles, more than a grid holds (2^31 - 1)")
    return n


def _launch(nchw_kernel, nhwc_kernel, op, ptrs, sizes, C, rows, cols, channels_last, flags):
    """One launch over `rows` rows of `cols` columns (NCHW: plane * height + row), or
    over rows / C * cols pixels of C channels (channels_last)."""
    _, W, _, Wo = sizes
    if channels_last:
        npix, bc = rows // C * cols, block_columns(C, 64)
        tiles_c = column_tiles(C, bc, op, "channels_last inputs with channels")
        grid = lambda meta: (_programs(cdiv(npix, meta["BLOCK_P"]), op), tiles_c)  # noqa: E731
        # WIDE also when a row's elements (column * C) could pass int32
        wide = max(npix, max(W, Wo) * C) >= _WIDE_FROM
        nhwc_kernel[grid](*ptrs, npix, C, *sizes, BLOCK_C=bc, WIDE=wide, **flags)
    else:
        grid = lambda meta: (_programs(cdiv(rows, meta["BLOCK_H"]) * cdiv(cols, meta["BLOCK_W"]), op),)  # noqa: E731
        nchw_kernel[grid](*ptrs, rows, *sizes, WIDE=max(rows, W, Wo) >= _WIDE_FROM, **flags)


def max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, channels_last, return_indices,
               return_offsets):
    # The registry has run the op's checks (ops.max_pool2d._check): sizes only here.
    C, H, W = input.shape[-3:]
    Ho = pool_output_size(H, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    Wo = pool_output_size(W, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    shape = [*input.shape[:-2], Ho, Wo]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dev = input.device
    out = new_empty(shape, dtype=input.dtype, device=dev, memory_format=fmt)
    idx = (new_empty(shape, dtype=torch.int64, device=dev, memory_format=fmt) if return_indices
           else torch.empty(0, dtype=torch.int64, device=dev))
    odt = offsets_dtype(kernel_size[0] * kernel_size[1])
    off = (new_empty(shape, dtype=odt, device=dev, memory_format=fmt) if return_offsets
           else torch.empty(0, dtype=torch.int8, device=dev))
    if out.numel() == 0:
        return out, idx, off
    x = input.contiguous(memory_format=fmt)  # a copy only for odd layouts
    flags = dict(IDX=bool(return_indices), OFF=bool(return_offsets),
                 **_geometry(kernel_size, stride, padding, dilation))
    ip = idx if return_indices else out  # unused pointers: any tensor
    op = off if return_offsets else out
    _launch(_max_pool2d_nchw_kernel, _max_pool2d_nhwc_kernel, "max_pool2d", (x, out, ip, op), (H, W, Ho, Wo), C,
            out.numel() // Wo, Wo, channels_last, flags)
    return out, idx, off


def max_pool2d_backward(grad_out, offsets, input_size, kernel_size, stride, padding, dilation, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gi = new_empty(list(input_size), dtype=grad_out.dtype, device=grad_out.device, memory_format=fmt)
    if gi.numel() == 0:
        return gi
    g = grad_out.contiguous(memory_format=fmt)
    off = offsets.contiguous(memory_format=fmt)
    C, H, W = input_size[-3:]
    Ho, Wo = grad_out.shape[-2:]
    flags = dict(FP64=is_fp64(grad_out), **_geometry(kernel_size, stride, padding, dilation))
    _launch(_max_pool2d_backward_nchw_kernel, _max_pool2d_backward_nhwc_kernel, "max_pool2d_backward",
            (g, off, gi), (H, W, Ho, Wo), C, gi.numel() // W, W, channels_last, flags)
    return gi
