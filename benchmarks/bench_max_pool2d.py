"""max_pool2d against F.max_pool2d: forward and forward+backward, with and without
indices, NCHW and channels_last.

On the CPU, ATen's NCHW forward is a scalar loop and every ATen call also allocates
int64 indices (32 MiB for a 16x64x64x64 output: page faults), while ours computes no
indices unless asked and keeps int8 window offsets for backward only when the input
requires grad. The 64 MiB gradient of the input is a fresh allocation for both.
The GPU cases are the issue's H100 ones: the ResNet stem (32x64x112x112 fp16,
k3s2p1) and a large forward measured against a copy of the same number of bytes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dtkernels as dtk

from common import Case, IMPLS, graphed, run_pytest_benchmark

CL = torch.channels_last
NCHW = torch.contiguous_format


def _inputs(shape, dtype, memory_format, pool, grad=False, copy_bytes=None):
    def make(device):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).contiguous(memory_format=memory_format)
        out_shape = F.max_pool2d(torch.empty(shape, device="meta"), *pool).shape
        g = torch.randn(out_shape, generator=gen).to(device=device, dtype=dtype).contiguous(memory_format=memory_format)
        res = {"x": x.requires_grad_(grad), "g": g}
        if copy_bytes:  # a tensor whose clone moves the case's bytes (read + write)
            res["c"] = torch.empty(copy_bytes // 2, dtype=torch.uint8, device=device)
        return res
    return make


def _fwd(f, pool, indices=False):
    return lambda i: f(i["x"], *pool, return_indices=indices)


def _fwd_bwd(f, pool, indices=False):
    def run(i):
        out = f(i["x"], *pool, return_indices=indices)
        out = out[0] if indices else out
        return torch.autograd.grad(out, i["x"], i["g"])
    return run



def _nbytes(shape, dtype, pool):
    n_in = torch.Size(shape).numel()
    n_out = F.max_pool2d(torch.empty(shape, device="meta"), *pool).numel()
    return (n_in + n_out) * torch.empty((), dtype=dtype).element_size()


K2, K3 = (2,), (3, 2, 1)  # k2s2, and k3s2p1 (the ResNet stem)


def _vec_candidates(pool, stem=True):
    """The CUDA vec forward's candidate kernels, timed beside the op (CUDA builds only;
    csrc/max_pool2d.h: with_pool_vec_kernel, pool_forward_vec), values only as the op
    without grad: the stem's with 0 (the default), 1 or 2 output rows per thread item,
    rows compiled in for 1 and 2, launched with as many blocks as fit at once (the
    default) or with a block per 256 items ("-full"); and for any vec geometry,
    16-bit values compared in pairs ("-pairs"), and the input read through shared-memory
    tiles of up to 32 or 16 KiB of input rows per block ("cuda-tile-32k", "-16k";
    pool_tile_load, pool_tile_outputs). "-offsets": the stem's forward with the window
    offsets, as under autograd."""
    variant = getattr(dtk._C, "_cuda_max_pool2d_vec_variant", None)
    if variant is None:
        return {}
    k, s, p = pool[0], pool[1] if len(pool) > 1 else pool[0], pool[2] if len(pool) > 2 else 0

    def call(rows, full, pairs, offsets=False, tile_kib=0):
        return lambda i: variant(i["x"], [k, k], [s, s], [p, p], [1, 1], False, rows, full, pairs, False, offsets,
                                 tile_kib * 1024)
    tiles = {"cuda-tile-32k": call(0, False, False, tile_kib=32),
             "cuda-tile-32k-pairs": call(0, False, True, tile_kib=32)}
    if not stem:
        return {"cuda-vec-r0": call(0, False, False), "cuda-vec-r0-pairs": call(0, False, True), **tiles}
    out = {f"cuda-vec-r{rows}" + ("-full" if full else ""): call(rows, full, False)
           for rows in (0, 1, 2) for full in (False, True)}
    out.update({f"cuda-vec-r{rows}-pairs": call(rows, False, True) for rows in (0, 1, 2)})
    out.update({**tiles, "cuda-tile-16k": call(0, False, False, tile_kib=16)})
    # the training forward: with the int8 offsets that backward keeps (not the yardstick's bytes)
    out.update({"cuda-vec-r0-offsets": call(0, False, False, True),
                "cuda-vec-r0-pairs-offsets": call(0, False, True, True)})
    return out


def _nhwc_candidates(pool):
    """The CUDA channels_last forward as the op runs it ("cuda-nhwc") and with 16-bit
    channels compared in pairs ("-pairs"): values only, as the op without grad, and
    ("-offsets") with the window offsets, as under autograd."""
    variant = getattr(dtk._C, "_cuda_max_pool2d_nhwc_variant", None)
    if variant is None:
        return {}
    k, s, p = pool[0], pool[1] if len(pool) > 1 else pool[0], pool[2] if len(pool) > 2 else 0

    def call(pairs, offsets=False):
        return lambda i: variant(i["x"], [k, k], [s, s], [p, p], [1, 1], False, pairs, False, offsets)
    return {"cuda-nhwc": call(False), "cuda-nhwc-pairs": call(True),
            "cuda-nhwc-offsets": call(False, True), "cuda-nhwc-pairs-offsets": call(True, True)}


def _cases():
    out = []
    big, f32 = (16, 64, 128, 128), torch.float32
    label = "16x64x128x128"
    # CPU: the targets (same-run ratio to F.max_pool2d)
    for pool, name, fmt, indices, grad, target in [
        (K2, "k2s2-fwd", NCHW, False, False, 4.0),
        (K3, "k3s2p1-fwd", NCHW, False, False, 4.0),
        (K2, "k2s2-fwd+idx", NCHW, True, False, 3.0),
        (K3, "k3s2p1-fwd+idx", NCHW, True, False, 3.0),
        (K2, "k2s2-fwd+bwd", NCHW, False, True, 2.0),
        (K3, "k3s2p1-fwd+bwd", NCHW, False, True, 2.0),
        (K2, "k2s2-fwd+idx+bwd", NCHW, True, True, None),
        (K2, "k2s2-fwd", CL, False, False, 1.5),
        (K3, "k3s2p1-fwd", CL, False, False, 1.5),
        (K3, "k3s2p1-fwd+idx", CL, True, False, None),
        (K3, "k3s2p1-fwd+bwd", CL, False, True, None),
    ]:
        run = _fwd_bwd if grad else _fwd
        out.append(Case("max_pool2d", name, label + ("-cl" if fmt is CL else ""), f32,
                        _inputs(big, f32, fmt, pool, grad=grad),
                        baseline=run(F.max_pool2d, pool, indices), candidate=run(dtk.max_pool2d, pool, indices),
                        bytes=_nbytes(big, f32, pool), target=target, devices=("cpu",)))
    # H100: the ResNet stem (fwd+bwd >= 2x ATen), and forward at >= 85% of copy bandwidth
    stem, f16 = (32, 64, 112, 112), torch.float16
    for name, grad, target in [("k3s2p1-fwd", False, None), ("k3s2p1-fwd+bwd", True, 2.0)]:
        run = _fwd_bwd if grad else _fwd
        nb = _nbytes(stem, f16, K3)
        # the forward's yardstick: a clone of as many bytes
        extras = {} if grad else {"clone": lambda i: i["c"].clone(), **_vec_candidates(K3)}
        out.append(Case("max_pool2d", name, "32x64x112x112", f16,
                        _inputs(stem, f16, NCHW, K3, grad=grad, copy_bytes=0 if grad else nb),
                        baseline=run(F.max_pool2d, K3), candidate=run(dtk.max_pool2d, K3), extras=extras,
                        bytes=nb, target=target, devices=("cuda",)))
    large = (64, 128, 128, 128)
    for fmt in (NCHW, CL):
        nb = _nbytes(large, f16, K2)
        out.append(Case("max_pool2d", "k2s2-fwd", "64x128x128x128" + ("-cl" if fmt is CL else ""), f16,
                        _inputs(large, f16, fmt, K2, copy_bytes=nb),
                        baseline=_fwd(F.max_pool2d, K2), candidate=_fwd(dtk.max_pool2d, K2),
                        extras={"clone": lambda i: i["c"].clone(),
                                **(_vec_candidates(K2, stem=False) if fmt is NCHW else _nhwc_candidates(K2))},
                        bytes=nb, devices=("cuda",),
                        note="target: >= 0.85 of the copy bandwidth (clone of the same bytes)"))
    # The same forwards replayed from CUDA graphs, every impl alike: the kernels without
    # the host's time, which made every Triton call host-bound on the H100
    # (benchmarks/results/h100-20261127.md, cpu-triton-host-20261128.md).
    for shape, pool, fmt, label in [(stem, K3, NCHW, "k3s2p1"), (large, K2, NCHW, "k2s2"), (large, K2, CL, "k2s2")]:
        nb = _nbytes(shape, f16, pool)
        out.append(Case("max_pool2d", f"{label}-fwd-graph", "x".join(map(str, shape)) + ("-cl" if fmt is CL else ""),
                        f16, _inputs(shape, f16, fmt, pool, copy_bytes=nb),
                        baseline=graphed(_fwd(F.max_pool2d, pool)), candidate=graphed(_fwd(dtk.max_pool2d, pool)),
                        extras={"clone": graphed(lambda i: i["c"].clone())}, bytes=nb, devices=("cuda",),
                        note="CUDA graph replays: kernel time without the host's"))
    # A ResNet-sized map whose rows (28 outputs) are not a multiple of the vector length
    mid = (8, 64, 56, 56)
    out.append(Case("max_pool2d", "k3s2p1-fwd+bwd", "8x64x56x56", f32, _inputs(mid, f32, NCHW, K3, grad=True),
                    baseline=_fwd_bwd(F.max_pool2d, K3), candidate=_fwd_bwd(dtk.max_pool2d, K3),
                    bytes=_nbytes(mid, f32, K3), devices=("cpu",)))
    # A tiny tensor: what one call costs besides its kernels (dispatch, autograd).
    tiny = (2, 16, 16, 16)
    out.append(Case("max_pool2d", "k3s2p1-fwd+bwd", "2x16x16x16", f32, _inputs(tiny, f32, NCHW, K3, grad=True),
                    baseline=_fwd_bwd(F.max_pool2d, K3), candidate=_fwd_bwd(dtk.max_pool2d, K3), inner=200,
                    note="per-call overhead: host time of dispatch and autograd"))
    return out


CASES = _cases()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_max_pool2d(benchmark, case, impl, device):
    run_pytest_benchmark(benchmark, case, impl, device)
