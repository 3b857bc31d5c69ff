"""Helpers shared by the Triton launchers."""
from __future__ import annotations

import os

import torch
import triton

# Read when the kernels are defined, as triton.jit itself does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# DTK_TRITON_AUTOTUNE=0: one config, no tuning (the test suite checks results, not
# speed, and kernels with constexpr geometry would otherwise compile every config).
AUTOTUNE = os.environ.get("DTK_TRITON_AUTOTUNE", "1") != "0"


def configs(full: list, interpreted: list | None = None) -> list:
    """Autotune configs: the full list on a GPU, one small config under the
    interpreter (every config would be run, slowly, on the CPU) or without tuning."""
    if INTERPRET or not AUTOTUNE:
        return interpreted if interpreted is not None else full[:1]
    return full


def poisoning() -> bool:
    from .. import _C

    return _C._poison()


def new_empty_like(like: torch.Tensor, **kw) -> torch.Tensor:
    """torch.empty_like, poisoned in debug mode like the native kernels' outputs."""
    t = torch.empty_like(like, **kw)
    if poisoning() and t.numel():
        t.fill_(float("nan") if t.is_floating_point() else -77)
    return t


def new_empty(*sizes, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    t = torch.empty(*sizes, dtype=dtype, device=device, memory_format=memory_format)
    if poisoning() and t.numel():
        t.fill_(float("nan") if t.is_floating_point() else -77)
    return t


def as_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy of it laid out like the dense tensor `like` when its strides
    differ. NCHW and channels_last pairs never copy; odd views do."""
    if t.shape == like.shape and t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


def is_fp64(t: torch.Tensor) -> bool:
    return t.dtype == torch.float64
