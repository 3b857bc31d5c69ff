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
