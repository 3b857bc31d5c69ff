"""max_pool2d against dtkernels.reference (and ATen itself on the CPU) on every backend
that runs here. Max is exact, so forward results must match bit for bit."""
from __future__ import annotations

import importlib
import random

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dtkernels as dtk
from dtkernels import reference as ref
from dtkernels.testing import OpLog, assert_close, rand

from conftest import INTERPRET, assert_cuda_matches_cpu, device_for, same_bits, skip_unless_runs

mp = importlib.import_module("dtkernels.ops.max_pool2d")  # the module (dtk.ops.max_pool2d is the function)
CL = torch.channels_last
NAN, INF = float("nan"), float("inf")

# (kernel_size, stride, padding, dilation, ceil_mode): int and pair arguments, default
# stride, padding, dilation, ceil_mode, overlapping and gapped windows.
CASES = [
    pytest.param((2, None, 0, 1, False), id="k2"),
    pytest.param((2, 2, 0, 1, True), id="k2-ceil"),
    pytest.param((3, 2, 1, 1, False), id="k3s2p1"),
    pytest.param((3, 1, 1, 1, False), id="k3s1p1"),
    pytest.param(((2, 3), (1, 2), (1, 0), (2, 1), False), id="pairs-dil"),
    pytest.param((3, 2, 0, 1, True), id="k3s2-ceil"),
    pytest.param(((3, 2), (2, 3), (1, 1), (1, 2), True), id="pairs-dil-ceil"),
    pytest.param((2, 3, 1, 1, True), id="k2s3p1-gaps"),
    pytest.param((1, 1, 0, 1, False), id="k1"),
]
# odd shapes; a 3-D (unbatched) one; W and C wide enough for the CPU kernels' vector
# blocks (channels_last with C >= 32 reads taps in place, fewer channels are split)
SHAPES = [(2, 3, 9, 11), (1, 5, 7, 37), (1, 40, 6, 9), (3, 13, 10)]
if INTERPRET:
    SHAPES = SHAPES[:1] + SHAPES[3:]
LAYOUTS = [pytest.param(s, f, id="x".join(map(str, s)) + ("-cl" if f else ""))
           for s in SHAPES for f in ([None, CL] if len(s) == 4 else [None])]


def _data(shape, dtype, device, memory_format=None, specials=True, seed=0):
    """Small integers (many ties), some NaN and -inf: every semantic corner at once."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, shape, generator=g).float()
    if specials:
        x[torch.rand(shape, generator=g) < 0.04] = NAN
        x[torch.rand(shape, generator=g) < 0.04] = -INF
    x = x.to(dtype=dtype, device=device)
    return x.contiguous(memory_format=memory_format) if memory_format else x


def _grad_ref(x, g, args, ceil_mode):
    xr = x.detach().double().requires_grad_()
    out = ref.max_pool2d(xr, *args, ceil_mode=ceil_mode)
    (gi,) = torch.autograd.grad(out, xr, g.double())
    return gi


def _same(actual, expected):  # exact, NaN == NaN
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("shape,memory_format", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_forward_backward(backend_dtype, case, shape, memory_format):
    _, device, dtype = backend_dtype
    *args, ceil_mode = case
    x = _data(shape, dtype, device, memory_format).requires_grad_()
    out, idx = dtk.max_pool2d(x, *args, ceil_mode=ceil_mode, return_indices=True)
    r_out, r_idx = ref.max_pool2d(x.detach(), *args, ceil_mode=ceil_mode, return_indices=True)
    assert out.dtype == dtype and idx.dtype == torch.int64 and out.shape == r_out.shape
    _same(out, r_out)
    assert torch.equal(idx, r_idx)
    if memory_format is CL:
        assert out.is_contiguous(memory_format=CL) and idx.is_contiguous(memory_format=CL)
    g = rand(*out.shape, dtype=dtype, device=device)
    (gi,) = torch.autograd.grad(out, x, g)
    assert gi.shape == x.shape and gi.stride() == x.stride(), "grad keeps the input's layout"
    assert_close(gi, _grad_ref(x, g, args, ceil_mode), dtype=dtype)


def _valid_cases(n, seed, draw):
    """n argument sets (shape, k, s, p, d, ceil_mode) that F.max_pool2d accepts, each
    drawn by draw(rng) -> (shape, k, s, p, d)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        shape, k, s, p, d = draw(rng)
        cm = rng.random() < 0.5
        try:
            F.max_pool2d(torch.zeros(shape), k, s, p, d, cm)
        except RuntimeError:
            continue
        out.append((shape, k, s, p, d, cm))
    return out


