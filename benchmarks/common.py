"""One benchmark harness for pytest-benchmark (make bench), the demo (make demo) and
the GPU check (scripts/gpu_check.sh).

A Case names an op, a shape and a dtype, builds its inputs outside the timed region,
and gives three kinds of callables: the PyTorch baseline (built from
dtkernels.reference, the same oracle the tests use), the dtkernels candidate (run
under each backend in turn), and extras such as ``x.clone()`` that measure the
machine's copy bandwidth in the same run. Timings are interleaved rounds, median.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import dtkernels as dtk

Inputs = dict[str, Any]
# What each bench_<op>.py parametrizes its pytest-benchmark test over.
IMPLS = ["torch", "dtk-cpu", "dtk-triton", "dtk-cuda", "clone"]


@dataclass
class Case:
    op: str
    name: str                     # "fwd", "fwd+bwd", ...
    shape: str                    # label, e.g. "16x64x128x128"
    dtype: torch.dtype
    make: Callable[[torch.device], Inputs]
    baseline: Callable[[Inputs], Any]
    candidate: Callable[[Inputs], Any]
    extras: dict[str, Callable[[Inputs], Any]] = field(default_factory=dict)  # "cuda-*": CUDA devices only
    bytes: int | None = None      # fewest bytes the op must move (reads + writes)
    clone_bytes: int | None = None  # bytes the "clone" extra moves, when not `bytes`
    target: float | None = None   # the speed-up target over the baseline (reported, never asserted)
    note: str = ""
    devices: tuple[str, ...] = ("cpu", "cuda")
    tol: dict[str, float] | None = None  # assert_close overrides for check_case (deep compositions)
    info: Callable[[Inputs], dict[str, Any]] | None = None  # figures besides time (e.g. memory), reported
    inner: int = 1                # CPU calls per timed sample (tiny cases: per-call overhead)

    @property
    def id(self) -> str:
        return f"{self.op}-{self.name}-{self.shape}-{str(self.dtype).replace('torch.', '')}"

    @property
    def group(self) -> str:
        return f"{self.op} {self.name} {self.shape} {str(self.dtype).replace('torch.', '')}"


def impls_for(case: Case, device: torch.device, backends: list[str]) -> dict[str, Callable[[Inputs], Any]]:
    """Name -> callable: "torch", "dtk-<backend>" for each backend, then extras (those
    named "cuda-*" on CUDA devices only)."""
    out = {"torch": case.baseline}
    for b in backends:
        out[f"dtk-{b}"] = _under(b, case.candidate)
    out.update({k: f for k, f in case.extras.items() if device.type == "cuda" or not k.startswith("cuda-")})
    return out


def _under(backend: str, fn):
    # One context, entered per call: building use_backend validates the name against
    # available_backends() (2 µs a call here, more on slower hosts), which is no cost
    # of the op itself and which eager calls do not pay.
    scope = dtk.use_backend(backend)

    def run(inputs):
        with scope:
            return fn(inputs)
    return run


def graphed(fn: Callable[[Inputs], Any]) -> Callable[[Inputs], Any]:
    """fn replayed from a CUDA graph: its kernels' time without the host's, as
    torch.compile's "reduce-overhead" mode or a user's own graph would run it. One
    graph per input set and backend, captured after one eager call on a side stream
    (autotuning, compiling, allocator warm-up); each call replays it and returns the
    graph's outputs."""
    graphs: dict[tuple, tuple] = {}

    def run(inputs):
        key = (id(inputs), dtk.get_backend())
        hit = graphs.get(key)
        if hit is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn(inputs)
            hit = graphs[key] = (graph, out, inputs)  # inputs kept: their id stays theirs
        hit[0].replay()
        return hit[1]
    return run


def gpu_backends(only: str = "") -> list[str]:
    """The GPU backends built here, or those of them named in `only` (comma-separated)."""
    names = [b for b in ("triton", "cuda") if b in dtk.available_backends()]
    return [b for b in names if b in only.split(",")] if only else names


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_case(case: Case, device: torch.device, backends: list[str]) -> None:
    """The candidate must match the baseline on the case's own (random) inputs.

    TF32 is off while checking (the references are full fp32). For 16-bit cases
    whose inputs are plain tensors the expected values come from the baseline run
    in float64: ATen's own 16-bit kernels (e.g. bf16 atomics in CUDA's bilinear
    backward) can be further from the truth than the candidate."""
    inputs = case.make(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        ref_inputs = inputs
        if case.dtype in (torch.float16, torch.bfloat16) and all(isinstance(v, torch.Tensor) for v in inputs.values()):
            ref_inputs = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in inputs.items()}
        expected = _flatten(case.baseline(ref_inputs))
        for b in backends:
            got = _flatten(_under(b, case.candidate)(inputs))
            assert len(got) == len(expected)
            for g, e in zip(got, expected):
                dtk.testing.assert_close(g, e, dtype=case.dtype, msg=f"{case.id} on {b}", **(case.tol or {}))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _flatten(r) -> list[torch.Tensor]:
    if isinstance(r, torch.Tensor):
        return [r]
    return [t for x in r for t in _flatten(x)] if isinstance(r, (list, tuple)) else []


