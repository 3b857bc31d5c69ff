"""What this copy of dtkernels was built with, and what it can run here."""
from __future__ import annotations

import importlib.util
import platform

import torch

try:
    from ._build_config import BUILD_CONFIG
except ImportError:  # built by something other than setup.py
    BUILD_CONFIG = {"version": "unknown"}

VERSION = BUILD_CONFIG.get("version", "unknown")


def _triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        import triton

        return triton.__version__
    except Exception as e:  # importable spec but broken install
        return f"fails to import: {e}"


def build_info() -> dict:
    """How the native library was built (compiler, OpenMP, CUDA and archs, the torch
    it was built against) and what this process can use (torch, Triton, backends)."""
    from . import _C
    from .backends import available_backends

    info = {"version": VERSION}
    info.update({k: v for k, v in BUILD_CONFIG.items() if k != "version"})
    info.update(_C.build_info())
    info["torch_runtime"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    info["triton"] = _triton_version()
    info["torch_threads"] = torch.get_num_threads()
    info["machine"] = platform.machine()
    info["available_backends"] = list(available_backends())
    info["ops"] = sorted({n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                          if n.startswith("dtkernels::")})
    return info
