"""Argument checks and small helpers shared by the public ops."""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from .. import _C

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def check_same(op: str, an: str, a: Tensor, bn: str, b: Tensor, *, shape: bool = True) -> None:
    if shape and a.shape != b.shape:
        raise ValueError(f"{op}: {an} and {bn} must have the same shape, got "
                         f"{list(a.shape)} and {list(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"{op}: {an} and {bn} must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise RuntimeError(f"{op}: {an} and {bn} must be on the same device, got {a.device} and {b.device}")


def check_activation(op: str, activation) -> bool:
    """True for "relu", False for None; anything else is a ValueError."""
    if activation is None:
        return False
    if activation == "relu":
        return True
    raise ValueError(f"{op}: activation must be None or 'relu', got {activation!r}")


def check_real(op: str, name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{op}: {name} must be a real number, got {type(v).__name__}")
    return float(v)


def unboxed_ok(a: Tensor, b: Tensor | None = None) -> bool:
    """Whether a public op may be called as _C._unboxed_<op> (csrc/unboxed.h), which
    saves torch.ops' ~2 us of argument boxing: not while torch.compile traces (it
    needs the schema and SymInts), only for plain tensors (a subclass's
    __torch_function__ must see the op) and not under a torch-function mode."""
    return (not torch.compiler.is_compiling() and type(a) is Tensor and (b is None or type(b) is Tensor)
            and not torch._C._is_torch_function_mode_enabled())


def transform_active() -> bool:
    """Whether a torch.func transform (grad, vjp, jvp, vmap, jacrev, ...) or a
    forward-mode AD level is active. The ops' C++ autograd supports neither
    (csrc/autograd.h), so the public functions then run their ATen decomposition:
    eager PyTorch's own results, with every transform (and no speed-up)."""
    return not _is_compiling() and (_peek_interpreter_stack() is not None or _forward_ad._current_level >= 0)


# bound once: every public call asks (~0.1 us). Not while dynamo traces: there the
# stack query is a graph value, "not None" even in a plain compiled function.
_is_compiling = torch.compiler.is_compiling
_peek_interpreter_stack = torch._C._functorch.peek_interpreter_stack


def like(result: Tensor, layout_of: Tensor) -> Tensor:
    """`result` in the layout the native kernels give (torch.empty_like(layout_of)):
    the reference backend must agree with the fake kernel's strides."""
    out = torch.empty_like(layout_of, dtype=result.dtype)
    return out.copy_(result)


UPSAMPLE_MODES = (None, "nearest", "bilinear")

# torch.export decompositions: each public op (and backward op with an ATen
# reference) as the ATen ops it replaces, so an exported program can be lowered
# to ATen alone (ONNX, runtimes that cannot load this library). dtkernels.decompositions().
DECOMPOSITIONS: dict = {}


def decomposition(name: str):
    def register(fn):
        DECOMPOSITIONS[getattr(torch.ops.dtkernels, name).default] = fn
        return fn
    return register


def check_upsample(op: str, upsample) -> None:
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f"{op}: upsample must be None, 'nearest' or 'bilinear', got {upsample!r}")


def check_align_corners(op: str, upsample, align_corners) -> bool:
    """A bool (None as False, F.interpolate's default), True only with bilinear."""
    if align_corners is None:
        return False
    if not isinstance(align_corners, bool):
        raise TypeError(f"{op}: align_corners must be a bool, got {type(align_corners).__name__}")
    if align_corners and upsample != "bilinear":
        raise ValueError(f"{op}: align_corners=True needs upsample='bilinear' (as F.interpolate, only interpolating "
                         "modes take it)")
    return align_corners


def check_scale_factor(op: str, v) -> int:
    """A positive integer (an integral float such as 2.0 is accepted)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise TypeError(f"{op}: scale_factor must be a positive integer, got {v!r}")
    if v < 1:
        raise ValueError(f"{op}: scale_factor must be a positive integer, got {v!r}")
    return int(v)


def _strides_like_channels_last(sizes, strides) -> bool:
    """ATen's is_channels_last_strides_2d for a 4-D tensor: strides ascending in the
    order C, W, H, N, with its tie rules for size-1 dimensions (unrolled: it runs on
    every max_pool2d call)."""
    n, c, h, w = sizes
    sn, sc, sh, sw = strides
    if sc == 0 or n == 0 or c == 0 or h == 0 or w == 0:
        return False
    # ATen multiplies by sizes > 1 only: the same here, as size 0 returned above
    m = sc * c
    if sw < m:
        return False
    m = sw * w
    if sh < m:
        return False
    m = sh * h
    return sn >= m and m != sc


def suggest_memory_format(t: Tensor) -> torch.memory_format:
    """ATen's Tensor::suggest_memory_format (the fake kernels must agree with C++).
    4-D strided tensors are decided here: torch._prims_common's version costs ~3 us
    a call, as much as a small max_pool2d's kernel."""
    if t.dim() == 4 and t.layout == torch.strided:
        return torch.channels_last if _strides_like_channels_last(t.shape, t.stride()) else torch.contiguous_format
    from torch._prims_common import suggest_memory_format

    return suggest_memory_format(t)


def cat_memory_format(a: Tensor, b: Tensor) -> torch.memory_format:
    """torch.cat's output format: channels_last only when both inputs suggest it."""
    fa, fb = suggest_memory_format(a), suggest_memory_format(b)
    return fa if fa == fb else torch.contiguous_format


def empty_in(shape, like: Tensor, memory_format: torch.memory_format, dtype: torch.dtype | None = None) -> Tensor:
    """torch.empty on like's device (in like's dtype unless given), in memory_format."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=memory_format)


def poisoned(t: Tensor) -> Tensor:
    """`t`, filled with NaN (-77 for integers) when the test suite poisons outputs, as
    the native kernels' new_empty does: the one switch for Python-allocated outputs."""
    if _C._poison() and t.numel():
        t.fill_(float("nan") if t.is_floating_point() else -77)
    return t


def new_empty_poisoned(shape, like: Tensor, memory_format: torch.memory_format) -> Tensor:
    """empty_in, poisoned in debug mode: for Python-composed ops whose every element
    must be written."""
    return poisoned(empty_in(shape, like, memory_format))


def int_pair(op: str, name: str, v, *, omitted_ok: bool = False, wording: str = "must either be") -> tuple | None:
    """torch.nn.functional's int-or-pair argument as a pair of ints (one int, or a
    sequence of one or two). None or an empty sequence gives None when omitted_ok."""
    # the common cases first: this runs on every call
    if type(v) is int:
        return v, v
    if type(v) is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return v
    if omitted_ok and (v is None or (isinstance(v, (tuple, list)) and len(v) == 0)):
        return None
    if isinstance(v, bool) or not isinstance(v, (int, tuple, list, torch.Size)):
        raise TypeError(f"{op}: {name} must be an int or a tuple of ints, got {type(v).__name__}")
    if isinstance(v, int):
        return v, v
    if any(isinstance(e, bool) or not isinstance(e, int) for e in v):
        raise TypeError(f"{op}: {name} must be an int or a tuple of ints, got {v!r}")
    if len(v) not in (1, 2):
        omit = "omitted, " if omitted_ok else ""
        raise RuntimeError(f"{op}: {name} {wording} {omit}a single int, or a tuple of two ints")
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])
