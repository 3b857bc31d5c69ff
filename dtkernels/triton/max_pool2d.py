"""max_pool2d in Triton: NCHW and NHWC (channels_last) kernels, forward and backward.

Forward: one lane per output (NCHW) or per (output pixel, channel) (NHWC); the taps
are scanned row-major with ATen's rule (a value replaces the running max when it is
greater or NaN), starting at -inf with the window's first tap past the padding.
Backward is a gather: one lane per input element visits the few windows that can
hold it in ascending (oh, ow) order and adds the gradient of those whose offset
names it. Deterministic, no atomics, every element written once.

The window geometry is constexpr (one compile per pooling configuration), so the
tap loops unroll and the divisions by the stride are by constants.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.max_pool2d import offsets_dtype
from ._utils import column_tiles, configs, is_fp64, new_empty

_CONFIGS = configs(
    [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((256, 4), (512, 4), (1024, 4), (1024, 8))],
    [triton.Config({"BLOCK": 256}, num_warps=4)],
)
_CONFIGS_NHWC = configs(
    [triton.Config({"BLOCK_P": b}, num_warps=w) for b, w in ((16, 4), (32, 4), (64, 4), (64, 8), (128, 8))],
    [triton.Config({"BLOCK_P": 16}, num_warps=4)],
)


@triton.jit
def _first_tap(o, S: tl.constexpr, P: tl.constexpr, D: tl.constexpr):
    # the first tap past the leading padding: ceil(max(0, P - o*S) / D)
    return (tl.maximum(P - o * S, 0) + D - 1) // D


@triton.jit
def _pool_window(x_ptr, base, h0, w0, H, W, pix, mask, tap,
                 KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, FP64: tl.constexpr):
    """Fold of one window per lane: (max, tap). x at base + (ih*W + iw)*pix."""
    if FP64:
        m = tl.full(tap.shape, float("-inf"), tl.float64)
    else:
        m = tl.full(tap.shape, float("-inf"), tl.float32)
    for i in tl.static_range(KH):
        ih = h0 + i * DH
        row_ok = mask & (ih >= 0) & (ih < H)
        for j in tl.static_range(KW):
            iw = w0 + j * DW
            ok = row_ok & (iw >= 0) & (iw < W)
            x = tl.load(x_ptr + base + (ih * W + iw) * pix, mask=ok, other=float("-inf")).to(m.dtype)
            upd = ok & ((x > m) | (x != x))
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
        tl.store(idx_ptr + o, (h0 + (tap // KW) * DH) * W + w0 + (tap % KW) * DW, mask=mask)


@triton.autotune(configs=_CONFIGS, key=["n"])
@triton.jit
def _max_pool2d_nchw_kernel(x_ptr, out_ptr, idx_ptr, off_ptr, n, H, W, Ho, Wo,
                            KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                            PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                            IDX: tl.constexpr, OFF: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = o < n
    t = o // Wo  # divisions one size at a time: Wo * Ho (int32) could wrap
    ow = o - t * Wo
    oh = t % Ho
    plane = t // Ho
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    tap = (_first_tap(oh, SH, PH, DH) * KW + _first_tap(ow, SW, PW, DW)).to(tl.int32)
    m, tap = _pool_window(x_ptr, plane * H * W, h0, w0, H, W, 1, mask, tap, KH, KW, DH, DW, FP64)
    _store_results(out_ptr, idx_ptr, off_ptr, o, mask, m, tap, h0, w0, W, KW, DH, DW, IDX, OFF)


@triton.autotune(configs=_CONFIGS_NHWC, key=["npix", "C"])
@triton.jit
def _max_pool2d_nhwc_kernel(x_ptr, out_ptr, idx_ptr, off_ptr, npix, C, H, W, Ho, Wo,
                            KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                            PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                            IDX: tl.constexpr, OFF: tl.constexpr, FP64: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (p < npix)[:, None] & (c < C)[None, :]
    t = p // Wo
    ow = p - t * Wo
    oh = t % Ho
    img = t // Ho
    h0 = (oh * SH - PH)[:, None]
    w0 = (ow * SW - PW)[:, None]
    tap0 = (_first_tap(oh, SH, PH, DH) * KW + _first_tap(ow, SW, PW, DW)).to(tl.int32)
    tap = tl.broadcast_to(tap0[:, None], (BLOCK_P, BLOCK_C))
    base = (img * H * W * C)[:, None] + c[None, :]
    m, tap = _pool_window(x_ptr, base, h0, w0, H, W, C, mask, tap, KH, KW, DH, DW, FP64)
    _store_results(out_ptr, idx_ptr, off_ptr, p[:, None] * C + c[None, :], mask, m, tap, h0, w0, W,
                   KW, DH, DW, IDX, OFF)


@triton.jit
def _gather_window_grads(g_ptr, off_ptr, ih, iw, Ho, Wo, obase, pix, mask, acc,
                         KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                         PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr):
    """acc += the gradient of every window whose maximum is this input element, in
    ascending (oh, ow) order (descending taps): ATen's summation order."""
    for ii in tl.static_range(KH):
        i = KH - 1 - ii
        nh = ih + PH - i * DH
        oh = nh // SH
        row_ok = mask & (nh >= 0) & (nh % SH == 0) & (oh < Ho)
        for jj in tl.static_range(KW):
            j = KW - 1 - jj
            nw = iw + PW - j * DW
            ow = nw // SW
            ok = row_ok & (nw >= 0) & (nw % SW == 0) & (ow < Wo)
            q = obase + (oh * Wo + ow) * pix
            hit = ok & (tl.load(off_ptr + q, mask=ok, other=-1).to(tl.int32) == i * KW + j)
            g = tl.load(g_ptr + q, mask=hit, other=0.0).to(acc.dtype)
            acc += tl.where(hit, g, 0.0)
    return acc