def time_case(case: Case, device: torch.device, backends: list[str], rounds: int = 15,
              warmup: int = 2, gpu_inner: int = 10) -> dict[str, dict[str, float]]:
    """Interleaved timing of every impl of a case: per impl the median (and p20/p80)
    milliseconds of one call. On a GPU each sample is CUDA events around
    `gpu_inner` calls rotated over several input sets, so L2 does not flatter."""
    impls = impls_for(case, device, backends)
    sets = [case.make(device) for _ in range(4 if device.type == "cuda" else 1)]
    for fn in impls.values():  # warm-up: JIT, autotune, allocator
        for _ in range(warmup):
            for s in sets:
                fn(s)
    sync(device)
    samples: dict[str, list[float]] = {k: [] for k in impls}
    names = list(impls)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            fn = impls[name]
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for i in range(gpu_inner):
                    fn(sets[i % len(sets)])
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / gpu_inner)
            else:
                t0 = time.perf_counter()
                for _ in range(case.inner):
                    fn(sets[0])
                samples[name].append((time.perf_counter() - t0) * 1e3 / case.inner)
    return {k: _stats(v) for k, v in samples.items()}


def _stats(v: list[float]) -> dict[str, float]:
    q = statistics.quantiles(v, n=5) if len(v) >= 5 else [min(v)] * 4
    return {"median_ms": statistics.median(v), "p20_ms": q[0], "p80_ms": q[3], "rounds": len(v)}


def rows_for(case: Case, device: torch.device, stats: dict[str, dict[str, float]]) -> list[dict]:
    """Table rows: speed-up over the baseline, GB/s, and fraction of the clone's GB/s."""
    base = stats["torch"]["median_ms"]
    clone = stats.get("clone", {}).get("median_ms")
    rows = []
    for impl, s in stats.items():
        nbytes = (case.clone_bytes or case.bytes) if impl == "clone" else case.bytes
        gbs = nbytes / s["median_ms"] / 1e6 if nbytes else None
        rows.append({
            "op": case.op, "case": case.name, "shape": case.shape,
            "dtype": str(case.dtype).replace("torch.", ""), "device": device.type, "impl": impl,
            **{k: round(v, 4) for k, v in s.items()},
            "speedup_vs_torch": round(base / s["median_ms"], 3),
            "gb_per_s": round(gbs, 1) if gbs else None,
            # (our bytes / our time) / (clone's bytes / clone's time)
            "frac_of_clone_bw": round(clone / s["median_ms"] * nbytes / (case.clone_bytes or case.bytes), 3)
            if clone and nbytes else None,
            "target": case.target if impl.startswith("dtk-") else None,
        })
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| op | case | shape | dtype | impl | median ms | p20–p80 ms | × torch | target | GB/s | of clone BW |"
    out = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        out.append("| " + " | ".join([
            r["op"], r["case"], r["shape"], r["dtype"], r["impl"], f"{r['median_ms']:.3f}",
            f"{r['p20_ms']:.3f}–{r['p80_ms']:.3f}", f"{r['speedup_vs_torch']:.2f}",
            f"≥{r['target']}" if r.get("target") else "", f"{r['gb_per_s']:.0f}" if r.get("gb_per_s") else "",
            f"{r['frac_of_clone_bw']:.2f}" if r.get("frac_of_clone_bw") else "",
        ]) + " |")
    return "\n".join(out)


def load_cases() -> list[Case]:
    """Every benchmarks/bench_<op>.py's CASES, in file order."""
    import importlib
    import pathlib
    import sys

    here = pathlib.Path(__file__).parent
    sys.path.insert(0, str(here))
    cases: list[Case] = []
    for f in sorted(here.glob("bench_*.py")):
        cases += importlib.import_module(f.stem).CASES
    return cases


def run_pytest_benchmark(benchmark, case: Case, impl: str, device: torch.device) -> None:
    """Body of every pytest-benchmark test: warm-up outside, sync inside the timing."""
    import pytest

    if device.type not in case.devices:
        pytest.skip(f"{case.id} is not run on {device.type}")
    backends = ["cpu"] if device.type == "cpu" else gpu_backends()
    impls = impls_for(case, device, backends)
    if impl not in impls:
        pytest.skip(f"{impl} does not run on {device.type} here")
    fn, inputs = impls[impl], case.make(device)
    for _ in range(2):
        fn(inputs)
    sync(device)

    def once():
        fn(inputs)
        sync(device)

    benchmark.group = case.group
    benchmark.extra_info.update({"op": case.op, "case": case.name, "shape": case.shape, "impl": impl,
                                 "dtype": str(case.dtype), "device": device.type, "bytes": case.bytes,
                                 "target": case.target})
    if case.info is not None:
        benchmark.extra_info.update(case.info(inputs))
    benchmark.pedantic(once, rounds=11 if device.type == "cpu" else 50, iterations=1, warmup_rounds=2)
