"""concat_skip against dtkernels.reference (eager F.interpolate + torch.cat) on every
backend that runs here. Outputs are poisoned (conftest), so an element a kernel
forgets to write shows up as NaN."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import dtkernels as dtk
from dtkernels import reference as ref
from dtkernels.testing import assert_close, rand

from conftest import HAS_GPU, INTERPRET, assert_cuda_matches_cpu, device_for, same_bits, skip_unless_runs

CL = torch.channels_last
NCHW = torch.contiguous_format
# "bilinear-ac": bilinear with align_corners=True (_up).
MODES = [(None, 1), ("nearest", 1), ("nearest", 2), ("nearest", 3), ("bilinear", 1), ("bilinear", 2),
         ("bilinear", 3), ("bilinear-ac", 1), ("bilinear-ac", 2), ("bilinear-ac", 3)]
MODE_IDS = ["none", "nearest1", "nearest2", "nearest3", "bilinear1", "bilinear2", "bilinear3", "bilinear-ac1",
            "bilinear-ac2", "bilinear-ac3"]


def _up(mode):
    """(upsample, align_corners) of a test mode."""
    return ("bilinear", True) if mode == "bilinear-ac" else (mode, False)


def _interp_kwargs(mode):
    up, ac = _up(mode)
    return {"mode": up, **({"align_corners": ac} if up == "bilinear" else {})}
# (x format, skip format): both NCHW, both channels_last, mixed (the output is NCHW).
FORMATS = [pytest.param((NCHW, NCHW), id="nchw"), pytest.param((CL, CL), id="cl"),
           pytest.param((CL, NCHW), id="mixed")]


def _inputs(n, cx, cs, h, w, s, *, dtype=torch.float32, device="cpu", formats=(NCHW, NCHW), grad=True):
    x = rand(n, cx, h, w, dtype=dtype, device=device, memory_format=formats[0], requires_grad=grad)
    skip = rand(n, cs, h * s, w * s, dtype=dtype, device=device, memory_format=formats[1], requires_grad=grad)
    return x, skip


def _ref_fwd_bwd(x, skip, g, mode, s, skip_first=False):
    """The oracle in float64 (ATen's CPU kernels), for the same inputs."""
    xr = x.detach().cpu().double().requires_grad_()
    sr = skip.detach().cpu().double().requires_grad_()
    up, ac = _up(mode)
    out = ref.concat_skip(xr, sr, up, s, ac, skip_first)
    gx, gs = torch.autograd.grad(out, (xr, sr), g.detach().cpu().double())
    return out, gx, gs


def _expect_layout(out, x, skip):
    both_cl = all(t.is_contiguous(memory_format=CL) and not t.is_contiguous() for t in (x, skip))
    fmt = CL if both_cl else NCHW
    assert out.is_contiguous(memory_format=fmt), f"expected {fmt}, got strides {out.stride()}"


def _check(x, skip, mode, s, g=None, skip_first=False):
    up, ac = _up(mode)
    out = dtk.concat_skip(x, skip, upsample=up, scale_factor=s, align_corners=ac, skip_first=skip_first)
    g = rand(*out.shape, dtype=out.dtype, device=out.device) if g is None else g
    gx, gs = torch.autograd.grad(out, (x, skip), g)
    r, rgx, rgs = _ref_fwd_bwd(x, skip, g, mode, s, skip_first)
    dtype = x.dtype
    assert out.dtype == dtype and out.shape == r.shape
    assert gx.shape == x.shape and gs.shape == skip.shape
    assert_close(out, r.to(out.device), dtype=dtype)
    if mode == "bilinear-ac" and s >= 4 and dtype == torch.float32:
        # each x pixel sums up to (2s)^2 weighted terms: ATen's own float32 gradient
        # (which ours equals bit for bit) is ~1.7e-5 from float64 here
        assert_close(gx, rgx.to(out.device), rtol=1e-5, atol=5e-5)
    else:
        assert_close(gx, rgx.to(out.device), dtype=dtype)
    assert_close(gs, rgs.to(out.device), dtype=dtype)
    return out


@pytest.mark.parametrize("formats", FORMATS)
@pytest.mark.parametrize("mode,s", MODES, ids=MODE_IDS)
def test_forward_backward(backend_dtype, mode, s, formats):
    _, device, dtype = backend_dtype
    x, skip = _inputs(2, 3, 5, 3, 5, s, dtype=dtype, device=device, formats=formats)
    out = _check(x, skip, mode, s)
    _expect_layout(out, x, skip)


@pytest.mark.parametrize("formats", FORMATS)
@pytest.mark.parametrize("mode,s", [(None, 1), ("nearest", 2), ("bilinear", 2), ("bilinear-ac", 3)],
                         ids=["none", "nearest2", "bilinear2", "bilinear-ac3"])
def test_skip_first(backend_dtype, mode, s, formats):
    """cat([skip, up(x)], 1): the same values in the other channel order, and each
    gradient from its own part of the output gradient. Channel counts that leave
    channels_last packs straddling the skip/x boundary."""
    _, device, dtype = backend_dtype
    for cx, cs in [(3, 5), (8, 8), (5, 11)]:
        x, skip = _inputs(2, cx, cs, 3, 4, s, dtype=dtype, device=device, formats=formats)
        out = _check(x, skip, mode, s, skip_first=True)
        _expect_layout(out, x, skip)


@pytest.mark.skipif(INTERPRET, reason="larger shapes: too slow for the Triton interpreter")
@pytest.mark.parametrize("formats", FORMATS)
@pytest.mark.parametrize("mode,s", [(None, 1), ("nearest", 2), ("bilinear", 2), ("nearest", 3), ("bilinear", 4),
                                    ("bilinear-ac", 4)],
                         ids=["none", "nearest2", "bilinear2", "nearest3", "bilinear4", "bilinear-ac4"])
def test_larger_odd_shapes(backend, mode, s, formats):
    """Enough rows and pixels to split across threads/blocks mid-plane, odd W and C
    (no 16-byte packs), and channel counts that straddle a pack."""
    _, device = backend
    for n, cx, cs, h, w in [(3, 17, 9, 13, 21), (2, 8, 24, 16, 16), (1, 1, 1, 33, 1)]:
        x, skip = _inputs(n, cx, cs, h, w, s, device=device, formats=formats)
        _expect_layout(_check(x, skip, mode, s), x, skip)


@pytest.mark.parametrize("mode,s", [("nearest", 2), ("nearest", 3), ("bilinear", 1), ("bilinear", 2), ("bilinear", 3),
                                    ("bilinear", 4), ("bilinear", 8), ("bilinear-ac", 2), ("bilinear-ac", 3),
                                    ("bilinear-ac", 4)],
                         ids=["nearest2", "nearest3", "bilinear1", "bilinear2", "bilinear3", "bilinear4", "bilinear8",
                              "bilinear-ac2", "bilinear-ac3", "bilinear-ac4"])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", [(2, 4, 40, 50), (3, 1, 37, 29), (2, 2, 32, 131)], ids=["even", "odd", "wide"])
def test_bit_exact_with_aten_float32(backend, mode, s, fmt, shape):
    """float32 forward equals ATen's generic CPU kernel bit for bit (ATen's own
    channels_last and small-image paths round differently, by an ulp), and the
    backward equals ATen's CPU backward in every layout: same terms, same order,
    same fused multiply-adds, NaN and inf included. The odd shape's 111 rows split
    mid-plane between two threads. The CPU's NCHW bilinear backward takes planes a
    vector at a time for these, except the wide shape's periodic scales (2, 4, 8),
    whose long rows go column-vectorised."""
    name, device = backend
    if name == "reference":
        pytest.skip("the reference is ATen itself")
    if name == "triton" and not HAS_GPU:
        pytest.skip("the Triton interpreter rounds tl.fma twice (NumPy has no fma)")
    x = rand(*shape)  # H_out + W_out > 128: ATen's generic (not vectorised) path
    x[0, 0, 7, 9], x[1, -1, 20, 0] = float("inf"), float("nan")
    up = F.interpolate(x, scale_factor=s, **_interp_kwargs(mode))
    g = rand(*up.shape)
    g[0, 0, 0, 0], g[1, -1, 31, -2] = float("inf"), float("nan")
    xr = x.clone().requires_grad_()
    expected_gx = torch.autograd.grad(
        F.interpolate(xr.contiguous(memory_format=fmt), scale_factor=s, **_interp_kwargs(mode)),
        xr, g.contiguous(memory_format=fmt))[0]
    xd = x.to(device).contiguous(memory_format=fmt).requires_grad_()
    skip = torch.empty(shape[0], 0, *up.shape[2:], device=device).contiguous(memory_format=fmt)
    out = dtk.concat_skip(xd, skip, upsample=_up(mode)[0], scale_factor=s, align_corners=_up(mode)[1])
    (gx,) = torch.autograd.grad(out, (xd,), g.to(device).contiguous(memory_format=fmt))
    torch.testing.assert_close(out.cpu(), up, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(gx.cpu(), expected_gx, rtol=0, atol=0, equal_nan=True)


@pytest.mark.sanitize
@pytest.mark.parametrize("case", ["channel-slices", "transposed", "expanded", "misaligned", "odd-grad"])
@pytest.mark.parametrize("mode", [None, "nearest", "bilinear", "bilinear-ac"])
def test_strided_inputs(backend, case, mode):
    """Views that are neither NCHW nor channels_last, or not 16-byte aligned."""
    _, device = backend
    s = 1 if mode is None else 2
    n, cx, cs, h, w = 2, 3, 4, 3, 4
    g = None
    if case == "channel-slices":  # a DenseNet-style prefix of a bigger buffer, each format
        x = rand(n, cx + 2, h, w, device=device)[:, 1:1 + cx]
        skip = rand(n, cs + 3, h * s, w * s, device=device, memory_format=CL)[:, 2:2 + cs]
    elif case == "transposed":
        x = rand(n, cx, w, h, device=device).transpose(2, 3)
        skip = rand(n, cs, w * s, h * s, device=device).transpose(2, 3)
    elif case == "expanded":
        x = rand(1, cx, h, w, device=device).expand(n, -1, -1, -1)
        skip = rand(n, cs, h * s, w * s, device=device, memory_format=CL)
    elif case == "misaligned":
        x = rand(n * cx * h * w + 1, device=device)[1:].view(n, cx, h, w)
        skip = rand(n * cs * h * s * w * s + 1, device=device)[1:].view(n, cs, h * s, w * s)
    else:
        x, skip = _inputs(n, cx, cs, h, w, s, device=device, grad=False)
        g = rand(n, cx + cs, w * s, h * s, device=device).transpose(2, 3)
    x = x.detach().requires_grad_()
    skip = skip.detach().requires_grad_()
    _check(x, skip, mode, s, g)


@pytest.mark.skipif(INTERPRET, reason="larger shapes: too slow for the Triton interpreter")
@pytest.mark.parametrize("s", [2, 4])
def test_bilinear_backward_paths(backend_dtype, s):
    """Both NCHW bilinear backward paths of the CPU kernel in every dtype, against the
    float64 oracle: whole rows column-vectorised (periodic scales, from 64 or 128
    columns), and planes a vector at a time (short rows, or many planes), with plane
    counts that fill no whole vector and rows of no whole vector. (align_corners
    always takes planes, which every other bilinear test checks; its float32 source
    positions are too coarse for this tolerance on rows this wide, in ATen too.)"""
    _, device, dtype = backend_dtype
    for n, cx, h, w in [(1, 3, 5, 131), (2, 5, 4, 67), (1, 260, 2, 70), (3, 7, 6, 13)]:
        x, skip = _inputs(n, cx, 2, h, w, s, dtype=dtype, device=device)
        _check(x, skip, "bilinear", s)


def _emulation_inputs(dtype, device="cpu"):
    """Packs of every kind: output rows of whole 16-byte packs and not, channels_last
    packs inside x, across the x/skip boundary and inside skip; strided and
    misaligned views (made on `device`)."""
    g = torch.Generator().manual_seed(7)

    def r(*shape, fmt=NCHW):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=device).contiguous(memory_format=fmt)
    for n, cx, cs, h, w in [(2, 3, 5, 3, 4), (1, 8, 8, 2, 8), (2, 13, 6, 3, 5), (1, 16, 3, 4, 12)]:
        for fx, fs in [(NCHW, NCHW), (CL, CL), (CL, NCHW)]:
            for mode, s in MODES:
                yield r(n, cx, h, w, fmt=fx), r(n, cs, h * s, w * s, fmt=fs), mode, s
    for mode, s in [(None, 1), ("nearest", 2), ("bilinear", 2), ("bilinear-ac", 2)]:
        yield r(2, 9, 3, 8)[:, 1:6], r(2, 7, 3 * s, 8 * s, fmt=CL)[:, 2:6], mode, s  # channel slices
        yield r(2, 4, 8, 3).transpose(2, 3), r(2, 3, 8 * s, 3 * s).transpose(2, 3), mode, s
        yield (r(2 * 4 * 3 * 8 + 1)[1:].view(2, 4, 3, 8), r(2 * 3 * 3 * s * 8 * s + 1)[1:].view(2, 3, 3 * s, 8 * s),
               mode, s)  # misaligned


@pytest.mark.skipif(INTERPRET, reason="host code; the Triton run needs not repeat it")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=["f32", "f16", "bf16", "f64"])
def test_cuda_forward_code_on_the_host(dtype):
    """The CUDA forward's per-thread code (csrc/concat_skip.h: pack walk, 16-byte
    loads, pack-at-a-time upsampling), run on the host over every pack, gives the CPU
    kernel's bits."""
    for k, (x, skip, mode, s) in enumerate(_emulation_inputs(dtype)):
        up, ac = _up(mode)
        for first in (False, True):
            want = torch.ops.dtkernels._concat_skip(x, skip, up, s, ac, first)
            got = dtk._C._emulate_cuda_concat_skip(x, skip, up, s, ac, first)
            assert got.stride() == want.stride()
            assert same_bits(got, want), \
                f"input {k}: x {tuple(x.shape)} {x.stride()}, skip {tuple(skip.shape)} {skip.stride()}, {mode} x{s}" \
                f"{', skip first' if first else ''}"