def _aten_cases(n, seed):
    def draw(rng):
        k = (rng.randint(1, 4), rng.randint(1, 4))
        d = (rng.randint(1, 3), rng.randint(1, 3))
        s = (rng.randint(1, 4), rng.randint(1, 4))
        p = (rng.randint(0, k[0] // 2), rng.randint(0, k[1] // 2))
        shape = (rng.randint(1, 2), rng.choice([1, 2, 3, 4, 33]), rng.randint(1, 12), rng.randint(1, 19))
        return shape, k, s, p, d
    return _valid_cases(n, seed, draw)


def _has_empty_window(shape, k, s, p, d, out_hw):
    """Windows with no tap inside the input (ATen's backward writes out of bounds there)."""
    def dim(i):
        return all(any(0 <= o * s[i] - p[i] + t * d[i] < shape[2 + i] for t in range(k[i])) for o in range(out_hw[i]))
    return not (dim(0) and dim(1))


@pytest.mark.parametrize("memory_format", [None, CL], ids=["nchw", "cl"])
def test_random_configs_match_aten(backend, memory_format):
    """Random geometry (ceil_mode, padding, dilation, odd sizes, ties, NaN, -inf) against
    F.max_pool2d itself: values and indices bit-exact; float32 gradients bit-exact too
    where ATen's backward is defined (it sums in the same order)."""
    _, device = backend
    few = INTERPRET or backend[0] == "triton"  # each geometry is a Triton compile
    for n, (shape, k, s, p, d, cm) in enumerate(_aten_cases(8 if few else 60, seed=1)):
        x = _data(shape, torch.float32, "cpu", memory_format, seed=n)
        a_out, a_idx = F.max_pool2d(x, k, s, p, d, cm, return_indices=True)
        xd = x.detach().to(device).requires_grad_()
        out, idx = dtk.max_pool2d(xd, k, s, p, d, cm, return_indices=True)
        msg = f"case {shape} k={k} s={s} p={p} d={d} ceil={cm}"
        _same(out.cpu(), a_out)
        assert torch.equal(idx.cpu(), a_idx), msg
        assert out.stride() == a_out.stride(), msg
        if _has_empty_window(shape, k, s, p, d, a_out.shape[-2:]):
            continue
        g = rand(*out.shape, generator=torch.Generator().manual_seed(n))
        xa = x.detach().clone().requires_grad_()
        (a_gi,) = torch.autograd.grad(F.max_pool2d(xa, k, s, p, d, cm), xa, g)
        (gi,) = torch.autograd.grad(out, xd, g.to(device))
        assert gi.stride() == a_gi.stride(), msg
        if backend[0] == "triton" and device.type == "cpu":
            assert_close(gi.cpu(), a_gi, msg=msg)  # the interpreter's float sums
        else:
            assert torch.equal(gi.cpu(), a_gi), msg


def test_reference_is_aten():
    """The oracle reproduces ATen's CPU kernel in both memory formats and every dtype."""
    for n, (shape, k, s, p, d, cm) in enumerate(_aten_cases(80, seed=2)):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            for fmt in (None, CL):
                x = _data(shape, dtype, "cpu", fmt, seed=n)
                a_out, a_idx = F.max_pool2d(x, k, s, p, d, cm, return_indices=True)
                r_out, r_idx = ref.max_pool2d(x, k, s, p, d, cm, return_indices=True)
                _same(r_out, a_out)
                assert torch.equal(r_idx, a_idx), (shape, k, s, p, d, cm, dtype, fmt)


def _pool(x, *args, fmt=None, **kw):
    """Pools a (H, W) pattern laid out as 2 images x 3 channels in format `fmt`."""
    x4 = x.expand(2, 3, *x.shape).contiguous(memory_format=fmt or torch.contiguous_format)
    return dtk.max_pool2d(x4, *args, return_indices=True, **kw)


@pytest.mark.sanitize
@pytest.mark.parametrize("memory_format", [None, CL], ids=["nchw", "cl"])
def test_semantics_pinned(backend_dtype, memory_format):
    """ATen's answers in the corners, spelled out (hand-built inputs, expected values
    written down, and checked against F.max_pool2d on the CPU)."""
    _, device, dtype = backend_dtype

    def check(x, args, kw, values, indices):
        x = torch.tensor(x, dtype=dtype, device=device)
        out, idx = _pool(x, *args, fmt=memory_format, **kw)
        exp_v = torch.tensor(values, dtype=dtype).expand(2, 3, *torch.tensor(values).shape)
        exp_i = torch.tensor(indices).expand(2, 3, *torch.tensor(indices).shape)
        _same(out.cpu(), exp_v)
        assert torch.equal(idx.cpu(), exp_i), (x, args, kw, idx[0, 0])
        a_out, a_idx = F.max_pool2d(x.cpu().float().expand(2, 3, *x.shape), *args, return_indices=True, **kw)
        _same(a_out.to(dtype), exp_v)
        assert torch.equal(a_idx, exp_i), "the expectation is ATen's"

    # NaN wins, and the index is the *last* NaN's in scan order
    check([[1.0, NAN, 3.0, NAN]], [(1, 4)], {}, [[NAN]], [[3]])
    check([[NAN, 1.0], [NAN, NAN]], [2], {}, [[NAN]], [[3]])
    check([[-INF, NAN], [-INF, 5.0]], [2], {}, [[NAN]], [[1]])
    # ties keep the first maximum in row-major scan order (not column-major)
    check([[2.0, 1.0], [2.0, 2.0]], [2], {}, [[2.0]], [[0]])
    check([[1.0, 2.0], [2.0, 1.0]], [2], {}, [[2.0]], [[1]])
    # an all -inf window gives -inf and its first tap inside the input
    check([[-INF] * 3] * 3, [2], {"padding": 1}, [[-INF, -INF], [-INF, -INF]], [[0, 1], [3, 4]])
    # ceil_mode: a partial last window is kept, one starting in the right padding dropped
    x5 = [[float(5 * r + c) for c in range(5)] for r in range(5)]
    check(x5, [2, 2], {"ceil_mode": True}, [[6, 8, 9], [16, 18, 19], [21, 23, 24]],
          [[6, 8, 9], [16, 18, 19], [21, 23, 24]])
    check(x5, [2, 2, 1], {"ceil_mode": True}, [[0, 2, 4], [10, 12, 14], [20, 22, 24]],
          [[0, 2, 4], [10, 12, 14], [20, 22, 24]])  # 3x3, not 4x4


@pytest.mark.parametrize("memory_format", [None, CL], ids=["nchw", "cl"])
def test_window_outside_the_input(backend, memory_format):
    """H = W = 2, k=2, d=3, p=1: the only window's taps (-1 and 2) all miss the input.
    ATen gives -inf with index ih0*W + iw0 = 6 (out of range), and its backward writes
    out of bounds; ours keeps the forward and drops that window's gradient."""
    _, device = backend
    x = rand(2, 3, 2, 2, device=device, memory_format=memory_format, requires_grad=True)
    out, idx = dtk.max_pool2d(x, 2, 1, 1, 3, return_indices=True)
    assert out.shape == (2, 3, 1, 1) and bool((out == -INF).all()) and bool((idx == 6).all())
    a_out, a_idx = F.max_pool2d(x.detach().cpu(), 2, 1, 1, 3, return_indices=True)
    assert torch.equal(idx.cpu(), a_idx) and torch.equal(out.detach().cpu(), a_out)
    (gi,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.equal(gi, torch.zeros_like(gi))


@pytest.mark.sanitize
@pytest.mark.parametrize("case", ["slice", "transpose", "expanded", "cl-slice", "misaligned"])
def test_strided_inputs(backend, case):
    _, device = backend
    base = _data((4, 6, 10, 24), torch.float32, device, specials=False)
    if case == "slice":
        x = base[:, 1:5, ::2, 3:20]
    elif case == "transpose":
        x = base.transpose(2, 3)
    elif case == "expanded":
        x = base[:1].expand(3, -1, -1, -1)
    elif case == "cl-slice":  # channels_last strides, not dense: still pooled as channels_last
        x = base.contiguous(memory_format=CL)[..., ::2]
    else:  # dense, one element off 16-byte alignment
        x = torch.cat([base.flatten(), base.flatten()[:1]])[1:].view(base.shape).contiguous(memory_format=CL)
    x = x.detach().requires_grad_()
    out, idx = dtk.max_pool2d(x, 3, 2, 1, return_indices=True)
    r_out, r_idx = ref.max_pool2d(x.detach(), 3, 2, 1, return_indices=True)
    _same(out, r_out)
    assert torch.equal(idx, r_idx)
    a_out = F.max_pool2d(x.detach().cpu(), 3, 2, 1)
    assert out.stride() == a_out.stride(), "output format chosen as ATen's"
    g = rand(*out.shape, device=device).transpose(0, 1).contiguous().transpose(0, 1)  # odd-strided grad
    (gi,) = torch.autograd.grad(out, x, g)
    assert_close(gi, _grad_ref(x, g, (3, 2, 1), False), dtype=torch.float32)


@pytest.mark.parametrize("memory_format", [None, CL], ids=["nchw", "cl"])
def test_negative_zero_gradient_is_atens(backend, memory_format):
    """ATen adds each gradient into a zeroed input gradient, so a -0 gradient lands as
    +0: the same here, whether the backward adds or writes each element once."""
    _, device = backend
    for shape, args in [((2, 3, 6, 40), (2,)), ((1, 2, 14, 14), (2,)), ((2, 3, 9, 11), (3, 2, 1)),
                        ((1, 40, 8, 8), (2,))]:
        x = _data(shape, torch.float32, device, memory_format, specials=False).requires_grad_()
        out = dtk.max_pool2d(x, *args)
        (gi,) = torch.autograd.grad(out, x, torch.full_like(out, -0.0))
        assert not torch.signbit(gi).any(), (shape, args)


def test_memory_format_choice_is_atens():
    """The public op decides NCHW or channels_last as ATen's suggest_memory_format
    does (its own 4-D rule: prims' costs ~3 us a call): permutations, size-1 and
    size-0 dimensions, slices, expanded and zero strides, against prims' version and
    against the output strides of F.max_pool2d itself."""
    from torch._prims_common import suggest_memory_format as prims_suggest

    from dtkernels.ops._common import suggest_memory_format

    rng = random.Random(3)
    perms = [(0, 1, 2, 3), (0, 2, 3, 1), (0, 3, 1, 2), (1, 0, 2, 3), (0, 1, 3, 2), (3, 2, 1, 0)]
    checked = 0
    for _ in range(400):
        shape = [rng.choice([1, 1, 2, 3, 5]) for _ in range(4)]
        base = torch.randn(*[shape[p] for p in rng.choice(perms)])
        t = base.permute(*rng.choice(perms))
        if rng.random() < 0.3:
            t = t[..., ::2] if t.shape[-1] > 1 else t.expand(*t.shape[:-1], 3)
        if rng.random() < 0.2:
            t = t.as_strided(t.shape, [0 if rng.random() < 0.3 else st for st in t.stride()])
        want = prims_suggest(t)
        assert suggest_memory_format(t) == want, (t.shape, t.stride())
        if min(t.shape) > 0 and t.shape[2] > 1 and t.shape[3] > 1:
            out = F.max_pool2d(t, 1)
            assert out.is_contiguous(memory_format=want), (t.shape, t.stride())
            checked += 1
    assert checked > 50
    for t in (torch.empty(2, 3, 0, 4), torch.empty(0, 3, 4, 4).contiguous(memory_format=CL)):
        assert suggest_memory_format(t) == prims_suggest(t)


def test_inputs_not_modified(backend_dtype):
    _, device, dtype = backend_dtype
    for fmt in (None, CL):
        x = _data((2, 3, 7, 9), dtype, device, fmt).requires_grad_()
        g = rand(2, 3, 4, 5, dtype=dtype, device=device)
        before = [x.detach().clone(), g.clone()]
        out = dtk.max_pool2d(x, 3, 2, 1)
        out.backward(g)
        _same(x.detach(), before[0])
        assert torch.equal(g, before[1])


@pytest.mark.sanitize
@pytest.mark.parametrize("memory_format", [None, CL], ids=["nchw", "cl"])
def test_empty_batch(backend, memory_format):
    _, device = backend
    x = rand(0, 3, 8, 8, device=device, memory_format=memory_format, requires_grad=True)
    out, idx = dtk.max_pool2d(x, 2, return_indices=True)
    assert out.shape == idx.shape == (0, 3, 4, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_deterministic_backward(backend):
    """Overlapping windows and many ties: two backwards are bit-identical."""
    _, device = backend
    x = _data((2, 8, 15, 33), torch.float32, device, CL, specials=False).requires_grad_()
    g = rand(2, 8, 15, 33, device=device)
    out = dtk.max_pool2d(x, 3, 1, 1)
    (a,) = torch.autograd.grad(out, x, g, retain_graph=True)
    (b,) = torch.autograd.grad(out, x, g)
    assert torch.equal(a, b)


def _misaligned(x):
    """x's values in a tensor of x's layout whose data starts one element past an
    allocation's start: the CUDA kernels' 16-byte packs must not be taken there."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)[1:]
    y = buf.as_strided(x.shape, x.stride())
    y.copy_(x)
    return y


# channels_last shapes whose C is a whole number of the CUDA kernels' 16-byte packs in
# every dtype (C % 8 == 0), with odd planes, and int16 and int32 offsets (> 128 and
# > 32768 taps).
_CUDA_DEFAULT_EXTRA = [((2, 8, 9, 11), 3, 2, 1, 1, False), ((1, 16, 7, 13), (2, 3), (1, 2), (1, 0), (2, 1), True),
                       ((3, 24, 5, 6), 2, 2, 0, 1, True), ((1, 8, 20, 23), (12, 12), (3, 3), (5, 5), (1, 1), True),
                       ((1, 2, 182, 183), 182, 1, 0, 1, False), ((2, 1, 2, 5), (2, 2), (1, 1), (1, 1), (3, 3), False)]


@pytest.mark.skipif(INTERPRET, reason="host code; the Triton run needs not repeat it")
@pytest.mark.parametrize("memory_format", [None, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=["f32", "f16", "bf16", "f64"])
def test_cuda_default_kernels_code_on_the_host(dtype, memory_format):
    """The default CUDA kernels' per-thread code (pool_forward_item, pool_forward_rows
    and pool_backward_item in csrc/max_pool2d.h, in the pack the launcher picks), run
    on the host over every thread item, gives the CPU kernel's values, int64 indices,
    offsets and gradients bit for bit: random geometry with NaN, -inf and ties, windows
    with no tap in the input, int16 and int32 offsets, channels_last with and without
    16-byte packs, misaligned data, and the 32-bit item split channels_last takes below
    2^31 thread items."""
    cl = memory_format is CL
    cases = _aten_cases(60, seed=11) + _CUDA_DEFAULT_EXTRA
    for n, (shape, k, s, p, d, cm) in enumerate(cases):
        k, s, p, d = mp.normalize_args(k, s, p, d)
        where = f"case {shape} k={k} s={s} p={p} d={d} ceil={cm}"
        x = _data(shape, dtype, "cpu", memory_format, seed=n)
        want = torch.ops.dtkernels._max_pool2d(x, k, s, p, d, cm, cl, True, True)
        for xs in [x, _misaligned(x)] if cl else [x]:
            for fast in [False, True] if cl else [False]:
                got = dtk._C._emulate_cuda_max_pool2d(xs, k, s, p, d, cm, cl, True, True, fast, False)
                for a, b in zip(got, want):
                    assert same_bits(a, b) and a.stride() == b.stride(), where
        alone = dtk._C._emulate_cuda_max_pool2d(x, k, s, p, d, cm, cl, False, False, False, False)
        assert same_bits(alone[0], want[0]) and alone[1].numel() == alone[2].numel() == 0, where
        off = want[2]
        g = rand(*off.shape, dtype=dtype, generator=torch.Generator().manual_seed(n))
        g = g.contiguous(memory_format=memory_format) if cl else g
        want_g = torch.ops.dtkernels._max_pool2d_backward(g, off, list(shape), k, s, p, d, cl)
        for gs in [g, _misaligned(g)] if cl else [g]:
            got_g = dtk._C._emulate_cuda_max_pool2d_backward(gs, off, list(shape), k, s, p, d, cl)
            assert same_bits(got_g, want_g) and got_g.stride() == want_g.stride(), where


@pytest.mark.skipif(INTERPRET, reason="host code; the Triton run needs not repeat it")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=["f32", "f16", "bf16", "f64"])
def test_cuda_rows_backward_code_on_the_host(dtype):
    """The CUDA NCHW "rows" backward's per-thread code (pool_backward_columns in
    csrc/max_pool2d.h), run on the host over every thread item, is bit-identical to the
    CPU kernel (the same sums in the same order): random geometry, common square
    windows (compiled in), windows with no tap in the input, rows that are not a
    whole number of 16-byte groups, int16 offsets."""
    cases = _aten_cases(80, seed=2) + _square_cases(30, seed=9) + [
        ((1, 2, 20, 23), (12, 12), (3, 3), (5, 5), (1, 1), True),
        ((2, 1, 2, 5), (2, 2), (1, 1), (1, 1), (3, 3), False),
        ((1, 2, 40, 61), 3, 2, 1, 1, False),  # planes the CPU kernel gathers
        ((1, 2, 33, 47), (3, 5), 1, (1, 2), (1, 1), True)]
    for n, (shape, k, s, p, d, cm) in enumerate(cases):
        k, s, p, d = mp.normalize_args(k, s, p, d)
        x = _data(shape, dtype, "cpu", seed=n)
        _, _, off = torch.ops.dtkernels._max_pool2d(x, k, s, p, d, cm, False, False, True)
        g = rand(*off.shape, dtype=dtype, generator=torch.Generator().manual_seed(n))
        want = torch.ops.dtkernels._max_pool2d_backward(g, off, list(shape), k, s, p, d, False)
        got = dtk._C._emulate_cuda_max_pool2d_backward_rows(g, off, list(shape), k, s, p, d)
        assert torch.equal(got, want), f"case {shape} k={k} s={s} p={p} d={d} ceil={cm}"


# The column shapes the CUDA "vec" forward specialises (csrc/max_pool2d.h).
_VEC_COLUMNS = [(2, 2, 0), (3, 2, 1), (3, 2, 0), (3, 1, 1)]


def _vec_forward_cases(n, seed):
    """Random row geometry around one of the vec forward's column shapes, rows of a
    whole number of 16-byte vectors for every dtype (W % 8 == 0), often with a last
    group of fewer than V outputs."""
    def draw(rng):
        kw, sw, pw = rng.choice(_VEC_COLUMNS)
        kh = rng.randint(1, 4)
        shape = (rng.randint(1, 2), rng.choice([1, 3, 5]), rng.randint(1, 13), 8 * rng.randint(1, 9))
        return shape, (kh, kw), (rng.randint(1, 3), sw), (rng.randint(0, kh // 2), pw), (rng.randint(1, 2), 1)
    return _valid_cases(n, seed, draw)


def _square_cases(n, seed):
    """The square windows the CUDA rows backward compiles in (k2s2, k3s2p1, k3s2,
    k3s1p1), on random shapes."""
    def draw(rng):
        k, st, p = rng.choice(_VEC_COLUMNS)
        shape = (rng.randint(1, 2), rng.choice([1, 3]), rng.randint(1, 15), rng.randint(1, 40))
        return shape, k, st, p, 1
    return _valid_cases(n, seed, draw)


_VEC_EXTRA = [((2, 3, 14, 112), 3, 2, 1, 1, False),  # the ResNet stem's rows
              ((1, 2, 16, 64), 2, 2, 0, 1, False), ((1, 2, 9, 24), 3, 2, 0, 1, True),
              ((1, 2, 7, 8), 3, 1, 1, 1, False), ((1, 1, 5, 16), (3, 3), (2, 2), (1, 1), (2, 1), True)]


def _stem_cases(n, seed):
    """The ResNet stem's square k3s2p1 window, which the vec forward's candidates with
    rows compiled in take, on random shapes: odd and even output heights (a last item
    of one output row), one-row inputs, with and without ceil_mode."""
    def draw(rng):
        shape = (rng.randint(1, 2), rng.choice([1, 3]), rng.randint(1, 15), 8 * rng.randint(1, 9))
        return shape, 3, 2, 1, 1
    return _valid_cases(n, seed, draw)


_STEM_EXTRA = [((2, 3, 14, 112), 3, 2, 1, 1, False), ((1, 2, 15, 16), 3, 2, 1, 1, True),
               ((1, 1, 1, 8), 3, 2, 1, 1, False), ((1, 2, 2, 24), 3, 2, 1, 1, True)]


def _vec_cases(rows):
    """Cases for the vec forward with `rows` output rows per thread item; the last
    len(extra) come twice, the second time with -inf edges."""
    if rows == 0:
        return _vec_forward_cases(60, seed=4) + _VEC_EXTRA, _VEC_EXTRA
    return _stem_cases(40, seed=10 + rows) + _STEM_EXTRA, _STEM_EXTRA


def _vec_input(shape, dtype, n, edges):
    """_data for the vec forward's host tests; edges: rows and columns of -inf at the
    edges, so that windows there are all -inf (they report their first tap inside the
    input)."""
    x = _data(shape, dtype, "cpu", seed=n)
    if edges:
        x[..., :3, :] = -INF
        x[..., :, :5] = -INF
        x[..., -2:] = -INF
    return x


@pytest.mark.skipif(INTERPRET, reason="host code; the Triton run needs not repeat it")
@pytest.mark.parametrize("rows", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=["f32", "f16", "bf16", "f64"])
def test_cuda_vec_forward_code_on_the_host(dtype, rows):
    """The CUDA NCHW "vec" forward's per-thread code (pool_forward_vec in
    csrc/max_pool2d.h: item split, 16-byte loads, -inf outside the row, packed and
    partial stores), run on the host over every thread item, gives the CPU kernel's
    values, int64 indices and offsets bit for bit, NaN, -inf and ties included: the
    default kernel (rows=0), and the stem's candidates with one or two output rows per
    item, rows compiled in (rows=1, 2)."""
    cases, extra = _vec_cases(rows)
    for n, (shape, k, s, p, d, cm) in enumerate(cases + extra):
        k, s, p, d = mp.normalize_args(k, s, p, d)
        x = _vec_input(shape, dtype, n, edges=n >= len(cases))
        want = torch.ops.dtkernels._max_pool2d(x, k, s, p, d, cm, False, True, True)
        got = dtk._C._emulate_cuda_max_pool2d_forward_vec(x, k, s, p, d, cm, True, True, rows, False)
        for a, b in zip(got, want):
            assert same_bits(a, b), f"case {shape} k={k} s={s} p={p} d={d} ceil={cm}"
        alone = dtk._C._emulate_cuda_max_pool2d_forward_vec(x, k, s, p, d, cm, False, False, rows, False)
        assert same_bits(alone[0], want[0]) and alone[1].numel() == alone[2].numel() == 0


def _tile_budgets(shape, k, s, d, dtype):
    """Shared-memory budgets for the tiled vec forward: one window's input rows (a tile
    per output row), room for two output rows and half a row more, the whole plane, and
    the most a launch takes (48 KiB)."""
    H, row = shape[-2], shape[-1] * torch.empty((), dtype=dtype).element_size()
    span = min((k[0] - 1) * d[0] + 1, H)
    return [span * row, (span + s[0]) * row + row // 2, min(H * row, 48 * 1024), 48 * 1024]


@pytest.mark.skipif(INTERPRET, reason="host code")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=["f32", "f16", "bf16", "f64"])
def test_cuda_vec_tile_code_on_the_host(dtype):
    """The vec forward through shared-memory tiles (a candidate: pool_tile_load, then
    pool_tile_outputs in csrc/max_pool2d.h), run on the host block by block (every
    thread's loads into a NaN-poisoned tile, then every thread's items), gives the CPU
    kernel's values, int64 indices and offsets bit for bit: tiles of one output row,
    of a few with the input rows they share loaded by both, of whole planes; -inf
    edges, NaN and ties; and 16-bit values in pairs. A budget below one window's rows
    is an error. The tall plane's tiles take several rounds of loads per thread."""
    cases = _vec_forward_cases(40, seed=5) + _VEC_EXTRA + [((1, 2, 200, 64), 3, 2, 1, 1, False)]
    for n, (shape, k, s, p, d, cm) in enumerate(cases + _VEC_EXTRA):
        k, s, p, d = mp.normalize_args(k, s, p, d)
        x = _vec_input(shape, dtype, n, edges=n >= len(cases))
        if dtype in (torch.float16, torch.bfloat16):
            x = _nan_payloads(_signed_zeros(x, n), n)
        want = torch.ops.dtkernels._max_pool2d(x, k, s, p, d, cm, False, True, True)
        for budget in _tile_budgets(shape, k, s, d, dtype):
            where = f"case {shape} k={k} s={s} p={p} d={d} ceil={cm} budget={budget}"
            for pairs in (False, True) if dtype in (torch.float16, torch.bfloat16) else (False,):
                got = dtk._C._emulate_cuda_max_pool2d_forward_vec(x, k, s, p, d, cm, True, True, 0, pairs, budget)
                assert all(same_bits(a, b) for a, b in zip(got, want)), where
                got = dtk._C._emulate_cuda_max_pool2d_forward_vec(x, k, s, p, d, cm, False, False, 0, pairs, budget)
                assert same_bits(got[0], want[0]) and got[1].numel() == got[2].numel() == 0, where
    x = _data((1, 2, 14, 112), dtype, "cpu")
    small = _tile_budgets(x.shape, (3, 3), (2, 2), (1, 1), dtype)[0] - 1
    with pytest.raises(RuntimeError, match="one window's rows do not fit a tile"):
        dtk._C._emulate_cuda_max_pool2d_forward_vec(x, [3, 3], [2, 2], [1, 1], [1, 1], False, False, False, 0, False,
                                                    small)
    with pytest.raises(RuntimeError, match="tiles take rows 0"):
        dtk._C._emulate_cuda_max_pool2d_forward_vec(x, [3, 3], [2, 2], [1, 1], [1, 1], False, False, False, 1, False,
                                                    32768)


