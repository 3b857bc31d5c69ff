"""Per-call cost on small tensors, where host time (Python, dispatch, autograd)
outweighs the kernels: ours against eager PyTorch in the same process.

    PYTHONPATH=. python benchmarks/host_overhead.py [threads]
    PYTHONPATH=. python benchmarks/host_overhead.py --triton

Medians of 9 rounds of back-to-back calls. --triton times the Triton backend's
launchers (a forward or backward kernel each) on a machine with no GPU, under
dtkernels.testing.fake_cuda_driver: Triton's whole host path runs (binding,
specialisation, JIT cache, autotuner, our launcher's allocations) and only the
hand-off to the driver is skipped, so the times are the host cost of a launch. To compare two builds, run each build's
checkout in its own process, alternating (results: benchmarks/results/).
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

import dtkernels as dtk


def median_us(fn, calls: int) -> float:
    for _ in range(30):
        fn()
    rounds = []
    for _ in range(9):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    return sorted(rounds)[4]


def cases():
    cl = torch.channels_last
    skip = torch.randn(1, 32, 14, 14)
    pool2 = (lambda x: F.max_pool2d(x, 2), lambda x: dtk.max_pool2d(x, 2))
    return [
        ("max_pool2d k2 channels_last 1x512x14x14", *pool2, (1, 512, 14, 14), cl),
        ("max_pool2d k2 channels_last 1x128x28x28", *pool2, (1, 128, 28, 28), cl),
        ("max_pool2d k2 channels_last 8x256x8x8", *pool2, (8, 256, 8, 8), cl),
        ("max_pool2d k2 channels_last 1x64x4x4", *pool2, (1, 64, 4, 4), cl),
        ("max_pool2d k3s2p1 NCHW 2x16x16x16", lambda x: F.max_pool2d(x, 3, 2, 1),
         lambda x: dtk.max_pool2d(x, 3, 2, 1), (2, 16, 16, 16), None),
        ("max_pool2d k2 NCHW 1x512x14x14", *pool2, (1, 512, 14, 14), None),
        ("residual_add 1x64x14x14", lambda x: torch.relu(x + x), lambda x: dtk.residual_add(x, x), (1, 64, 14, 14),
         None),
        ("concat_skip nearest 1x64x7x7 + 1x32x14x14",
         lambda x: torch.cat([F.interpolate(x, scale_factor=2), skip], 1),
         lambda x: dtk.concat_skip(x, skip, upsample="nearest"), (1, 64, 7, 7), None),
    ]


def triton_cases():
    from dtkernels.triton import concat_skip as tc
    from dtkernels.triton import max_pool2d as tm
    from dtkernels.triton import residual_add as tr

    x = torch.randn(2, 16, 16, 16)
    xc = x.contiguous(memory_format=torch.channels_last)
    geo = ((3, 3), (2, 2), (1, 1), (1, 1))
    _, _, off = tm.max_pool2d(x, *geo, False, False, False, True)
    _, _, offc = tm.max_pool2d(xc, *geo, False, True, False, True)
    g = torch.randn(2, 16, 8, 8)
    gc = g.contiguous(memory_format=torch.channels_last)
    small, skip = torch.randn(1, 64, 7, 7), torch.randn(1, 32, 14, 14)
    gup = torch.randn(1, 96, 14, 14)[:, :64]  # the upsampled part's slice of the concat's grad
    y = torch.randn(1, 64, 14, 14)
    return [
        ("max_pool2d k3s2p1 NCHW 2x16x16x16, offsets", lambda: tm.max_pool2d(x, *geo, False, False, False, True)),
        ("max_pool2d same, channels_last", lambda: tm.max_pool2d(xc, *geo, False, True, False, True)),
        ("max_pool2d_backward NCHW", lambda: tm.max_pool2d_backward(g, off, x.shape, *geo, False)),
        ("max_pool2d_backward channels_last", lambda: tm.max_pool2d_backward(gc, offc, x.shape, *geo, True)),
        ("residual_add 1x64x14x14", lambda: tr.residual_add(y, y, 1.0, True)),
        ("residual_add_backward", lambda: tr.residual_add_backward(y, y, 1.0)),
        ("concat_skip nearest 1x64x7x7 + 1x32x14x14", lambda: tc.concat_skip(small, skip, "nearest", 2)),
        ("concat_skip_backward nearest", lambda: tc.concat_skip_backward(gup, "nearest", 2)),
    ]


def triton_op_cases():
    """Public ops through the Triton route: the launch plus the op's checks, the
    registry and the Python kernel bridge, and autograd for fwd+bwd."""
    x = torch.randn(2, 16, 16, 16)
    xg = x.clone().requires_grad_(True)
    g = torch.randn(2, 16, 8, 8)

    def step():
        dtk.max_pool2d(xg, 3, 2, 1).backward(g)
        xg.grad = None

    y = torch.randn(1, 64, 14, 14)
    return [
        ("dtk.max_pool2d k3s2p1 2x16x16x16", lambda: dtk.max_pool2d(x, 3, 2, 1)),
        ("dtk.max_pool2d same, fwd+bwd", step),
        ("dtk.residual_add 1x64x14x14", lambda: dtk.residual_add(y, y)),
    ]


def main_triton() -> None:
    from unittest import mock

    from dtkernels import backends
    from dtkernels.testing import fake_cuda_driver

    torch.set_num_threads(1)
    with fake_cuda_driver(record=False):
        print("| Triton launcher (fake driver, no GPU) | host µs per call |")
        print("|---|---|")
        for name, fn in triton_cases():
            print(f"| {name} | {median_us(fn, 2000):.2f} |")
        # The registry runs Triton on CPU tensors only under the interpreter: let it
        # take the fake driver's compiled kernels instead.
        with mock.patch.object(backends, "triton_interpreting", lambda: True), \
                mock.patch.object(backends, "available_backends", lambda: ("cpu", "triton", "reference")), \
                dtk.use_backend("triton"):
            for name, fn in triton_op_cases():
                print(f"| {name} (triton route) | {median_us(fn, 1000):.2f} |")


def main() -> None:
    if "--triton" in sys.argv:
        return main_triton()
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    print("| call | eager fwd µs | ours fwd µs | × eager | eager fwd+bwd µs | ours fwd+bwd µs | × eager |")
    print("|---|---|---|---|---|---|---|")
    for name, eager, ours, shape, fmt in cases():
        x = torch.randn(shape)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        fe, fo = median_us(lambda: eager(x), 1000), median_us(lambda: ours(x), 1000)
        xg = x.detach().requires_grad_(True)
        grad = torch.randn_like(eager(xg))

        def step(f):
            def run():
                f(xg).backward(grad)
                xg.grad = None
            return run

        be, bo = median_us(step(eager), 500), median_us(step(ours), 500)
        print(f"| {name} | {fe:.2f} | {fo:.2f} | {fe / fo:.2f} | {be:.2f} | {bo:.2f} | {be / bo:.2f} |")


if __name__ == "__main__":
    main()
