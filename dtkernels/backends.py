"""The backend registry: which kernel serves each operator on each backend.

Every public operator (``torch.ops.dtkernels.<op>``) is registered here once with
its kernels: the native op (C++ on CPU tensors, CUDA C++ on CUDA tensors), the
Triton launcher, and the pure-PyTorch reference. The public op's own CPU/CUDA
kernel (C++, csrc/ops/<op>.cpp) calls the native op directly when the backend
resolves to it, so that path never enters Python; otherwise it calls the op's
Python twin ``_<op>_py``, whose kernel registered here asks this registry for the
kernel of the current backend (and raises when that backend cannot run).

The current backend is process-wide (like ``torch.backends`` flags) and lives in
the C++ library, which routes by it: set it with ``use_backend(name)`` (a context
manager) or the ``DTKERNELS_BACKEND`` variable.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from . import _C

# The order is the C++ backend codes' (csrc/dispatch.h).
BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
_UNKNOWN = -1

# An unknown name in DTKERNELS_BACKEND is reported at the first op, not at import.
_env = os.environ.get("DTKERNELS_BACKEND", "auto").strip().lower() or "auto"
_C._set_backend(BACKENDS.index(_env) if _env in BACKENDS else _UNKNOWN)


def _set(name: str) -> None:
    _C._set_backend(BACKENDS.index(name) if name in BACKENDS else _UNKNOWN)


def _get() -> str:
    code = _C._backend()
    return BACKENDS[code] if code >= 0 else _env


@dataclass(frozen=True)
class OpKernels:
    native: str | None  # name in torch.ops.dtkernels; serves "cpu" and "cuda"
    triton: str | None  # "module:function" in dtkernels.triton, imported on first use
    reference: Callable | None
    auto_cuda: tuple[str, ...]  # what "auto" tries on CUDA tensors, fastest first


_REGISTRY: dict[str, OpKernels] = {}


def register(op: str, *, native: str | None = None, triton: str | None = None,
             reference: Callable | None = None, auto_cuda: tuple[str, ...] = ("cuda", "triton"),
             check: Callable | None = None) -> None:
    """Registers the kernels of public op ``dtkernels::<op>``, and the CPU/CUDA kernel
    of its Python twin ``_<op>_py``, which the public op calls for any backend but
    its native kernel.

    ``check(*args)`` validates the op's arguments before any kernel runs (the fake
    kernel should call it too, so torch.compile reports bad input at trace time).
    ``auto_cuda`` is the order "auto" tries on CUDA tensors: set it from the GPU
    benchmarks (benchmarks/results/), fastest first.
    """
    if op in _REGISTRY:
        raise RuntimeError(f"dtkernels: op {op!r} registered twice")
    _REGISTRY[op] = OpKernels(native, triton, reference, tuple(auto_cuda))
    # "auto" on CUDA tensors: the C++ route takes the native kernel when it comes first.
    _C._set_auto_cuda_native(op, bool(auto_cuda) and auto_cuda[0] == "cuda")
    schema = getattr(torch.ops.dtkernels, f"_{op}_py").default._schema
    n_args = len(schema.arguments)
    defaults = [a.default_value for a in schema.arguments]

    def impl(*args):
        # The C++ route passes the full schema, positionally, less the trailing
        # arguments equal to their defaults (the dispatcher leaves those out).
        assert len(args) <= n_args, (op, args)
        args = args + tuple(defaults[len(args):])
        if check is not None:
            check(*args)
        device = _device_of(args)
        fn, name = _kernel(op, device)
        # Native CUDA kernels guard the device themselves; Triton launches on the
        # current device, so it needs the tensors' device to be current.
        if name == "triton" and device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return fn(*args)
        return fn(*args)

    impl.__name__ = f"{op}_dispatch"
    torch.library.register_kernel(f"dtkernels::_{op}_py", ("cpu", "cuda"), impl)


def _device_of(args) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)):
            for t in a:
                if isinstance(t, torch.Tensor):
                    return t.device
    raise RuntimeError("dtkernels: an operator was called without tensor arguments")


# --- what this build and machine can run -------------------------------------------

@functools.lru_cache(maxsize=None)
def cuda_kernels_built() -> bool:
    from . import _C

    return bool(_C.build_info()["cuda"])


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends() -> tuple[str, ...]:
    """The backends this build and machine can run (besides "auto")."""
    out = ["cpu"]
    if cuda_kernels_built() and torch.cuda.is_available():
        out.append("cuda")
    if triton_installed() and (torch.cuda.is_available() or triton_interpreting()):
        out.append("triton")
    out.append("reference")
    return tuple(out)


def _why_unavailable(name: str) -> str:
    if name == "cuda":
        if not cuda_kernels_built():
            return ("dtkernels was built without its CUDA kernels (build with a CUDA-enabled torch "
                    "and nvcc on PATH, or FORCE_CUDA=1)")
        return "no CUDA device is available"
    if name == "triton":
        if not triton_installed():
            return "triton is not installed (pip install triton)"
        return ("there is no CUDA device; to run Triton kernels on CPU tensors set "
                "TRITON_INTERPRET=1 before importing triton")
    return "it is not available"


def _validate(name: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"dtkernels: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    name = name.strip().lower()
    if name != "auto" and name not in available_backends():
        raise RuntimeError(f"dtkernels: backend {name!r} cannot run here: {_why_unavailable(name)}")
    return name


def get_backend() -> str:
    """The backend ops use now ("auto" unless set)."""
    return _get()


class use_backend(contextlib.ContextDecorator):
    """Context manager (or decorator) that makes dtkernels ops use backend ``name``.

    "auto": CPU tensors use the C++ kernels, CUDA tensors whichever of CUDA C++ and
    Triton the benchmarks showed faster for the op. "cpu", "cuda", "triton" and
    "reference" force one kernel family; asking for one that cannot run here is an
    error, never a silent fallback.
    """

    def __init__(self, name: str):
        self.name = _validate(name)
        self._prev: list[str] = []

    def __enter__(self):
        self._prev.append(_get())
        _set(self.name)
        return self

    def __exit__(self, *exc):
        _set(self._prev.pop())
        return False


@contextlib.contextmanager
def _scope(name: str) -> Iterator[None]:
    """Restores a backend already validated (backward runs with the forward's)."""
    prev = _get()
    _set(name)
    try:
        yield
    finally:
        _set(prev)


# --- choosing a kernel ----------------------------------------------------------------

def _resolve(op: str, device: torch.device) -> str:
    name = _get()
    if name not in BACKENDS:  # a bad DTKERNELS_BACKEND surfaces at the first op
        name = _validate(name)
    if name != "auto":
        return name
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        k = _REGISTRY[op]
        avail = available_backends()
        for cand in k.auto_cuda:
            if cand in avail and getattr(k, "native" if cand == "cuda" else cand) is not None:
                return cand
    return "reference"


# (op, backend setting, device type, interpreter on) -> (kernel, backend): the
# per-call lookup is a dict hit; only failures take the slow path (and raise).
_KERNELS: dict[tuple, tuple[Callable, str]] = {}


def kernel(op: str, device: torch.device) -> Callable:
    """The kernel that runs ``op`` on tensors of ``device`` under the current backend."""
    return _kernel(op, device)[0]


def _kernel(op: str, device: torch.device) -> tuple[Callable, str]:
    key = (op, _C._backend(), device.type, triton_interpreting() if device.type == "cpu" else False)
    hit = _KERNELS.get(key)
    if hit is None:
        hit = _KERNELS[key] = _lookup(op, device)
    return hit


def _lookup(op: str, device: torch.device) -> tuple[Callable, str]:
    k = _REGISTRY[op]
    name = _resolve(op, device)
    if name == "cpu" and device.type != "cpu":
        raise RuntimeError(f"dtkernels: backend 'cpu' runs CPU tensors only, got a tensor on {device}")
    if name == "cuda" and device.type != "cuda":
        raise RuntimeError(f"dtkernels: backend 'cuda' runs CUDA tensors only, got a tensor on {device}")
    if name in ("cuda", "triton") and name not in available_backends():
        raise RuntimeError(f"dtkernels: backend {name!r} cannot run here: {_why_unavailable(name)}")
    if name == "triton" and device.type == "cpu" and not triton_interpreting():
        raise RuntimeError("dtkernels: backend 'triton' runs CPU tensors only under the Triton "
                           "interpreter (set TRITON_INTERPRET=1 before importing triton)")
    if name in ("cpu", "cuda"):
        if k.native is None:
            raise NotImplementedError(f"dtkernels: {op} has no native ({name}) kernel")
        return getattr(torch.ops.dtkernels, k.native).default, name
    if name == "triton":
        if k.triton is None:
            raise NotImplementedError(f"dtkernels: {op} has no Triton kernel")
        return _triton_kernel(k.triton), name
    if k.reference is None:
        raise NotImplementedError(f"dtkernels: {op} has no reference kernel")
    return k.reference, name


@functools.lru_cache(maxsize=None)
def _triton_kernel(spec: str) -> Callable:
    module, fn = spec.split(":")
    return getattr(importlib.import_module(f"dtkernels.triton.{module}"), fn)