def _emulation_grads(dtype, device="cpu"):
    """Gradients of up(x) for the adjoint: both formats, packed and odd widths, a
    transposed and a misaligned view."""
    g = torch.Generator().manual_seed(8)

    def r(*shape, fmt=NCHW):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=device).contiguous(memory_format=fmt)
    for n, c, h, w in [(2, 3, 3, 4), (1, 8, 2, 8), (2, 13, 3, 5), (1, 16, 4, 12)]:
        for fmt in (NCHW, CL):
            for mode, s in MODES:
                yield r(n, c, h * s, w * s, fmt=fmt), mode, s
    for mode, s in [("nearest", 2), ("bilinear", 2), ("nearest", 3), ("bilinear-ac", 3)]:
        yield r(2, 3, 8 * s, 3 * s).transpose(2, 3), mode, s
        yield r(2 * 3 * 3 * s * 8 * s + 1)[1:].view(2, 3, 3 * s, 8 * s), mode, s


def _bilinear_grads(dtype, device="cpu"):
    """More bilinear gradients for the adjoint's candidate packs: rows of several
    whole packs of every dtype (both edges' clamped sources in one row), both
    formats, align_corners or not, s = 2, 3, 4."""
    g = torch.Generator().manual_seed(9)
    for n, c, h, w in [(1, 3, 3, 24), (2, 16, 5, 16), (1, 8, 1, 32)]:
        for fmt in (NCHW, CL):
            for mode, s in [("bilinear", 2), ("bilinear-ac", 2), ("bilinear", 3), ("bilinear-ac", 4)]:
                t = torch.randn(n, c, h * s, w * s, generator=g).to(dtype=dtype, device=device)
                yield t.contiguous(memory_format=fmt), mode, s


