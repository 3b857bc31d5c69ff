#!/usr/bin/env python3
"""Where the time goes on a GPU: per case and impl, the wall time per call (CUDA
events, calls back to back), the host time to issue one call, and the kernels'
own device time (torch.profiler). wall ≈ host means the call is host-bound (Python
dispatch, launch overhead); wall ≈ device means the kernels themselves are the cost.

    python benchmarks/gpu_profile.py [--filter SUBSTR ...] [--backends cuda,triton] [--md out.md]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from common import gpu_backends, impls_for, load_cases  # noqa: E402

DEFAULT = ["residual_add fwd 16x64x128x128 float32", "residual_add fwd+bwd 16x64x128x128 float32",
           "residual_add fwd 8x64x64x64", "concat_skip fwd nearest x16x64x64x64+skip16x64x128x128 float32",
           "concat_skip fwd+bwd nearest x16x64x64x64+skip16x64x128x128 float32",
           "max_pool2d k3s2p1-fwd 32x64x112x112", "max_pool2d k3s2p1-fwd+bwd 32x64x112x112",
           "max_pool2d k2s2-fwd 64x128x128x128 float16", "max_pool2d k2s2-fwd 64x128x128x128-cl float16",
           # the bilinear adjoint's default and candidate packs (impls cuda-adjoint-*)
           "concat_skip fwd+bwd bilinear x16x64x64x64+skip16x64x128x128-cl float32",
           # per-call overhead (tiny tensors) and the DenseBlock step: host-bound before
           # dispatch and autograd moved to C++
           "residual_add fwd+bwd 2x16x8x8", "max_pool2d k3s2p1-fwd+bwd 2x16x16x16",
           "concat_skip fwd+bwd nearest x2x16x8x8", "dense_block train step"]


def _dev_time(evt) -> float:
    for a in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, a):
            return float(getattr(evt, a))
    return 0.0


def _short(kernel: str) -> str:
    """A kernel's name without return type, namespaces and template arguments
    (dtkernels' kernels of one op differ only past the namespaces)."""
    name = kernel.removeprefix("void ").split("<")[0].split("(anonymous namespace)::")[-1]
    return name.split("::")[-1][:60]


def measure(fn, inputs, iters: int = 20):
    for _ in range(3):
        fn(inputs)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(inputs)
    host = (time.perf_counter() - t0) / iters * 1e3
    end.record()
    end.synchronize()
    wall = start.elapsed_time(end) / iters
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn(inputs)
        torch.cuda.synchronize()
    kernels = [(e.key, _dev_time(e) / iters / 1e3, e.count // iters) for e in prof.key_averages()
               if _dev_time(e) > 0]
    kernels.sort(key=lambda k: -k[1])
    return wall, host, sum(k[1] for k in kernels), kernels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--filter", nargs="*", default=DEFAULT)
    ap.add_argument("--backends", default="", help="comma-separated GPU backends (default: all built)")
    ap.add_argument("--md")
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    lines = ["| case | impl | wall ms/call | host ms/call | kernels ms/call | top kernels (ms/call ×launches) |",
             "|---|---|---|---|---|---|"]
    for c in load_cases():
        if "cuda" not in c.devices or not any(f in c.group for f in a.filter):
            continue
        inputs = c.make(dev)
        for name, fn in impls_for(c, dev, gpu_backends(a.backends)).items():
            try:  # the clone too: the copy bandwidth's kernel time
                wall, host, k, kernels = measure(fn, inputs)
            except Exception as e:  # keep going: the table is the point
                lines.append(f"| {c.group} | {name} | failed: {type(e).__name__}: {e} | | | |")
                continue
            top = "; ".join(f"{_short(n)} {t:.3f}×{cnt}" for n, t, cnt in kernels[:3])
            lines.append(f"| {c.group} | {name} | {wall:.3f} | {host:.3f} | {k:.3f} | {top} |")
            print(lines[-1], flush=True)
            if a.md:  # after every row: a timeout keeps what was measured
                Path(a.md).write_text("# GPU profile: wall vs host vs kernel time\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
