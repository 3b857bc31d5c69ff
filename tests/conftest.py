"""Shared fixtures: every backend that can run here, with its device; outputs poisoned."""
from __future__ import annotations

import os

os.environ.setdefault("DTK_TRITON_AUTOTUNE", "0")  # tests check results: one Triton config, no tuning

import pytest
import torch

import dtkernels as dtk
from dtkernels import backends

HAS_GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

torch.backends.cuda.matmul.allow_tf32 = False  # references in full precision
torch.backends.cudnn.allow_tf32 = False


def backend_params(names=("cpu", "reference", "triton", "cuda")):
    """pytest params for backends; Triton and CUDA ones carry their markers."""
    marks = {"triton": [pytest.mark.triton], "cuda": [pytest.mark.cuda]}
    return [pytest.param(n, marks=marks.get(n, []), id=n) for n in names]


def skip_unless_runs(name: str) -> None:
    if name == "cuda":
        if not HAS_GPU:
            pytest.skip("needs a CUDA GPU")
        if not backends.cuda_kernels_built():
            pytest.skip("dtkernels was built without CUDA kernels")
    if name == "triton":
        if not backends.triton_installed():
            pytest.skip("triton is not installed")
        if not HAS_GPU and not INTERPRET:
            pytest.skip("Triton runs on a GPU or under TRITON_INTERPRET=1 (make test runs both)")
    if name == "cpu" and os.environ.get("DTK_GPU_ONLY") == "1":
        pytest.skip("DTK_GPU_ONLY=1")


def device_for(name: str) -> torch.device:
    if name == "cuda" or (name == "triton" and HAS_GPU):
        return torch.device("cuda")
    if name == "reference" and HAS_GPU and os.environ.get("DTK_GPU_ONLY") == "1":
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(params=["auto", "reference"])
def check_path(request):
    """Argument checks run in C++ on the native path ("auto" on CPU tensors) and in
    Python on every other: both must raise the same errors."""
    with dtk.use_backend(request.param):
        yield request.param


@pytest.fixture(params=backend_params())
def backend(request):
    """(name, device): runs the test body under dtk.use_backend(name)."""
    name = request.param
    skip_unless_runs(name)
    with dtk.use_backend(name):
        yield name, device_for(name)


def dtypes_for(name: str):
    """dtypes a backend claims on its device: float64 on the CPU only; the Triton
    interpreter has no bfloat16."""
    ds = [torch.float32, torch.float16, torch.bfloat16]
    if device_for(name).type == "cpu":
        ds.append(torch.float64)
    if name == "triton" and INTERPRET and not HAS_GPU:
        ds.remove(torch.bfloat16)
    return ds


_SHORT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}


@pytest.fixture(params=[pytest.param((n, d), marks=p.marks, id=f"{n}-{_SHORT[d]}")
                        for p in backend_params() for n in p.values for d in dtypes_for(n)])
def backend_dtype(request):
    """(name, device, dtype) for every dtype each backend claims."""
    name, dtype = request.param
    skip_unless_runs(name)
    with dtk.use_backend(name):
        yield name, device_for(name), dtype


@pytest.fixture(autouse=True)
def _poison_outputs():
    with dtk.testing.poison_outputs():
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def same_bits(a, b):
    """Equal values, NaN payloads included, whatever the layouts."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def same_bits_but_nan_payload(a, b):
    """NaN where the other has NaN, every other element bit for bit (-0.0 included)."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and same_bits(a.masked_fill(nan, 0), b.masked_fill(nan, 0))


def ran_kernels(fn, *args):
    """fn(*args) and the names of the CUDA kernels it launched."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn(*args)
        torch.cuda.synchronize()
    return out, " ".join(e.key for e in prof.key_averages())


def assert_cuda_matches_cpu(fn, args_list, kernel=""):
    """fn on CUDA gives the CPU kernel's bits and strides on every call in args_list
    (the CUDA kernels compute in the CPU kernels' order), NaN payloads aside: a 16-bit
    NaN that passes through float comes back as the canonical NaN on the device (as
    from ATen's CUDA kernels) but keeps its payload on the host (H100 run at cca07de).
    On the first call, when `kernel` is named, that kernel is the one that ran."""
    for n, args in enumerate(args_list):
        if n == 0 and kernel:
            got, ran = ran_kernels(fn, *args)
            assert kernel in ran, ran
        else:
            got = fn(*args)
        want = fn(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        where = f"call {n}: {[getattr(a, 'shape', a) for a in args]}"
        for a, b in zip(got, want):
            assert same_bits_but_nan_payload(a.cpu(), b) and a.stride() == b.stride(), where