@pytest.mark.skipif(INTERPRET, reason="host code; the Triton run needs not repeat it")
@pytest.mark.parametrize("shared", [False, True], ids=["default", "shared-packs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=["f32", "f16", "bf16", "f64"])
def test_cuda_backward_code_on_the_host(dtype, shared):
    """The CUDA adjoint's per-thread code, run on the host over every pack, gives the
    CPU kernel's bits (nearest NCHW packs at s = 2 from row packs included); also with
    bilinear packs by the candidate bilinear_pack (shared_packs), which shares the
    pack's weights and gradient loads."""
    for k, (g, mode, s) in enumerate([*_emulation_grads(dtype), *_bilinear_grads(dtype)]):
        if shared and mode not in ("bilinear", "bilinear-ac"):
            continue  # shared_packs changes bilinear packs only
        up, ac = _up(mode)
        want = torch.ops.dtkernels._concat_skip_backward(g, up, s, ac)
        got = dtk._C._emulate_cuda_concat_skip_backward(g, up, s, ac, shared)
        assert got.stride() == want.stride()
        assert same_bits(got, want), \
            f"input {k}: {tuple(g.shape)} {g.stride()}, {mode} x{s}"


_NEEDS_CUDA_KERNELS = pytest.mark.skipif(not HAS_GPU or "cuda" not in dtk.available_backends(),
                                         reason="needs a CUDA GPU and the CUDA kernels")


@pytest.mark.cuda
@_NEEDS_CUDA_KERNELS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_cuda_matches_the_cpu(dtype):
    """The CUDA kernels give the CPU kernels' bits and strides, forward and backward,
    on every input above: packs of every kind, strided and misaligned views."""
    for op, args in _cuda_calls(dtype):
        assert_cuda_matches_cpu(op, [args])


@pytest.mark.cuda
@pytest.mark.sanitize
@_NEEDS_CUDA_KERNELS
def test_cuda_memcheck():
    """Every seventh call above, and of the adjoint's candidate bilinear packs, for
    compute-sanitizer."""
    for op, args in _cuda_calls(torch.float16)[::7]:
        assert_cuda_matches_cpu(op, [args])
    assert_cuda_matches_cpu(_bilinear_candidate, _bilinear_candidate_calls(torch.float16)[::7])


@pytest.mark.cuda
@_NEEDS_CUDA_KERNELS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_cuda_bilinear_candidate_matches_the_cpu(dtype):
    """The adjoint's candidate bilinear packs (_C._cuda_concat_skip_backward_variant
    with shared_packs) give the CPU kernel's bits on the device."""
    assert_cuda_matches_cpu(_bilinear_candidate, _bilinear_candidate_calls(dtype), "pack_kernel")


def _bilinear_candidate(g, up, s, ac):
    """The CUDA adjoint with the candidate bilinear packs, or on the CPU the CPU kernel."""
    if g.is_cuda:
        return dtk._C._cuda_concat_skip_backward_variant(g, up, s, ac, True)
    return torch.ops.dtkernels._concat_skip_backward(g, up, s, ac)


def _bilinear_candidate_calls(dtype):
    grads = [*_emulation_grads(dtype, "cuda"), *_bilinear_grads(dtype, "cuda")]
    return [(g, "bilinear", s, m == "bilinear-ac") for g, m, s in grads if m in ("bilinear", "bilinear-ac")]


def _cuda_calls(dtype):
    fwd = [(torch.ops.dtkernels._concat_skip, (x, skip, _up(m)[0], s, _up(m)[1], first))
           for x, skip, m, s in _emulation_inputs(dtype, "cuda") for first in (False, True)]
    return fwd + [(torch.ops.dtkernels._concat_skip_backward, (g, _up(m)[0], s, _up(m)[1]))
                  for g, m, s in _emulation_grads(dtype, "cuda")]


def test_scale_factor_is_ignored_without_upsample(backend):
    _, device = backend
    x, skip = _inputs(2, 3, 4, 5, 6, 1, device=device, grad=False)
    assert torch.equal(dtk.concat_skip(x, skip, scale_factor=7), torch.cat([x, skip], 1))


@pytest.mark.sanitize
@pytest.mark.parametrize("mode", [None, "nearest", "bilinear"])
def test_empty(backend, mode):
    _, device = backend
    s = 1 if mode is None else 2
    for n, cx, cs in [(0, 3, 4), (2, 0, 4), (2, 3, 0)]:
        x, skip = _inputs(n, cx, cs, 3, 4, s, device=device)
        out = dtk.concat_skip(x, skip, upsample=mode, scale_factor=s)
        assert out.shape == (n, cx + cs, 3 * s, 4 * s)
        gx, gs = torch.autograd.grad(out, (x, skip), torch.ones_like(out))
        assert gx.shape == x.shape and gs.shape == skip.shape
        if gx.numel() and mode != "bilinear":
            assert torch.equal(gx, torch.full_like(gx, float(s * s)))


def test_inputs_not_modified(backend_dtype):
    _, device, dtype = backend_dtype
    for mode in (None, "nearest", "bilinear"):
        s = 1 if mode is None else 2
        x, skip = _inputs(2, 3, 4, 3, 5, s, dtype=dtype, device=device)
        out = dtk.concat_skip(x, skip, upsample=mode)
        g = rand(*out.shape, dtype=dtype, device=device)
        before = [t.detach().clone() for t in (x, skip, g)]
        out.backward(g)
        for b, t in zip(before, (x, skip, g)):
            assert torch.equal(b, t.detach())


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_backward_is_deterministic(backend, mode):
    _, device = backend
    x, skip = _inputs(2, 6, 3, 7, 9, 3, device=device, formats=(CL, CL))
    out = dtk.concat_skip(x, skip, upsample=mode, scale_factor=3)
    g = rand(*out.shape, device=device)
    first = torch.autograd.grad(out, (x, skip), g, retain_graph=True)
    second = torch.autograd.grad(out, (x, skip), g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_saves_nothing_and_gradients_are_views():
    """Backward keeps no tensor; skip's gradient (and x's without upsample) is a
    view of the output gradient, no kernel and no copy."""
    for mode, s in [(None, 1), ("nearest", 2)]:
        x, skip = _inputs(2, 3, 4, 5, 6, s)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = dtk.concat_skip(x, skip, upsample=mode, scale_factor=s)
        assert saved == []
        g = rand(*out.shape)
        gx, gs = torch.autograd.grad(out, (x, skip), g)
        assert gs.untyped_storage().data_ptr() == g.untyped_storage().data_ptr()
        assert (gx.untyped_storage().data_ptr() == g.untyped_storage().data_ptr()) == (mode is None)


@pytest.mark.parametrize("mode", [None, "nearest", "bilinear", "bilinear-ac"])
def test_opcheck(backend, mode):
    _, device = backend
    s = 1 if mode is None else 2
    mode, ac = _up(mode)
    samples = [
        _inputs(2, 3, 4, 3, 5, s, device=device),
        _inputs(2, 3, 4, 3, 5, s, device=device, formats=(CL, CL)),
        _inputs(1, 2, 3, 2, 2, s, device=device, formats=(CL, NCHW)),
    ]
    for x, skip in samples:
        for sample in ((x, skip), (x.detach(), skip.detach())):
            torch.library.opcheck(torch.ops.dtkernels.concat_skip.default, (*sample, mode, s, ac))
        torch.library.opcheck(torch.ops.dtkernels.concat_skip.default, (x, skip, mode, s, ac, True))
        torch.library.opcheck(torch.ops.dtkernels._concat_skip.default, (x.detach(), skip.detach(), mode, s, ac))
        g = rand(2, 3, 6, 10, device=device, memory_format=CL if x.is_contiguous(memory_format=CL) else None)
        for gg in (g, g.detach().requires_grad_()):
            torch.library.opcheck(torch.ops.dtkernels.concat_skip_backward.default, (gg, mode, s, ac))
        torch.library.opcheck(torch.ops.dtkernels._concat_skip_backward.default, (g.detach(), mode, s, ac))


def test_gradcheck_float64(backend):
    name, device = backend
    if device.type != "cpu":
        pytest.skip("float64 is claimed on the CPU only")
    if name == "triton":
        pytest.skip("gradcheck runs the kernels ~1000 times: too slow for the interpreter "
                    "(test_forward_backward checks the Triton gradients against float64)")
    for mode, s in [(None, 1), ("nearest", 2), ("bilinear", 2), ("bilinear", 3), ("bilinear-ac", 3)]:
        x, skip = _inputs(2, 2, 3, 3, 4, s, dtype=torch.float64)
        up, ac = _up(mode)
        f = lambda a, b: dtk.concat_skip(a, b, upsample=up, scale_factor=s, align_corners=ac)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, skip))
        assert torch.autograd.gradgradcheck(f, (x, skip))


def test_meta_and_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.empty(2, 3, 4, 5, device="meta").contiguous(memory_format=CL)
    skip = torch.empty(2, 6, 8, 10, device="meta").contiguous(memory_format=CL)
    out = dtk.concat_skip(x, skip, upsample="bilinear")
    assert out.device.type == "meta" and out.shape == (2, 9, 8, 10) and out.is_contiguous(memory_format=CL)
    with FakeTensorMode():
        a, b = torch.empty(4, 5, 6, 7), torch.empty(4, 2, 18, 21)
        assert dtk.concat_skip(a, b, upsample="nearest", scale_factor=3).shape == (4, 7, 18, 21)
        g = torch.empty(4, 5, 18, 21)
        assert torch.ops.dtkernels.concat_skip_backward(g, "nearest", 3).shape == (4, 5, 6, 7)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [None, "bilinear", "bilinear-ac", "bilinear-skip-first"])
