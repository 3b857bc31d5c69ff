"""residual_add: relu(x + fx), against eager `torch.relu(x + fx)`.

On the CPU the eager forward allocates two fresh outputs (x + fx, then relu), the
fused op one: at 64 MiB each costs ~17 ms of page faults, so the win is mostly
the allocation avoided. The clone row is the copy-bandwidth yardstick."""
from __future__ import annotations

import pytest
import torch

import dtkernels as dtk
from dtkernels import reference as ref

from common import Case, IMPLS, run_pytest_benchmark

CL = torch.channels_last


def _inputs(shape, dtype, memory_format=torch.contiguous_format, grad=False):
    def make(device):
        g = torch.Generator().manual_seed(0)
        x, fx, go = (torch.randn(shape, generator=g).to(device=device, dtype=dtype)
                     .contiguous(memory_format=memory_format) for _ in range(3))
        return {"x": x.requires_grad_(grad), "fx": fx.requires_grad_(grad), "g": go}
    return make


def _fwd(f):
    return lambda i: f(i["x"], i["fx"])


def _fwd_bwd(f):
    def run(i):
        out = f(i["x"], i["fx"])
        return torch.autograd.grad(out, (i["x"], i["fx"]), i["g"])
    return run


def _nbytes(shape, dtype, tensors):
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size() * tensors


def _cases():
    out = []
    big = (16, 64, 128, 128)
    for dtype, fmt, label in [(torch.float32, torch.contiguous_format, "16x64x128x128"),
                              (torch.float32, CL, "16x64x128x128-cl"),
                              (torch.float16, torch.contiguous_format, "16x64x128x128"),
                              (torch.bfloat16, torch.contiguous_format, "16x64x128x128")]:
        main = dtype == torch.float32 and fmt == torch.contiguous_format
        out.append(Case(
            "residual_add", "fwd", label, dtype, _inputs(big, dtype, fmt),
            baseline=_fwd(ref.residual_add), candidate=_fwd(dtk.residual_add),
            extras={"clone": lambda i: i["x"].clone()}, bytes=_nbytes(big, dtype, 3),
            clone_bytes=_nbytes(big, dtype, 2), target=1.7 if main else None))
        out.append(Case(
            "residual_add", "fwd+bwd", label, dtype, _inputs(big, dtype, fmt, grad=True),
            baseline=_fwd_bwd(ref.residual_add), candidate=_fwd_bwd(dtk.residual_add),
            bytes=_nbytes(big, dtype, 3 + 3), target=1.35 if main else None))
    mid = (8, 64, 64, 64)  # 8 MiB: under glibc's mmap threshold regime, memory gets reused
    out.append(Case("residual_add", "fwd", "8x64x64x64", torch.float32, _inputs(mid, torch.float32),
                    baseline=_fwd(ref.residual_add), candidate=_fwd(dtk.residual_add),
                    extras={"clone": lambda i: i["x"].clone()}, bytes=_nbytes(mid, torch.float32, 3),
                    clone_bytes=_nbytes(mid, torch.float32, 2)))
    # A tiny tensor: what one call costs besides its kernels (dispatch, autograd).
    tiny = (2, 16, 8, 8)
    out.append(Case("residual_add", "fwd+bwd", "2x16x8x8", torch.float32, _inputs(tiny, torch.float32, grad=True),
                    baseline=_fwd_bwd(ref.residual_add), candidate=_fwd_bwd(dtk.residual_add), inner=200,
                    note="per-call overhead: host time of dispatch and autograd"))
    return out


CASES = _cases()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_residual_add(benchmark, case, impl, device):
    run_pytest_benchmark(benchmark, case, impl, device)