def _signed_zeros(x, seed):
    """About half of x's zeros made -0.0: equal values that only the scan's order tells
    apart (the maximum keeps the first)."""
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU, used on x's device
    neg = (x == 0) & (torch.rand(x.shape, generator=g) < 0.5).to(x.device)
    return torch.where(neg, torch.full_like(x, -0.0), x)


def _nan_payloads(x, seed):
    """x's 16-bit NaNs with random signs and payloads, so that which NaN a window
    reports shows."""
    g = torch.Generator().manual_seed(seed)
    lo = 0x7C01 if x.dtype == torch.float16 else 0x7F81
    bits = torch.randint(lo, 0x8000, x.shape, generator=g, dtype=torch.int32)
    bits = torch.where(torch.rand(x.shape, generator=g) < 0.5, bits, bits - 0x10000).to(torch.int16)
    return torch.where(x.isnan(), bits.view(x.dtype).to(x.device), x)


@pytest.mark.skipif(INTERPRET, reason="host code")
def test_float16_f16c_split_matches_the_clones():
    """On a CPU with F16C, float16 rows are split into float by vcvtph2ps; the generic
    clones convert with c10's algorithm. Same values, indices and offsets, bit for bit
    (NaN payloads and signs, -0): column strides 1 and 2 (the F16C paths) and 3, rows
    around the 8- and 16-lane tails, odd widths, whole planes and rows, channels_last
    with few channels (pixels of C elements)."""
    if not dtk._C._set_cpu_f16c(True):
        pytest.skip("this CPU has no F16C")
    cases = [((2, 3, 9, W), k, s, p, False) for W in (7, 16, 17, 33, 112) for k, s, p in
             ((2, 2, 0), (3, 2, 1), (3, 1, 1), (3, 3, 0))]
    cases += [((1, 2, 5, 130), 2, 2, 0, True), ((2, 4, 6, 19), 3, 1, 1, True), ((2, 4, 6, 40), 2, 2, 0, True)]
    results = {}
    try:
        for on in (True, False):
            assert dtk._C._set_cpu_f16c(on) == on
            out = []
            for n, (shape, k, s, p, cl) in enumerate(cases):
                x = _nan_payloads(_signed_zeros(_data(shape, torch.float16, "cpu", seed=n), n), n)
                x = x.contiguous(memory_format=CL) if cl else x
                for ceil_mode in (False, True):
                    out += list(torch.ops.dtkernels._max_pool2d(x, [k, k], [s, s], [p, p], [1, 1], ceil_mode, cl,
                                                                True, True))
            results[on] = out
    finally:
        dtk._C._set_cpu_f16c(True)
    assert len(results[True]) == len(results[False])
    for a, b in zip(results[True], results[False]):
        assert same_bits(a, b)