def test_torch_compile_fullgraph(backend, mode):
    _, device = backend
    torch._dynamo.reset()
    first = mode == "bilinear-skip-first"
    up, ac = _up("bilinear" if first else mode)

    def decoder(x, skip, w):
        return dtk.concat_skip(x * w, skip, upsample=up, align_corners=ac, skip_first=first).relu().sum(dim=1)

    compiled = torch.compile(decoder, fullgraph=True)
    s = 1 if mode is None else 2
    x, skip = _inputs(2, 4, 3, 5, 6, s, device=device, formats=(CL, CL))
    w = rand(1, 4, 1, 1, device=device, requires_grad=True)
    out = compiled(x, skip, w)
    g = rand(*out.shape, device=device)
    grads = torch.autograd.grad(out, (x, skip, w), g)
    ref_out = decoder(x, skip, w)
    ref_grads = torch.autograd.grad(ref_out, (x, skip, w), g)
    assert_close(out, ref_out)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_errors(check_path):
    x, skip = _inputs(2, 3, 4, 5, 6, 2, grad=False)
    cs = dtk.concat_skip
    with pytest.raises(ValueError, match="4-D"):
        cs(x[0], skip[0], upsample="nearest")
    with pytest.raises(ValueError, match="same dtype"):
        cs(x, skip.double(), upsample="nearest")
    with pytest.raises(ValueError, match="same batch size, got 2 and 1"):
        cs(x, skip[:1], upsample="nearest")
    with pytest.raises(ValueError, match=r"x's spatial size \[5, 6\] times scale_factor 3 must equal skip's \[10, 12\]"):
        cs(x, skip, upsample="nearest", scale_factor=3)
    with pytest.raises(ValueError, match=r"x's spatial size \[5, 6\] must equal skip's \[10, 12\]"):
        cs(x, skip)
    with pytest.raises(ValueError, match="upsample must be None, 'nearest' or 'bilinear'"):
        cs(x, skip, upsample="bicubic")
    with pytest.raises(ValueError, match="scale_factor must be a positive integer"):
        cs(x, skip, upsample="nearest", scale_factor=0)
    for bad in (1.5, True, "2"):
        with pytest.raises(TypeError, match="scale_factor must be a positive integer"):
            cs(x, skip, upsample="nearest", scale_factor=bad)
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
        cs(x.long(), skip.long(), upsample="nearest")
    with pytest.raises(TypeError, match="must be a Tensor"):
        cs(x, 1.0)
    assert cs(x, skip, upsample="nearest", scale_factor=2.0).shape == (2, 7, 10, 12)
    for mode in (None, "nearest"):  # as F.interpolate: only interpolating modes take align_corners
        with pytest.raises(ValueError, match="align_corners=True needs upsample='bilinear'"):
            cs(x, skip if mode else rand(2, 4, 5, 6), upsample=mode, align_corners=True)
        with pytest.raises(ValueError, match="align_corners=True needs upsample='bilinear'"):
            torch.ops.dtkernels._concat_skip(x, skip, mode, 2, True)
        with pytest.raises(ValueError, match="align_corners=True needs upsample='bilinear'"):
            torch.ops.dtkernels._concat_skip_backward(skip, mode, 2, True)
    with pytest.raises(TypeError, match="align_corners must be a bool"):
        cs(x, skip, upsample="bilinear", align_corners=1)
    with pytest.raises(TypeError, match="skip_first must be a bool"):
        cs(x, skip, upsample="bilinear", skip_first="yes")
    assert torch.equal(cs(x, skip, upsample="bilinear", align_corners=None), cs(x, skip, upsample="bilinear"))
    # The native kernels check too (direct calls bypass the Python checks).
    with pytest.raises(ValueError, match="same batch size"):
        torch.ops.dtkernels._concat_skip(x, skip[:1], "nearest", 2)
    with pytest.raises(ValueError, match="must equal skip's"):
        torch.ops.dtkernels._concat_skip(x, skip, "bilinear", 3)
    with pytest.raises(ValueError, match="upsample must be None, 'nearest' or 'bilinear'"):
        torch.ops.dtkernels._concat_skip(x, skip, "area", 2)
    with pytest.raises(ValueError, match="multiple of scale_factor"):
        torch.ops.dtkernels._concat_skip_backward(rand(2, 3, 5, 6), "nearest", 2)
    # 4 * (2^62 + 2) wraps to 8 in int64: the check must not multiply (this wrote past
    # the output in the nearest NCHW kernel; found under AddressSanitizer).
    x4, s8 = rand(1, 1, 4, 4), rand(1, 1, 8, 8)
    for mode in ("nearest", "bilinear"):
        with pytest.raises(ValueError, match="must equal skip's"):
            cs(x4, s8, upsample=mode, scale_factor=2**62 + 2)
        with pytest.raises(ValueError, match="must equal skip's"):
            torch.ops.dtkernels._concat_skip(x4, s8, mode, 2**62 + 2)