@triton.autotune(configs=_CONFIGS, key=["n"])
@triton.jit
def _max_pool2d_backward_nchw_kernel(g_ptr, off_ptr, gi_ptr, n, H, W, Ho, Wo,
                                     KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                                     PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                                     FP64: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < n
    t = e // W
    iw = e - t * W
    ih = t % H
    plane = t // H
    if FP64:
        acc = tl.zeros((BLOCK,), tl.float64)
    else:
        acc = tl.zeros((BLOCK,), tl.float32)
    acc = _gather_window_grads(g_ptr, off_ptr, ih, iw, Ho, Wo, plane * Ho * Wo, 1, mask, acc,
                               KH, KW, SH, SW, PH, PW, DH, DW)
    tl.store(gi_ptr + e, acc.to(gi_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_CONFIGS_NHWC, key=["npix", "C"])
@triton.jit
def _max_pool2d_backward_nhwc_kernel(g_ptr, off_ptr, gi_ptr, npix, C, H, W, Ho, Wo,
                                     KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                                     PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                                     FP64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (p < npix)[:, None] & (c < C)[None, :]
    t = p // W
    iw = (p - t * W)[:, None]
    ih = (t % H)[:, None]
    img = t // H
    if FP64:
        acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float64)
    else:
        acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    obase = (img * Ho * Wo * C)[:, None] + c[None, :]
    acc = _gather_window_grads(g_ptr, off_ptr, ih, iw, Ho, Wo, obase, C, mask, acc,
                               KH, KW, SH, SW, PH, PW, DH, DW)
    tl.store(gi_ptr + p[:, None] * C + c[None, :], acc.to(gi_ptr.dtype.element_ty), mask=mask)


def _geometry(kernel_size, stride, padding, dilation):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    return dict(KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw)


def _block_c(C: int) -> int:
    return min(triton.next_power_of_2(C), 64)


def max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, channels_last, return_indices,
               return_offsets):
    from ..ops.max_pool2d import output_shape

    shape = output_shape(input, kernel_size, stride, padding, dilation, ceil_mode, channels_last)
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
    C, H, W = input.shape[-3:]
    Ho, Wo = shape[-2:]
    flags = dict(IDX=bool(return_indices), OFF=bool(return_offsets), FP64=is_fp64(input),
                 **_geometry(kernel_size, stride, padding, dilation))
    ip = idx if return_indices else out  # unused pointers: any tensor
    op = off if return_offsets else out
    if channels_last:
        npix, bc = out.numel() // C, _block_c(C)
        tiles = column_tiles(C, bc, "max_pool2d", "channels_last inputs with channels")
        grid = lambda meta: (triton.cdiv(npix, meta["BLOCK_P"]), tiles)  # noqa: E731
        _max_pool2d_nhwc_kernel[grid](x, out, ip, op, npix, C, H, W, Ho, Wo, BLOCK_C=bc, **flags)
    else:
        n = out.numel()
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
        _max_pool2d_nchw_kernel[grid](x, out, ip, op, n, H, W, Ho, Wo, **flags)
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
    if channels_last:
        npix, bc = gi.numel() // C, _block_c(C)
        tiles = column_tiles(C, bc, "max_pool2d_backward", "channels_last inputs with channels")
        grid = lambda meta: (triton.cdiv(npix, meta["BLOCK_P"]), tiles)  # noqa: E731
        _max_pool2d_backward_nhwc_kernel[grid](g, off, gi, npix, C, H, W, Ho, Wo, BLOCK_C=bc, **flags)
    else:
        n = gi.numel()
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
        _max_pool2d_backward_nchw_kernel[grid](g, off, gi, n, H, W, Ho, Wo, **flags)
    return gi
