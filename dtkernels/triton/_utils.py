"""Helpers shared by the Triton launchers."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..ops._common import poisoned

# Read when the kernels are defined, as triton.jit itself does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# DTK_TRITON_AUTOTUNE=0 keeps only the first config of each list: the GPU test run
# uses it so that correctness checks do not spend minutes autotuning every shape.
AUTOTUNE = os.environ.get("DTK_TRITON_AUTOTUNE", "1") != "0"


def configs(full: list, interpreted: list | None = None) -> list:
    """Autotune configs: the full list on a GPU (first = the safe default), one
    small config under the interpreter (each config would run, slowly, on the CPU)."""
    if INTERPRET:
        return interpreted if interpreted is not None else full[:1]
    return full if AUTOTUNE else full[:1]


class _Tuned:
    """An autotuned kernel whose launches skip the autotuner once it has chosen.

    triton.autotune's wrapper rebuilds its key from every argument on each launch
    (dicts of all arguments, each tensor's dtype as a string, the config's
    keywords): ~10 µs of host time per launch on the 2-core CPU machine, about as much
    as Triton's own JIT launch path (benchmarks/results/cpu-triton-host-20261128.md).
    Here the first launch with a key goes through the autotuner, which benchmarks
    and picks a config as before; later launches with that key hand the picked
    config straight to the JIT function, as the autotuner itself does. Which config
    runs never changes a result, only its speed.
    """

    def __init__(self, autotuner):
        # the autotuner runs a config's pre_hook on every launch: those need it
        if any(c.pre_hook is not None for c in autotuner.configs):
            raise ValueError("dtkernels autotune: configs with a pre_hook need triton.autotune itself")
        self.autotuner = autotuner
        self.fn = autotuner.fn  # the JITFunction, as for Triton's wrappers
        names = autotuner.arg_names
        # the autotuner's key: its key arguments' values, then the tensors' dtypes
        self._key_args = tuple((names.index(k), k) for k in autotuner.keys)
        self._picked: dict[tuple, dict] = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _key(self, args, kwargs) -> tuple:
        n = len(args)
        return (tuple(args[i] if i < n else kwargs[k] for i, k in self._key_args)
                + tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))

    def picked(self, *args, **kwargs) -> dict | None:
        """The config (keywords) picked for a launch with these arguments, if any yet."""
        return self._picked.get(self._key(args, kwargs))

    def _launch(self, grid, args, kwargs):
        key = self._key(args, kwargs)
        picked = self._picked.get(key)
        if picked is None:
            self.autotuner[grid](*args, **kwargs)
            self._picked[key] = self.autotuner.best_config.all_kwargs()
        else:
            self.fn.run(*args, grid=grid, warmup=False, **kwargs, **picked)


def autotune(configs: list, key: list):
    """triton.autotune, with launches that skip the autotuner's per-launch work once
    it has picked a config for the key (_Tuned)."""
    return lambda fn: _Tuned(triton.autotune(configs=configs, key=key)(fn))


def new_empty_like(like: torch.Tensor, **kw) -> torch.Tensor:
    """torch.empty_like, poisoned in debug mode like the native kernels' outputs."""
    return poisoned(torch.empty_like(like, **kw))


def new_empty(*sizes, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    return poisoned(torch.empty(*sizes, dtype=dtype, device=device, memory_format=memory_format))


def as_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy of it laid out like the dense tensor `like` when its strides
    differ. NCHW and channels_last pairs never copy; odd views do."""
    if t.shape == like.shape and t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


# Host helpers in plain Python: triton.cdiv and triton.next_power_of_2 are
# ConstexprFunctions, ~2.5 us a call from Python on this CPU (5 us under a profiler),
# and the launchers call them on every launch.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_columns(n: int, cap: int) -> int:
    """The smallest power of two >= n (at least 1), at most cap: a tile's column count."""
    return min(1 << max(n - 1, 0).bit_length(), cap)


def column_tiles(cols: int, block: int, op: str, what: str) -> int:
    """The grid's second axis: CUDA allows at most 65535 there, so more is a clear
    error here rather than a failed launch."""
    tiles = cdiv(cols, block)
    if tiles > 65535:
        raise RuntimeError(f"{op} (triton): {what} of more than {65535 * block} elements are not supported, "
                           f"got {cols}")
    return tiles


def is_fp64(t: torch.Tensor) -> bool:
    return t.dtype == torch.float64


def align_corners_scale(n_in: int, n_out: int, fp64: bool) -> float:
    """ATen's align_corners scale (n_in - 1) / (n_out - 1) in the compute type (0 for
    one output), divided on the host: a device division may not round correctly."""
    if n_out <= 1:
        return 0.0
    t = torch.float64 if fp64 else torch.float32
    return (torch.tensor(n_in - 1, dtype=t) / torch.tensor(n_out - 1, dtype=t)).item()


@triton.jit
def linear_source(d, n_in, S: tl.constexpr, FP64: tl.constexpr, ALIGN: tl.constexpr, scale):
    """Bilinear source indices and weights of output index `d` at integer scale S,
    as ATen's CPU kernel and csrc/common.h linear_source compute them: without
    align_corners scale = 1/S rounded to the compute type, one fused multiply-add,
    clamped at 0; with it src = d * scale (`scale` from align_corners_scale, used
    for float32; an fma with 0, so no compiler can fuse it into the subtraction
    below). S == 1 maps each index onto itself with weights (1, 0)."""
    if S == 1:
        i0 = d
        i1 = d
        l1 = tl.zeros(d.shape, tl.float64 if FP64 else tl.float32)
        l0 = l1 + 1.0
    else:
        if ALIGN:
            if FP64:  # (n_in - 1) / (S * n_in - 1) here: the interpreter (float64's only
                # Triton use) would round a float argument to fp32; numpy divides exactly
                sc = (n_in - 1).to(tl.float64) / (n_in * S - 1).to(tl.float64)
                src = tl.fma(d.to(tl.float64), sc, 0.0)
            else:
                src = tl.fma(d.to(tl.float32), tl.cast(scale, tl.float32), 0.0)
        elif FP64:
            src = tl.fma(tl.full(d.shape, 1.0, tl.float64) / S, d.to(tl.float64) + 0.5, -0.5)
        else:
            src = tl.fma(tl.full(d.shape, 1.0 / S, tl.float32), d.to(tl.float32) + 0.5, -0.5)
        src = tl.maximum(src, 0.0)
        i0 = tl.minimum(tl.floor(src).to(d.dtype), n_in - 1)
        l1 = tl.minimum(tl.maximum(src - i0.to(src.dtype), 0.0), 1.0)
        l0 = 1.0 - l1
        i1 = tl.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, l0, l1