@pytest.mark.triton
def test_triton_column_tiles_beyond_the_grid_are_a_clear_error():
    """The Triton kernels tile NCHW rows on the grid's second axis (at most 65535 tiles
    of 256): beyond, a clear error rather than a failed launch."""
    skip_unless_runs("triton")
    x = torch.empty(1, 1, 1, 65535 * 256 + 1, device=device_for("triton"))
    with dtk.use_backend("triton"), pytest.raises(RuntimeError, match="rows of more than 16776960 elements"):
        dtk.concat_skip(x, x)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_device_mismatch_is_an_error():
    x, skip = _inputs(2, 3, 4, 5, 6, 2, grad=False)
    with pytest.raises(RuntimeError, match="same device"):
        dtk.concat_skip(x.cuda(), skip, upsample="nearest")


def test_ops_are_registered():
    for op in ("concat_skip", "concat_skip_backward", "_concat_skip", "_concat_skip_backward"):
        assert isinstance(getattr(torch.ops.dtkernels, op).default, torch._ops.OpOverload)
    from dtkernels import backends

    assert backends.kernel("concat_skip", torch.device("cpu")) is torch.ops.dtkernels._concat_skip.default


def test_module():
    m = dtk.nn.ConcatSkip(upsample="bilinear", scale_factor=3)
    x, skip = _inputs(2, 3, 4, 2, 3, 3, grad=False)
    assert_close(m(x, skip), ref.concat_skip(x, skip, "bilinear", 3))
    assert "upsample='bilinear', scale_factor=3" in repr(m)
    m = dtk.nn.ConcatSkip(upsample="bilinear", scale_factor=4, align_corners=True)  # smp's DeepLabV3+ decoder
    x, skip = _inputs(2, 3, 4, 2, 3, 4, grad=False)
    want = torch.cat([torch.nn.UpsamplingBilinear2d(scale_factor=4)(x), skip], 1)
    assert_close(m(x, skip), want)
    assert "align_corners=True" in repr(m)
    with pytest.raises(ValueError):
        dtk.nn.ConcatSkip(upsample="area")
    with pytest.raises(ValueError):
        dtk.nn.ConcatSkip(upsample="nearest", align_corners=True)
    m = dtk.nn.ConcatSkip(upsample="bilinear", align_corners=True, skip_first=True)  # MONAI / milesial U-Net order
    x, skip = _inputs(2, 3, 4, 2, 3, 2, grad=False)
    want = torch.cat([skip, F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)], 1)
    assert_close(m(x, skip), want)
    assert "align_corners=True, skip_first=True" in repr(m)


