"""Per-call cost on small tensors, where host time (Python, dispatch, autograd)
outweighs the kernels: ours against eager PyTorch in the same process.

    python benchmarks/host_overhead.py [threads] [--device cuda]
    python benchmarks/host_overhead.py --triton [--device cuda]

Medians of 9 rounds of back-to-back calls. --triton times the Triton backend's
launchers (a forward or backward kernel each) on a machine with no GPU, under
dtkernels.testing.fake_cuda_driver: Triton's whole host path runs (binding,
specialisation, JIT cache, autotuner, our launcher's allocations) and only the
hand-off to the driver is skipped, so the times are the host cost of a launch.
With --device cuda either mode times its calls on a GPU's host (the GPU check's
"host" step; without --triton, "ours" is the default route, CUDA C++).
To compare two builds, run each build's checkout in its own process, alternating
(results: benchmarks/results/).
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # dtkernels, built in place (the GPU check)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dtkernels as dtk  # noqa: E402


def median_us(fn, calls: int) -> float:
    """Host µs per call. On a GPU the launches queue, not waited for (tiny kernels
    finish faster than they are issued); each round starts with the queue drained."""
    for _ in range(30):
        fn()
    rounds = []
    for _ in range(9):
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    return sorted(rounds)[4]


def _device() -> str:
    return sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"


def cases(dev="cpu"):
    cl = torch.channels_last
    skip = torch.randn(1, 32, 14, 14, device=dev)
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


def triton_cases(dev):
    from dtkernels.triton import concat_skip as tc
    from dtkernels.triton import max_pool2d as tm
    from dtkernels.triton import residual_add as tr

    def randn(*shape):
        return torch.randn(*shape, device=dev)

    x = randn(2, 16, 16, 16)
    xc = x.contiguous(memory_format=torch.channels_last)
    geo = ((3, 3), (2, 2), (1, 1), (1, 1))
    _, _, off = tm.max_pool2d(x, *geo, False, False, False, True)
    _, _, offc = tm.max_pool2d(xc, *geo, False, True, False, True)
    g = randn(2, 16, 8, 8)
    gc = g.contiguous(memory_format=torch.channels_last)
    small, skip = randn(1, 64, 7, 7), randn(1, 32, 14, 14)
    gup = randn(1, 96, 14, 14)[:, :64]  # the upsampled part's slice of the concat's grad
    y = randn(1, 64, 14, 14)
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


def triton_layers(dev):
    """One launch of max_pool2d's NCHW forward kernel (2x16x16x16, offsets) through
    each layer: where a launch's host time goes."""
    from dtkernels.triton import max_pool2d as tm

    x = torch.randn(2, 16, 16, 16, device=dev)
    out, _, off = tm.max_pool2d(x, (3, 3), (2, 2), (1, 1), (1, 1), False, False, False, True)
    k = tm._max_pool2d_nchw_kernel
    rows, wo = out.numel() // out.shape[-1], out.shape[-1]
    grid = lambda meta: (tm.cdiv(rows, meta["BLOCK_H"]) * tm.cdiv(wo, meta["BLOCK_W"]),)  # noqa: E731
    args = (x, out, out, off, rows, 16, 16, 8, 8)
    flags = dict(WIDE=False, IDX=False, OFF=True, KH=3, KW=3, SH=2, SW=2, PH=1, PW=1, DH=1, DW=1)
    picked = k.picked(*args, **flags)  # the launcher above has tuned this key
    return [
        ("launcher (allocations, sizes, then the kernel as below)",
         lambda: tm.max_pool2d(x, (3, 3), (2, 2), (1, 1), (1, 1), False, False, False, True)),
        ("kernel through triton.autotune's wrapper", lambda: k.autotuner[grid](*args, **flags)),
        ("kernel through _Tuned (what the launcher uses)", lambda: k[grid](*args, **flags)),
        ("kernel through JITFunction.run, config given", lambda: k.fn.run(*args, grid=grid, warmup=False, **flags,
                                                                           **picked)),
    ]


def triton_op_cases(dev):
    """Public ops through the Triton route: the launch plus the op's checks, the
    registry and the Python kernel bridge, and autograd for fwd+bwd."""
    x = torch.randn(2, 16, 16, 16, device=dev)
    xg = x.clone().requires_grad_(True)
    g = torch.randn(2, 16, 8, 8, device=dev)

    def step():
        dtk.max_pool2d(xg, 3, 2, 1).backward(g)
        xg.grad = None

    y = torch.randn(1, 64, 14, 14, device=dev)
    return [
        ("dtk.max_pool2d k3s2p1 2x16x16x16", lambda: dtk.max_pool2d(x, 3, 2, 1)),
        ("dtk.max_pool2d same, fwd+bwd", step),
        ("dtk.residual_add 1x64x14x14", lambda: dtk.residual_add(y, y)),
    ]


def main_triton() -> None:
    """Host µs per Triton call (with --device cuda, on a GPU)."""
    from unittest import mock

    from dtkernels import backends
    from dtkernels.testing import fake_cuda_driver

    dev = _device()
    torch.set_num_threads(1)
    where = "CUDA" if dev == "cuda" else "fake driver, no GPU"
    with contextlib.ExitStack() as stack:
        if dev == "cpu":
            stack.enter_context(fake_cuda_driver(record=False))
            # The registry runs Triton on CPU tensors only under the interpreter:
            # let it take the fake driver's compiled kernels instead.
            stack.enter_context(mock.patch.object(backends, "triton_interpreting", lambda: True))
            stack.enter_context(mock.patch.object(backends, "available_backends",
                                                  lambda: ("cpu", "triton", "reference")))
        print(f"| Triton call ({where}) | host µs per call |")
        print("|---|---|")
        for name, fn in triton_cases(dev):
            print(f"| {name} | {median_us(fn, 2000):.2f} |")
        for name, fn in triton_layers(dev):
            print(f"| {name} | {median_us(fn, 2000):.2f} |")
        with dtk.use_backend("triton"):
            for name, fn in triton_op_cases(dev):
                print(f"| {name} (triton route) | {median_us(fn, 1000):.2f} |")


def main() -> None:
    if "--triton" in sys.argv:
        return main_triton()
    dev = _device()
    threads = [a for a in sys.argv[1:] if a.isdigit()]
    torch.set_num_threads(int(threads[0]) if threads else 2)
    print(f"| call ({dev}) | eager fwd µs | ours fwd µs | × eager | eager fwd+bwd µs | ours fwd+bwd µs | × eager |")
    print("|---|---|---|---|---|---|---|")
    for name, eager, ours, shape, fmt in cases(dev):
        x = torch.randn(shape, device=dev)
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