@pytest.mark.skipif(INTERPRET, reason="host code")
@pytest.mark.parametrize("rows", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_cuda_vec_pairs_code_on_the_host(dtype, rows):
    """The vec forward comparing 16-bit values in pairs (PAIRS in pool_forward_vec: the
    stem's candidate), run on the host over every thread item, gives the CPU kernel's
    values, and when asked its int64 indices and offsets, bit for bit: -0.0 against
    +0.0 (the first in row-major order stays), NaN with payloads (items that read one
    rerun the scan), all -inf edges (the first tap inside the input), windows in the
    padding; every vec geometry (rows=0) and the stem's rows compiled in (rows=1, 2)."""
    cases, extra = _vec_cases(rows)
    for n, (shape, k, s, p, d, cm) in enumerate(cases + extra):
        k, s, p, d = mp.normalize_args(k, s, p, d)
        for specials in (False, True):  # without NaN most items keep to the pairs
            x = _nan_payloads(_signed_zeros(_data(shape, dtype, "cpu", specials=specials, seed=n), n), n)
            if n >= len(cases):
                x[..., :3, :] = -INF
                x[..., :, :5] = -INF
            where = f"case {shape} k={k} s={s} p={p} d={d} ceil={cm} specials={specials}"
            want = torch.ops.dtkernels._max_pool2d(x, k, s, p, d, cm, False, True, True)
            got = dtk._C._emulate_cuda_max_pool2d_forward_vec(x, k, s, p, d, cm, True, True, rows, True)
            assert all(same_bits(a, b) for a, b in zip(got, want)), where
            got = dtk._C._emulate_cuda_max_pool2d_forward_vec(x, k, s, p, d, cm, False, False, rows, True)
            assert same_bits(got[0], want[0]) and got[1].numel() == got[2].numel() == 0, where


@pytest.mark.skipif(INTERPRET, reason="host code")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_cuda_nhwc_pairs_code_on_the_host(dtype):
    """The channels_last forward comparing 16-bit channels in pairs (PAIRS in
    pool_forward_item: a candidate), values only and with indices and offsets, run on
    the host over every thread item, gives the CPU kernel's results bit for bit: random
    geometry (windows with no tap inside the input included), -0.0 against +0.0, NaN
    with payloads, both item splits, int8, int16 and int32 offsets; packs of 8 channels,
    and of 1 where C or the alignment does not allow (no pairs there)."""
    cases = _aten_cases(60, seed=12) + _CUDA_DEFAULT_EXTRA
    for n, (shape, k, s, p, d, cm) in enumerate(cases):
        k, s, p, d = mp.normalize_args(k, s, p, d)
        shape = (shape[0], 8 * (1 + n % 3) if n % 5 else shape[1], *shape[2:])  # mostly whole packs
        for specials in (False, True):  # without NaN most items keep to the pairs
            x = _data(shape, dtype, "cpu", CL, specials=specials, seed=n)
            x = _nan_payloads(_signed_zeros(x, n), n).contiguous(memory_format=CL)
            for ri, ro in ((False, False), (True, True), (False, True)):
                want = torch.ops.dtkernels._max_pool2d(x, k, s, p, d, cm, True, ri, ro)
                for xs in (x, _misaligned(x)):
                    for fast in (False, True):
                        got = dtk._C._emulate_cuda_max_pool2d(xs, k, s, p, d, cm, True, ri, ro, fast, True)
                        where = f"case {shape} k={k} s={s} p={p} d={d} ceil={cm} specials={specials} taps={ri, ro}"
                        assert same_bits(got[0], want[0]) and got[0].stride() == want[0].stride(), where
                        for g, w in zip(got[1:], want[1:]):
                            assert g.dtype == w.dtype and torch.equal(g, w) and g.stride() == w.stride(), where
    # tap numbers that need 16 bits (65536 taps, the last the maximum) and more than 16
    # (65792: the scan)
    for kh, kw in ((256, 256), (257, 256)):
        x = _data((1, 8, kh, kw), dtype, "cpu", CL, specials=False, seed=kh) - 10
        x[0, ::2, -1, -1] = 1
        want = torch.ops.dtkernels._max_pool2d(x, [kh, kw], [1, 1], [0, 0], [1, 1], False, True, True, True)
        got = dtk._C._emulate_cuda_max_pool2d(x, [kh, kw], [1, 1], [0, 0], [1, 1], False, True, True, True, True, True)
        assert want[1].view(-1)[0] == kh * kw - 1 and want[2].dtype == torch.int32
        for g, w in zip(got, want):
            assert same_bits(g, w), (kh, kw)


@pytest.mark.skipif(INTERPRET, reason="host code")
def test_bench_vec_candidates_call_the_variant_rightly(monkeypatch):
    """The bench's cuda-vec-* and cuda-nhwc* impls (benchmarks/bench_max_pool2d.py),
    which run only on a GPU, pass the variants their arguments in order: here the variant is the host
    emulation of the same per-thread code, and each impl must give F.max_pool2d's
    values and ask for the kernel its name says."""
    calls = []

    def variant(x, k, s, p, d, cm, rows, full_grid, pairs, return_indices, return_offsets, tile_bytes):
        assert isinstance(full_grid, bool) and isinstance(pairs, bool) and not return_indices
        kernel = f"cuda-tile-{tile_bytes // 1024}k" if tile_bytes else f"cuda-vec-r{rows}" + "-full" * full_grid
        calls.append(kernel + "-pairs" * pairs + "-offsets" * return_offsets)
        return dtk._C._emulate_cuda_max_pool2d_forward_vec(x, k, s, p, d, cm, return_indices, return_offsets, rows,
                                                           pairs, tile_bytes)

    def nhwc_variant(x, k, s, p, d, cm, pairs, return_indices, return_offsets):
        assert isinstance(pairs, bool) and not return_indices
        calls.append("cuda-nhwc" + "-pairs" * pairs + "-offsets" * return_offsets)
        return dtk._C._emulate_cuda_max_pool2d(x, k, s, p, d, cm, True, return_indices, return_offsets, True, pairs)

    monkeypatch.setattr(dtk._C, "_cuda_max_pool2d_vec_variant", variant, raising=False)
    monkeypatch.setattr(dtk._C, "_cuda_max_pool2d_nhwc_variant", nhwc_variant, raising=False)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_max_pool2d as bench
    x = _signed_zeros(_data((2, 8, 10, 32), torch.float16, "cpu", specials=False), 0)
    for pool, stem in [((3, 2, 1), True), ((2,), False)]:
        impls = bench._vec_candidates(pool, stem=stem)
        assert len(impls) == (14 if stem else 4) and sum("-pairs" in n for n in impls) == (5 if stem else 2)
        assert sum(n.startswith("cuda-tile-") for n in impls) == (3 if stem else 2)
        want = F.max_pool2d(x, *pool)
        for name, fn in impls.items():
            assert same_bits(fn({"x": x})[0], want) and calls[-1] == name, (name, calls[-1])
            if name.endswith("-offsets"):  # the offsets too
                assert same_bits(fn({"x": x})[2], torch.ops.dtkernels._max_pool2d(x, *mp.normalize_args(*pool), False,
                                                                                  False, False, True)[2])
        xcl = x.contiguous(memory_format=CL)
        impls = bench._nhwc_candidates(pool)
        assert len(impls) == 4 and sum("-pairs" in n for n in impls) == 2
        offsets = torch.ops.dtkernels._max_pool2d(xcl, *mp.normalize_args(*pool), False, True, False, True)[2]
        for name, fn in impls.items():
            got = fn({"x": xcl})
            assert same_bits(got[0], F.max_pool2d(xcl, *pool)) and calls[-1] == name, (name, calls[-1])
            assert torch.equal(got[2], offsets) if name.endswith("-offsets") else got[2].numel() == 0, name


@pytest.mark.skipif(INTERPRET, reason="host code")
def test_bench_graphed_impls_capture_once_and_replay(monkeypatch):
    """The bench's "-graph" cases (benchmarks/common.py graphed), which run only on a
    GPU, with CUDA's graph primitives faked: one eager call and one capture per input
    set and backend, then replays that return the captured outputs."""
    import contextlib

    log = []

    class Graph:
        def replay(self):
            log.append("replay")

    @contextlib.contextmanager
    def capture(graph):
        log.append("capture")
        yield

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_max_pool2d as bench
    from common import _under

    cases = [c for c in bench.CASES if c.name.endswith("-graph")]
    assert [c.name for c in cases] == ["k3s2p1-fwd-graph", "k2s2-fwd-graph", "k2s2-fwd-graph"]
    calls = []
    fn = bench.graphed(lambda i: (calls.append(dtk.get_backend()), F.max_pool2d(i["x"], 3, 2, 1))[1])
    sets = [{"x": _data((1, 2, 9, 8), torch.float32, "cpu")} for _ in range(2)]
    for backend in ("cpu", "reference"):
        run = _under(backend, fn)
        for _ in range(3):
            for i in sets:
                assert same_bits(run(i), F.max_pool2d(i["x"], 3, 2, 1))
    # per input set and backend: an eager call, then the call captured; replays after
    assert calls == ["cpu"] * 4 + ["reference"] * 4
    assert log.count("capture") == 4 and log.count("replay") == 12
    # the stem's case as built (the two k2s2 ones differ in shape and format only)
    stem = cases[0]
    i = stem.make(torch.device("cpu"))
    got = _under("cpu", stem.candidate)(i)
    assert same_bits(got, stem.baseline(i)) and same_bits(got, F.max_pool2d(i["x"], 3, 2, 1))
    assert stem.extras["clone"](i).numel() * 2 == stem.bytes


@pytest.mark.skipif(INTERPRET, reason="host code")
def test_cuda_vec_forward_keeps_to_its_geometries():
    """The vec forward refuses what it has no kernel for (the CUDA op then runs the
    generic kernel): dilated columns, other column shapes, rows of a partial vector."""
    x = _data((1, 2, 9, 16), torch.float16, "cpu")
    for k, s, p, d in [((3, 3), (2, 2), (1, 1), (1, 2)), ((2, 4), (2, 4), (0, 0), (1, 1))]:
        with pytest.raises(RuntimeError, match="no kernel for this geometry"):
            dtk._C._emulate_cuda_max_pool2d_forward_vec(x, k, s, p, d, False, False, False, 0, False)
    with pytest.raises(RuntimeError, match="no kernel for this geometry"):
        dtk._C._emulate_cuda_max_pool2d_forward_vec(x[..., :12], [2, 2], [2, 2], [0, 0], [1, 1], False, False, False, 0,
                                                    False)
    # the candidates with rows compiled in: the stem's square k3s2p1 window only
    for k, s, p, d in [((2, 2), (2, 2), (0, 0), (1, 1)), ((2, 3), (2, 2), (1, 1), (1, 1)),
                       ((3, 3), (1, 2), (1, 1), (1, 1)), ((3, 3), (2, 2), (0, 1), (1, 1)),
                       ((3, 3), (2, 2), (1, 1), (2, 1))]:
        for rows in (1, 2):
            with pytest.raises(RuntimeError, match="no kernel for this geometry"):
                dtk._C._emulate_cuda_max_pool2d_forward_vec(x, k, s, p, d, False, False, False, rows, False)
    with pytest.raises(RuntimeError, match="no kernel for this geometry"):
        dtk._C._emulate_cuda_max_pool2d_forward_vec(x, [3, 3], [2, 2], [1, 1], [1, 1], False, False, False, 3, False)
    # pairs are of 16-bit values
    for dtype in (torch.float32, torch.float64):
        with pytest.raises(RuntimeError, match="0 output rows per thread item and 16-bit pairs"):
            dtk._C._emulate_cuda_max_pool2d_forward_vec(x.to(dtype), [2, 2], [2, 2], [0, 0], [1, 1], False, False, False,
                                                        0, True)
    # float32 rows need only a multiple of 4
    x12 = x[..., :12].float()
    dtk._C._emulate_cuda_max_pool2d_forward_vec(x12, [2, 2], [2, 2], [0, 0], [1, 1], False, False, False, 0, False)
    # a misaligned input, which the CUDA launcher leaves to the generic kernel
    odd = torch.randn(65).half()[1:].view(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        dtk._C._emulate_cuda_max_pool2d_forward_vec(odd, [2, 2], [2, 2], [0, 0], [1, 1], False, False, False, 0, False)


_NEEDS_CUDA_KERNELS = pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in dtk.available_backends(),
                                         reason="needs a CUDA GPU and the CUDA kernels")


def _backward_args(dtype, cases, channels_last=False):
    out = []
    fmt = CL if channels_last else None
    for n, (shape, k, s, p, d, cm) in enumerate(cases):
        k, s, p, d = mp.normalize_args(k, s, p, d)
        x = _data(shape, dtype, "cuda", fmt, seed=n)
        _, _, off = torch.ops.dtkernels._max_pool2d(x, k, s, p, d, cm, channels_last, False, True)
        g = rand(*off.shape, dtype=dtype, device="cuda", generator=torch.Generator().manual_seed(n))
        out.append((g.contiguous(memory_format=fmt) if fmt else g, off, list(shape), k, s, p, d, channels_last))
    return out


def _forward_args(dtype, cases, channels_last=False, misaligned=False):
    out = []
    for n, (shape, k, s, p, d, cm) in enumerate(cases):
        k, s, p, d = mp.normalize_args(k, s, p, d)
        x = _data(shape, dtype, "cuda", CL if channels_last else None, seed=n)
        out.append((_misaligned(x) if misaligned else x, k, s, p, d, cm, channels_last, True, True))
    return out


@pytest.mark.cuda
@_NEEDS_CUDA_KERNELS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_cuda_backward_matches_the_cpu(dtype):
    """The CUDA backward (NCHW: 16 bytes of a row per thread; channels_last: an element
    or pack of channels per thread) gives the CPU kernel's bits: the same sums in the
    same order."""
    cases = _aten_cases(40, seed=3) + [((2, 3, 57, 61), 3, 2, 1, 1, False)]
    assert_cuda_matches_cpu(torch.ops.dtkernels._max_pool2d_backward, _backward_args(dtype, cases), "backward_rows_kernel")
    cl = [((2, 16, 14, 28), 3, 2, 1, 1, False)] + _aten_cases(20, seed=4)
    assert_cuda_matches_cpu(torch.ops.dtkernels._max_pool2d_backward, _backward_args(dtype, cl, channels_last=True),
                 "max_pool2d_backward_kernel")


@pytest.mark.cuda
@_NEEDS_CUDA_KERNELS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_cuda_forward_matches_the_cpu(dtype):
    """The CUDA forward gives the CPU kernel's values, indices and offsets bit for bit:
    the vec kernel on the NCHW geometries it has (16-byte aligned input), the rows
    kernel on the others and on misaligned input, channels_last with its 32-bit item
    splits."""
    vec = [((2, 3, 14, 112), 3, 2, 1, 1, False)] + _vec_forward_cases(40, seed=5) + _VEC_EXTRA
    assert_cuda_matches_cpu(torch.ops.dtkernels._max_pool2d, _forward_args(dtype, vec), "max_pool2d_vec_kernel")
    assert_cuda_matches_cpu(torch.ops.dtkernels._max_pool2d, _forward_args(dtype, vec[:12], misaligned=True),
                 "max_pool2d_rows_kernel")
    assert_cuda_matches_cpu(torch.ops.dtkernels._max_pool2d, _forward_args(dtype, _aten_cases(30, seed=7)))
    cl = [((2, 16, 14, 28), 3, 2, 1, 1, False), ((2, 8, 9, 10), 2, 2, 0, 1, True)] + _aten_cases(30, seed=6)
    assert_cuda_matches_cpu(torch.ops.dtkernels._max_pool2d, _forward_args(dtype, cl, channels_last=True), "max_pool2d_kernel")


def _vec_variant(x, k, s, p, d, cm, rows, full_grid, pairs=False, taps=None, tile_bytes=0):
    """The CUDA vec forward with `rows` output rows per thread item, comparing 16-bit
    values in pairs where asked, through shared-memory tiles of at most tile_bytes
    where asked (the candidates; _C._cuda_max_pool2d_vec_variant), or on the CPU the
    CPU kernel; taps: with indices and offsets (by default when not in pairs)."""
    want = not pairs if taps is None else taps
    if x.is_cuda:
        return dtk._C._cuda_max_pool2d_vec_variant(x, k, s, p, d, cm, rows, full_grid, pairs, want, want, tile_bytes)
    return torch.ops.dtkernels._max_pool2d(x, k, s, p, d, cm, False, want, want)


@pytest.mark.cuda
@_NEEDS_CUDA_KERNELS
@pytest.mark.parametrize("rows", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_cuda_vec_variants_match_the_cpu(dtype, rows):
    """The vec forward's candidates for the stem (one or two output rows per thread
    item, rows compiled in; a block per 256 items) and the default kernel through the
    same entry give the CPU kernel's values, indices and offsets bit for bit."""
    cases, extra = _vec_cases(rows)
    for full_grid in (False, True):
        args = [(x, k, s, p, d, cm, rows, full_grid)
                for x, k, s, p, d, cm, *_ in _forward_args(dtype, cases[:30] + extra)]
        assert_cuda_matches_cpu(_vec_variant, args, "max_pool2d_vec_kernel")
    if dtype != torch.float32:  # 16-bit pairs, with and without taps: signed zeros, NaN
        args = [(_nan_payloads(_signed_zeros(x, n), n), k, s, p, d, cm, rows, False, True)
                for n, (x, k, s, p, d, cm, *_) in enumerate(_forward_args(dtype, cases[:30] + extra))]
        args += [(_signed_zeros(_data(a[0].shape, dtype, "cuda", specials=False, seed=n), n), *a[1:])
                 for n, a in enumerate(args)]
        assert_cuda_matches_cpu(_vec_variant, args, "max_pool2d_vec_kernel")
        assert_cuda_matches_cpu(_vec_variant, [(*a, True) for a in args])
    x = _data((1, 2, 9, 16), dtype, "cuda")
    with pytest.raises(RuntimeError, match="no vec kernel with 1 output rows"):
        dtk._C._cuda_max_pool2d_vec_variant(x, [2, 2], [2, 2], [0, 0], [1, 1], False, 1, False, False, False, False)
    if dtype == torch.float32:
        with pytest.raises(RuntimeError, match="or pairs for this dtype"):
            dtk._C._cuda_max_pool2d_vec_variant(x, [2, 2], [2, 2], [0, 0], [1, 1], False, 0, False, True, False, True)


@pytest.mark.cuda
@_NEEDS_CUDA_KERNELS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_cuda_vec_tile_matches_the_cpu(dtype):
    """The vec forward through shared-memory tiles (a candidate), with the budgets of
    test_cuda_vec_tile_code_on_the_host (a tile per output row to whole planes), gives
    the CPU kernel's values, indices and offsets bit for bit, and for 16-bit types in
    pairs too (NaN payloads, signed zeros); budgets over 48 KiB or below one window's
    rows are errors."""
    cases = _vec_forward_cases(30, seed=5) + _VEC_EXTRA + [((1, 2, 200, 64), 3, 2, 1, 1, False)]
    args = [(x, k, s, p, d, cm, 0, False, False, None, budget)
            for x, k, s, p, d, cm, *_ in _forward_args(dtype, cases)
            for budget in _tile_budgets(x.shape, k, s, d, dtype)]
    assert_cuda_matches_cpu(_vec_variant, args, "max_pool2d_tile_kernel")
    if dtype != torch.float32:
        args = [(_nan_payloads(_signed_zeros(a[0], n), n), *a[1:8], True, taps, a[10])
                for n, a in enumerate(args) for taps in (False, True)]
        assert_cuda_matches_cpu(_vec_variant, args, "max_pool2d_tile_kernel")
    x = _data((1, 2, 14, 112), dtype, "cuda")
    for budget in (48 * 1024 + 1, _tile_budgets(x.shape, (3, 3), (2, 2), (1, 1), dtype)[0] - 1):
        with pytest.raises(RuntimeError, match="or tiles of this size"):
            dtk._C._cuda_max_pool2d_vec_variant(x, [3, 3], [2, 2], [1, 1], [1, 1], False, 0, False, False, False,
                                                False, budget)


def _nhwc_variant(x, k, s, p, d, cm, pairs, return_indices=False, return_offsets=False):
    """The CUDA channels_last forward, 16-bit channels in pairs where asked
    (_C._cuda_max_pool2d_nhwc_variant), or on the CPU the CPU kernel's results."""
    if x.is_cuda:
        return dtk._C._cuda_max_pool2d_nhwc_variant(x, k, s, p, d, cm, pairs, return_indices, return_offsets)
    return torch.ops.dtkernels._max_pool2d(x, k, s, p, d, cm, True, return_indices, return_offsets)


@pytest.mark.cuda
@_NEEDS_CUDA_KERNELS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_cuda_nhwc_pairs_match_the_cpu(dtype):
    """The channels_last forward comparing 16-bit channels in pairs (a candidate), values
    only and with indices and offsets, gives the CPU kernel's results bit for bit (NaN
    payloads aside): signed zeros, NaN, random geometry, int8 to int32 offsets; it
    refuses packs that are not whole."""
    cases = [((2, 16, 14, 28), 3, 2, 1, 1, False), ((2, 8, 9, 10), 2, 2, 0, 1, True)] + _aten_cases(30, seed=6)
    args = []
    for n, (shape, k, s, p, d, cm) in enumerate(cases):
        k, s, p, d = mp.normalize_args(k, s, p, d)
        shape = (shape[0], 8 * (1 + n % 3), *shape[2:])
        x = _data(shape, dtype, "cpu", CL, specials=n % 2 == 1, seed=n)
        x = _nan_payloads(_signed_zeros(x, n), n).contiguous(memory_format=CL).cuda()
        args.append((x, k, s, p, d, cm, True))
    assert_cuda_matches_cpu(_nhwc_variant, args, "max_pool2d_kernel")
    big = [(_data((1, 8, 20, 23), dtype, "cuda", CL, seed=1), [12, 12], [3, 3], [5, 5], [1, 1], True, True),
           (_data((1, 8, 182, 183), dtype, "cuda", CL, seed=2), [182, 182], [1, 1], [0, 0], [1, 1], False, True)]
    for taps in ((True, True), (False, True)):
        assert_cuda_matches_cpu(_nhwc_variant, [(*a, *taps) for a in args + big])
    x = _data((1, 12, 5, 6), dtype, "cuda", CL)
    with pytest.raises(RuntimeError, match="pairs take 16-bit channels in whole 16-byte aligned packs"):
        _nhwc_variant(x, [2, 2], [2, 2], [0, 0], [1, 1], False, True)
    x = _data((1, 8, 257, 256), dtype, "cuda", CL)
    with pytest.raises(RuntimeError, match=r"pairs keep taps of windows of up to 2\^16 taps"):
        _nhwc_variant(x, [257, 256], [1, 1], [0, 0], [1, 1], False, True, False, True)


@pytest.mark.cuda
@pytest.mark.sanitize
@_NEEDS_CUDA_KERNELS
def test_cuda_kernels_memcheck():
    """A few shapes for compute-sanitizer through every NCHW kernel: 16-byte stores
    (W = 64), rows that end mid-pack (W = 61, 5), int16 offsets, partial last groups,
    windows that reach past both ends of a row, misaligned input; and channels_last
    packs of 8 and of 1."""
    # no profiler here: CUPTI and compute-sanitizer do not mix; the tests above check the kernels
    cases = [((2, 3, 16, 64), 3, 2, 1, 1, False), ((1, 2, 9, 61), 3, 2, 1, 1, True), ((2, 3, 7, 5), 2, 1, 0, 2, False),
             ((1, 2, 20, 23), 12, 3, 5, 1, True)]
    assert_cuda_matches_cpu(torch.ops.dtkernels._max_pool2d_backward, _backward_args(torch.float16, cases))
    cases = [((2, 3, 16, 64), 3, 2, 1, 1, False), ((1, 2, 9, 24), 3, 2, 0, 1, True), ((1, 2, 7, 8), 3, 1, 1, 1, False),
             ((1, 3, 6, 40), 2, 2, 0, 1, True)]
    assert_cuda_matches_cpu(torch.ops.dtkernels._max_pool2d, _forward_args(torch.float16, cases))
    assert_cuda_matches_cpu(torch.ops.dtkernels._max_pool2d, _forward_args(torch.float16, cases, misaligned=True))
    cases = [((2, 16, 7, 9), 3, 2, 1, 1, False), ((1, 3, 5, 6), 2, 2, 0, 1, True)]  # packs of 8, and of 1
    assert_cuda_matches_cpu(torch.ops.dtkernels._max_pool2d, _forward_args(torch.float16, cases, channels_last=True))
    # the stem's candidates: clamped loads at every edge, odd output heights
    cases = [((1, 2, 1, 8), 3, 2, 1, 1, False), ((2, 3, 15, 24), 3, 2, 1, 1, True), ((1, 2, 6, 40), 3, 2, 1, 1, False)]
    for rows in (1, 2):
        args = [(x, k, s, p, d, cm, rows, False) for x, k, s, p, d, cm, *_ in _forward_args(torch.float16, cases)]
        assert_cuda_matches_cpu(_vec_variant, args)
    # shared-memory tiles of one output row to whole planes, values alone and in pairs
    for x, k, s, p, d, cm, *_ in _forward_args(torch.float16, cases):
        budgets = _tile_budgets(x.shape, k, s, d, torch.float16)
        args = [(x, k, s, p, d, cm, 0, False, pairs, True, b) for b in budgets for pairs in (False, True)]
        assert_cuda_matches_cpu(_vec_variant, args)
    # 16-bit pairs: word loads at both ends of a row, the scan for items that read NaN
    for rows in (0, 1, 2):
        for taps in (False, True):
            args = [(x, k, s, p, d, cm, rows, False, True, taps)
                    for x, k, s, p, d, cm, *_ in _forward_args(torch.float16, cases)]
            assert_cuda_matches_cpu(_vec_variant, args)
    cases = [((1, 2, 9, 24), 3, 2, 0, 1, True), ((1, 2, 7, 8), 3, 1, 1, 1, False), ((1, 3, 6, 40), 2, 2, 0, 1, True)]
    args = [(x, k, s, p, d, cm, 0, False, True) for x, k, s, p, d, cm, *_ in _forward_args(torch.float16, cases)]
    assert_cuda_matches_cpu(_vec_variant, args)
    cases = [((2, 16, 7, 9), 3, 2, 1, 1, False), ((1, 8, 5, 6), 2, 2, 0, 1, True)]  # channels_last pairs
    args = [(x, k, s, p, d, cm, True) for x, k, s, p, d, cm, *_ in _forward_args(torch.float16, cases, True)]
    assert_cuda_matches_cpu(_nhwc_variant, args)
    assert_cuda_matches_cpu(_nhwc_variant, [(*a, True, True) for a in args])


def test_backward_keeps_only_small_offsets():
    """Autograd saves the window offset (int8 for up to 128 taps, int16 beyond), not
    the input and not int64 indices; without grad no offsets are computed at all."""
    x = rand(2, 3, 9, 9, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, idx = dtk.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert len(saved) == 1 and saved[0].dtype == torch.int8 and saved[0].shape == out.shape
    saved.clear()
    big = rand(1, 2, 30, 30, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = dtk.max_pool2d(big, 12, 3, 6, ceil_mode=True)
    assert len(saved) == 1 and saved[0].dtype == torch.int16
    (gi,) = torch.autograd.grad(out, big, torch.ones_like(out))
    assert_close(gi, _grad_ref(big, torch.ones_like(out), (12, 3, 6), True))
    for grad_mode, rg in ((True, False), (False, True)):
        log = OpLog()
        with torch.set_grad_enabled(grad_mode), log:
            dtk.max_pool2d(x.detach().requires_grad_(rg), 2)
        calls = [c for c in log.calls if c[0].startswith("dtkernels.")]
        assert [c[0] for c in calls] == ["dtkernels.max_pool2d.default"]
        _, args, kwargs = calls[0]  # trailing defaults are left out
        assert not (args[8] if len(args) > 8 else kwargs.get("return_offsets", False)), \
            "no offsets when nothing needs a gradient"


def test_large_windows_fall_back_to_wider_offsets():
    taps = {(11, 11): torch.int8, (12, 11): torch.int16, (200, 200): torch.int32}
    for k, want in taps.items():
        assert mp.offsets_dtype(k[0] * k[1]) == want
    x = rand(1, 1, 200, 201, requires_grad=True)
    out = dtk.max_pool2d(x, (200, 200), 1)
    (gi,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.equal(gi, _grad_ref(x, torch.ones_like(out), ((200, 200), 1), False).float())


@pytest.mark.parametrize("memory_format", [None, CL], ids=["nchw", "cl"])
def test_cpu_backward_both_algorithms_match_aten(memory_format):
    """The CPU backward scatters small planes (at most 1024 elements) with overlapping
    windows and gathers everything else: both give ATen's float32 gradients bit for
    bit, on planes either side of the threshold."""
    for n, (shape, k, s, p, d) in enumerate([((2, 3, 32, 32), 3, 2, 1, 1), ((2, 3, 32, 33), 3, 2, 1, 1),
                                             ((1, 4, 16, 16), 3, 1, 1, 1), ((1, 4, 17, 16), 3, 1, 1, 1),
                                             ((2, 2, 45, 61), (3, 2), (2, 1), (1, 1), (1, 2))]):
        x = _data(shape, torch.float32, "cpu", memory_format, seed=n)
        g = rand(*F.max_pool2d(x, k, s, p, d).shape, generator=torch.Generator().manual_seed(n))
        if memory_format is not None:
            g = g.contiguous(memory_format=memory_format)
        xa, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        (want,) = torch.autograd.grad(F.max_pool2d(xa, k, s, p, d), xa, g)
        (got,) = torch.autograd.grad(dtk.max_pool2d(xo, k, s, p, d), xo, g)
        assert torch.equal(got, want), f"case {shape} k={k} s={s} p={p} d={d}"


def _cpu_paths(x, g_seed, args):
    """(forward (out, indices, offsets), backward) of the native CPU kernels with small
    planes taken whole, then by rows."""
    k, s, p, d, cm = (list(a) if isinstance(a, tuple) else a for a in args)
    cl = x.dim() == 4 and x.is_contiguous(memory_format=CL) and not x.is_contiguous()
    res = []
    try:
        for whole in (True, False):
            assert dtk._C._set_cpu_max_pool2d_whole(whole) == whole
            fwd = torch.ops.dtkernels._max_pool2d(x, k, s, p, d, cm, cl, True, True)
            go = rand(*fwd[0].shape, dtype=x.dtype, generator=torch.Generator().manual_seed(g_seed))
            if cl:
                go = go.contiguous(memory_format=CL)
            gi = torch.ops.dtkernels._max_pool2d_backward(go, fwd[2], list(x.shape), k, s, p, d, cl)
            res.append((fwd, go, gi))
    finally:
        dtk._C._set_cpu_max_pool2d_whole(True)
    return res


def _pairs(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=["f32", "f16", "bf16", "f64"])
def test_cpu_whole_planes_and_rows_match_the_reference(dtype):
    """The CPU kernels take small NCHW planes whole (each tap one run over the plane)
    and larger ones row by row. Most test shapes are small, so here both paths run on
    the same inputs: random geometry, the named cases, and planes either side of the
    limits, against the reference (forward values, indices and offsets; backward in
    the reference's order, so exactly)."""
    cases = [c[:1] + tuple(_pairs(a) for a in c[1:5]) + c[5:] for c in _aten_cases(50, seed=7)]
    cases += [(shape, *(_pairs(a) if a is not None else _pairs(c.values[0][0]) for a in c.values[0][:4]),
               c.values[0][4]) for c in CASES for shape in SHAPES]
    cases += [((1, 2, 20, 126), (3, 3), (2, 2), (1, 1), (1, 1), False),  # P = 64: whole
              ((1, 2, 20, 128), (3, 3), (2, 2), (1, 1), (1, 1), True),   # P = 65: rows
              ((1, 2, 20, 94), (2, 2), (2, 2), (0, 0), (1, 1), False),   # 47 outputs a row: whole
              ((1, 2, 20, 96), (2, 2), (2, 2), (0, 0), (1, 1), True),    # 48: rows forward
              ((1, 3, 90, 90), (3, 3), (2, 2), (1, 1), (1, 1), False),   # split of 16 * 46^2 > 16384: rows
              ((2, 5, 1, 1), (1, 1), (1, 1), (0, 0), (1, 1), False),
              ((2, 16, 9, 11), (3, 3), (2, 2), (1, 1), (1, 1), True),    # channels_last pixels of whole vectors
              ((1, 20, 7, 12), (2, 2), (2, 2), (0, 0), (1, 1), False),   # ... and of vectors and a rest
              ((1, 2, 13, 17), (4, 3), (3, 4), (2, 1), (2, 3), True)]
    for n, (shape, k, s, p, d, cm) in enumerate(cases):
        fmts = [None, CL] if len(shape) == 4 else [None]
        for fmt in fmts:
            x = _data(shape, dtype, "cpu", fmt, seed=n)
            msg = f"case {shape} k={k} s={s} p={p} d={d} ceil={cm} fmt={fmt}"
            r_out, r_idx, r_taps = ref.max_pool2d_with_taps(x, k, s, p, d, cm)
            for (out, idx, off), go, gi in _cpu_paths(x, n, (k, s, p, d, cm)):
                _same(out, r_out)
                assert torch.equal(idx, r_idx), msg
                assert torch.equal(off.long(), r_taps), msg
                want = ref.max_pool2d_backward(go, off, shape, k, s, p, d)
                torch.testing.assert_close(gi, want, rtol=0, atol=0, msg=msg)
                assert gi.stride() == x.stride(), msg


def test_cpu_whole_planes_split_across_tasks():
    """Many small planes: stacks of planes cut by parallel chunks at arbitrary planes
    (partial stacks at each chunk's end), on 2 threads; values, indices and float32
    gradients bit-exact to ATen."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n, (shape, args) in enumerate([((1, 512, 14, 14), (2,)), ((8, 256, 8, 8), (3, 2, 1)),
                                           ((3, 300, 9, 13), (3, 2, 1, 1, True))]):
            x = _data(shape, torch.float32, "cpu", seed=n)
            a_out, a_idx = F.max_pool2d(x, *args, return_indices=True)
            xo, xa = x.clone().requires_grad_(), x.clone().requires_grad_()
            out, idx = dtk.max_pool2d(xo, *args, return_indices=True)
            _same(out, a_out)
            assert torch.equal(idx, a_idx), shape
            g = rand(*out.shape, generator=torch.Generator().manual_seed(n))
            (gi,) = torch.autograd.grad(out, xo, g)
            (want,) = torch.autograd.grad(F.max_pool2d(xa, *args), xa, g)
            assert torch.equal(gi, want), shape
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype,memory_format,shape", [
    (torch.float32, None, (1, 33, 256, 1022)),   # odd output width: unaligned rows too
    (torch.float16, CL, (1, 128, 256, 512)),
    (torch.bfloat16, None, (1, 64, 512, 512)),
    (torch.float64, CL, (1, 16, 256, 1024)),
], ids=["f32", "f16-cl", "bf16", "f64-cl"])
def test_large_outputs(backend, dtype, memory_format, shape):
    """Outputs of 8 MiB and more take the CPU kernels' non-temporal stores, forward
    and backward (input gradients merged by rows); gradients of small integers sum
    exactly in every dtype."""
    name, device = backend
    if name != "cpu":
        pytest.skip("the CPU kernels' streaming stores")
    x = _data(shape, dtype, device, memory_format)
    out, idx = dtk.max_pool2d(x, 2, return_indices=True)
    assert out.nbytes >= 8 << 20
    a_out, a_idx = F.max_pool2d(x, 2, return_indices=True)
    _same(out, a_out)
    assert torch.equal(idx, a_idx)
    _same(dtk.max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1))
    for args in [(2,), (3, 2, 1)]:
        ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = dtk.max_pool2d(ours, *args)
        g = torch.randint(-3, 4, y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        g = g.contiguous(memory_format=memory_format) if memory_format else g
        (gi,) = torch.autograd.grad(y, ours, g)
        _same(gi, torch.autograd.grad(F.max_pool2d(theirs, *args), theirs, g)[0])


@pytest.mark.sanitize
def test_max_unpool2d_roundtrip(backend):
    _, device = backend
    x = rand(2, 3, 9, 11, device=device)
    out, idx = dtk.max_pool2d(x, 2, return_indices=True)
    up = F.max_unpool2d(out, idx, 2, output_size=x.shape[-2:])
    a_out, a_idx = F.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(up, F.max_unpool2d(a_out, a_idx, 2, output_size=x.shape[-2:]))


@pytest.mark.parametrize("memory_format", [None, CL], ids=["nchw", "cl"])
def test_opcheck(backend, memory_format):
    _, device = backend
    op, bop = torch.ops.dtkernels.max_pool2d.default, torch.ops.dtkernels.max_pool2d_backward.default
    cl = memory_format is CL
    samples = [
        (rand(2, 3, 7, 9, device=device, memory_format=memory_format, requires_grad=True),
         [3, 3], [2, 2], [1, 1], [1, 1], False, cl, True, True),
        (rand(2, 4, 8, 8, device=device, memory_format=memory_format), [2, 2], [2, 2], [0, 0], [1, 1], True, cl,
         False, False),
        (rand(2, 5, 9, device=device, requires_grad=True), [2, 3], [1, 2], [1, 0], [2, 1], True, False, False, True),
    ]
    for args in samples:
        torch.library.opcheck(op, args)
        x = args[0].detach()
        out, _, off = op(x, *args[1:-1], True)
        torch.library.opcheck(bop, (rand(*out.shape, device=device), off, list(x.shape), *args[1:5], args[6]))
        torch.library.opcheck(torch.ops.dtkernels._max_pool2d.default, (x, *args[1:]))


def test_gradcheck_float64(backend):
    name, device = backend
    if device.type != "cpu":
        pytest.skip("float64 is claimed on the CPU only")
    interpreted = name == "triton"  # every Jacobian column is a kernel run: keep it tiny
    shape = (1, 2, 4, 5) if interpreted else (2, 3, 7, 8)
    cases = [(3, 2, 1)] if interpreted else [(2,), (3, 2, 1), ((2, 3), 1, (1, 1), (2, 1), True)]
    for fmt in (None, CL):
        x = rand(*shape, dtype=torch.float64, memory_format=fmt, requires_grad=True)
        for args in cases:
            f = lambda t: dtk.max_pool2d(t, *args[:4], ceil_mode=len(args) > 4)  # noqa: E731
            assert torch.autograd.gradcheck(f, (x,))
            if not interpreted:  # double backward is a PyTorch composite, the same on every backend
                assert torch.autograd.gradgradcheck(f, (x,))


def test_meta_and_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.empty(2, 3, 9, 11, device="meta").contiguous(memory_format=CL)
    out, idx = dtk.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    assert out.device.type == "meta" and out.shape == (2, 3, 5, 6) and out.is_contiguous(memory_format=CL)
    assert idx.dtype == torch.int64
    with FakeTensorMode():
        a = torch.empty(4, 5, 6, 7)
        assert dtk.max_pool2d(a, 2).shape == (4, 5, 3, 3)
        with pytest.raises(RuntimeError, match="Output size is too small"):
            dtk.max_pool2d(a, 7)


@pytest.mark.slow
def test_torch_compile_fullgraph(backend):
    name, device = backend
    torch._dynamo.reset()

    def block(x, w):
        y, idx = dtk.max_pool2d(x * w, 3, 2, 1, return_indices=True)
        return y.sum(dim=1), idx

    compiled = torch.compile(block, fullgraph=True)
    x = rand(2, 4, 9, 10, device=device, memory_format=CL, requires_grad=True)
    w = rand(1, 4, 1, 1, device=device, requires_grad=True)
    out, idx = compiled(x, w)
    ref_out, ref_idx = block(x, w)
    g = rand(*out.shape, device=device)
    grads = torch.autograd.grad(out, (x, w), g)
    ref_grads = torch.autograd.grad(ref_out, (x, w), g)
    assert_close(out, ref_out)
    assert torch.equal(idx, ref_idx)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b)


def _error(f):
    with pytest.raises(Exception) as e:
        f()
    return e.type, str(e.value).splitlines()[0]


@pytest.mark.parametrize("args", [
    pytest.param((3, 1, 2), id="pad>half-effective-kernel"),
    pytest.param((2, 1, 2, 3), id="pad>half-kernel"),
    pytest.param(((2, 3), (0, 1)), id="zero-stride"),
    pytest.param(((2, 3), (-1, 1)), id="negative-stride"),
    pytest.param(((0, 3), 1), id="zero-kernel"),
    pytest.param((2, 1, 0, (0, 1)), id="zero-dilation"),
    pytest.param((2, 1, -1), id="negative-pad"),
    pytest.param((13,), id="output-too-small"),
    pytest.param(((2, 2, 2),), id="kernel-3-tuple"),
    pytest.param((2, None, (1, 1, 1)), id="padding-3-tuple"),
    pytest.param((2, (1, 2, 3)), id="stride-3-tuple"),
    pytest.param((2, 1, 0, (1, 1, 1)), id="dilation-3-tuple"),
    pytest.param(((2**32 + 1, 1), None, (2**31, 0)), id="kernel-beyond-int"),  # would wrap to k=1, p=INT_MIN
    pytest.param(((1, 2**31),), id="kernel-2^31"),
    pytest.param((2, 2**40), id="stride-beyond-int"),
    pytest.param((1, 1, 0, 2**33), id="dilation-beyond-int"),
])
def test_errors_are_atens(args, check_path):
    """Same exception type and first line as F.max_pool2d, from the public function,
    the fake kernel (what torch.compile reports) and the native kernel."""
    x = rand(2, 3, 12, 12)
    want = _error(lambda: F.max_pool2d(x, *args))
    if want == (RuntimeError, "integer out of range"):  # torch 2.11's words for 2.13's below
        want = (RuntimeError, "value cannot be converted to type int without overflow")
    assert _error(lambda: dtk.max_pool2d(x, *args)) == want
    from torch._subclasses.fake_tensor import FakeTensorMode

    if want[1].startswith("max_pool2d:"):
        return  # argument normalisation: only the public function sees those
    k, s, p, d = mp.normalize_args(*args)
    with FakeTensorMode():
        assert _error(lambda: torch.ops.dtkernels.max_pool2d(torch.empty(2, 3, 12, 12), k, s, p, d))[1] == want[1]
    assert _error(lambda: torch.ops.dtkernels._max_pool2d(x, k, s, p, d, False, False, False, False))[1] == want[1]


@pytest.mark.triton
def test_triton_channel_tiles_beyond_the_grid_are_a_clear_error():
    """The channels_last Triton kernels tile channels on the grid's second axis (at most
    65535 tiles of 64): beyond, a clear error rather than a failed launch."""
    skip_unless_runs("triton")
    x = torch.empty(1, 65535 * 64 + 1, 2, 2, device=device_for("triton")).contiguous(memory_format=CL)
    with dtk.use_backend("triton"), pytest.raises(RuntimeError, match="channels of more than 4194240 elements"):
        dtk.max_pool2d(x, 2)


@pytest.mark.triton
@pytest.mark.parametrize("memory_format", [None, CL], ids=["nchw", "cl"])
def test_triton_wide_offsets(memory_format, monkeypatch):
    """Near 2^31 rows (NCHW: planes x height) or pixels (channels_last) the kernels
    index in int64 (WIDE): taken here on small inputs by lowering the threshold,
    forward with indices and backward, against the reference."""
    skip_unless_runs("triton")
    from dtkernels.triton import max_pool2d as k

    monkeypatch.setattr(k, "_WIDE_FROM", 0)
    device = device_for("triton")
    for n, (shape, args, cm) in enumerate([((2, 3, 9, 11), (3, 2, 1, 1), False),
                                           ((1, 33, 7, 6), ((2, 3), (1, 2), (1, 0), (2, 1)), True)]):
        x = _data(shape, torch.float32, device, memory_format, seed=n)
        want, want_idx = ref.max_pool2d(x.cpu(), *args, ceil_mode=cm, return_indices=True)
        xd = x.detach().requires_grad_()
        with dtk.use_backend("triton"):
            out, idx = dtk.max_pool2d(xd, *args, ceil_mode=cm, return_indices=True)
            g = rand(*out.shape, generator=torch.Generator().manual_seed(n)).to(device)
            (gi,) = torch.autograd.grad(out, xd, g)
        _same(out.cpu(), want)
        assert torch.equal(idx.cpu(), want_idx)
        assert_close(gi.cpu(), _grad_ref(x.cpu(), g.cpu(), args, cm).float())


def test_windows_beyond_int32_taps_are_a_clear_error():
    """Offsets inside a window are at most int32 (ATen would scan 2^32 taps per output)."""
    x = rand(1, 1, 3, 3)
    with pytest.raises(RuntimeError, match=r"windows of more than 2\^31 - 1 elements"):
        dtk.max_pool2d(x, 2**16, 1, 2**15)
    with pytest.raises(RuntimeError, match=r"windows of more than 2\^31 - 1 elements"):
        torch.ops.dtkernels._max_pool2d(x, [2**16, 2**16], [1, 1], [2**15, 2**15], [1, 1], False, False, False, True)


def test_input_errors(check_path):
    for x in (rand(3, 12), rand(1, 2, 3, 8, 8), rand(2, 0, 8, 8), rand(2, 3, 0, 8)):
        assert _error(lambda: dtk.max_pool2d(x, 2)) == _error(lambda: F.max_pool2d(x, 2))
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
        dtk.max_pool2d(torch.ones(1, 1, 4, 4, dtype=torch.int64), 2)
    with pytest.raises(TypeError, match="kernel_size must be an int or a tuple of ints"):
        dtk.max_pool2d(rand(1, 1, 4, 4), 2.5)


def test_offsets_made_whenever_autograd_records():
    """return_offsets only asks for them as an output: a direct call without it still
    gets a working backward, since the autograd kernel makes them when it records."""
    x = rand(2, 3, 7, 7, requires_grad=True)
    out, _, off = torch.ops.dtkernels.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1])
    assert off.dtype == torch.int8 and off.shape == out.shape
    g = rand(*out.shape)
    (gi,) = torch.autograd.grad(out, x, g)
    assert_close(gi, _grad_ref(x, g, (3, 2, 1), False).float())
    with torch.no_grad():
        assert torch.ops.dtkernels.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1])[2].numel() == 0


@pytest.mark.parametrize("trace_grad", [True, False], ids=["trace_with_grad", "trace_no_grad"])
def test_jit_trace(trace_grad):
    """torch.jit.trace: the traced call must not depend on grad mode (the trace's own
    check reruns it), and a model traced for inference still trains."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), dtk.nn.MaxPool2d(3, 2, 1))
    x = rand(2, 3, 11, 9)
    with torch.set_grad_enabled(trace_grad):
        traced = torch.jit.trace(model, (x,))  # check_trace=True: reruns and compares graphs
    eager = torch.nn.Sequential(model[0], torch.nn.MaxPool2d(3, 2, 1))
    a, b = traced(x), eager(x)
    assert torch.equal(a, b)
    g = rand(*a.shape)
    ga = torch.autograd.grad(a, model[0].weight, g)[0]
    gb = torch.autograd.grad(b, model[0].weight, g)[0]
    assert torch.equal(ga, gb)


def test_module():
    for kw in ({}, {"stride": 1, "padding": 1, "dilation": 2}, {"return_indices": True, "ceil_mode": True}):
        m, t = dtk.nn.MaxPool2d(3, **kw), torch.nn.MaxPool2d(3, **kw)
        assert isinstance(m, torch.nn.MaxPool2d) and repr(m) == repr(t)
        x = _data((2, 3, 11, 9), torch.float32, "cpu")
        a, b = m(x), t(x)
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            _same(u, v)


@pytest.mark.skipif(INTERPRET, reason="compiles the real kernels; the interpreter replaces them")
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "fp64"])
def test_triton_kernels_compile_for_sm90(dtype):
    """Every Triton kernel lowers to sm_90 code with no GPU here (the interpreter alone
    would not catch type or lowering errors), with int32 and WIDE (int64) row or
    pixel indices. Below 2^31 rows or pixels the SASS calls no software routine (a
    64-bit division compiles to one: the flat-index kernels before these made three
    such calls per element; WIDE ones make one per row or pixel) and spills nothing."""
    pytest.importorskip("triton")
    from dtkernels.testing import compile_triton, cubin_facts
    from dtkernels.triton import max_pool2d as k

    p, fp64 = f"*{dtype}", dtype == "fp64"
    geo = dict(KH=3, KW=3, SH=2, SW=2, PH=1, PW=1, DH=1, DW=1)
    sizes = {"H": "i32", "W": "i32", "Ho": "i32", "Wo": "i32", "rows": "i32", "npix": "i32", "C": "i32"}
    fwd = {"x_ptr": p, "out_ptr": p, "idx_ptr": "*i64", "off_ptr": "*i8", **sizes}
    bwd = {"g_ptr": p, "off_ptr": "*i8", "gi_ptr": p, **sizes}
    nchw, nhwc = dict(BLOCK_H=8, BLOCK_W=64), dict(BLOCK_P=16, BLOCK_C=64)
    for wide in (False, True):
        for aligned, flags in [(True, dict(IDX=True, OFF=True)), (False, dict(IDX=False, OFF=False))]:
            fw, bw = {**geo, **flags, "WIDE": wide}, {**geo, "FP64": fp64, "WIDE": wide}
            compiled = {
                "fwd nchw": compile_triton(k._max_pool2d_nchw_kernel, fwd, {**fw, **nchw}, aligned=aligned),
                "fwd nhwc": compile_triton(k._max_pool2d_nhwc_kernel, fwd, {**fw, **nhwc}, aligned=aligned),
                "bwd nchw": compile_triton(k._max_pool2d_backward_nchw_kernel, bwd, {**bw, **nchw}, aligned=aligned),
                "bwd nhwc": compile_triton(k._max_pool2d_backward_nhwc_kernel, bwd, {**bw, **nhwc}, aligned=aligned),
            }
            if aligned and not fp64:  # 16-byte channel loads
                ptx = compiled["fwd nhwc"].asm["ptx"]
                assert "ld.global.v4" in ptx or "ld.global.v2" in ptx
            for name, c in compiled.items():
                f = cubin_facts(c)
                what = f"{name} wide={wide} aligned={aligned}"
                if not wide:
                    assert f["opcodes"]["CALL"] == 0 and f["stack"] == 0, what
                assert f["opcodes"]["LDG"] > 0 and f["opcodes"]["STG"] > 0, what