@pytest.mark.skipif(INTERPRET, reason="compiles the real kernels; the interpreter replaces them")
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_triton_kernels_compile_for_sm90(dtype):
    """Every Triton kernel (each mode, both layouts) lowers to sm_90 code here."""
    pytest.importorskip("triton")
    from dtkernels.testing import compile_triton
    from dtkernels.triton import concat_skip as k

    p = f"*{dtype}"
    ints = {name: "i64" for name in ("R", "COLS", "C", "CX", "X0", "S0", "H", "W", "HI", "WI", "HO", "WO")}
    strides = {f"{t}s{i}": "i64" for t in "xsg" for i in range(4)}
    scales = {"sh": "fp64", "sw": "fp64"}
    fwd = {"x_ptr": p, "skip_ptr": p, "out_ptr": p, **ints, **strides, **scales}
    bwd = {"g_ptr": p, "gx_ptr": p, **ints, **strides, **scales}
    for mode, s, align in [(0, 1, False), (1, 2, False), (2, 2, False), (2, 3, False), (2, 4, True)]:
        for cl in (False, True):
            const = {"CL": cl, "MODE": mode, "S": s, "FP64": False, "ALIGN": align, "BLOCK": 2048,
                     "BLOCK_C": 64 if cl else 128}
            for kernel, sig in ((k._concat_skip_kernel, fwd), (k._concat_skip_backward_kernel, bwd)):
                c = compile_triton(kernel, sig, const, aligned=not (mode == 2 and cl))
                assert "cubin" in c.asm
    if dtype == "fp32":  # the skip rows are copied with 16-byte accesses
        c = compile_triton(k._concat_skip_kernel, fwd, {"CL": False, "MODE": 0, "S": 1, "FP64": False,
                                                        "ALIGN": False, "BLOCK": 2048, "BLOCK_C": 128})
        assert "st.global.v4" in c.asm["ptx"]
