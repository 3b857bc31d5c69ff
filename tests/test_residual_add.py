"""residual_add against dtkernels.reference on every backend that runs here."""
from __future__ import annotations

import pytest
import torch

import dtkernels as dtk
from dtkernels import reference as ref
from dtkernels.testing import assert_close, rand

from conftest import INTERPRET

CL = torch.channels_last
SHAPES = [(2, 3, 5, 7), (3, 17, 9, 11), (5, 123, 123), (1, 1, 1, 1), (7,), (2, 8, 16, 16)]
# channels_last is 4-D only
LAYOUTS = [pytest.param(s, f, id="x".join(map(str, s)) + ("-cl" if f else ""))
           for s in SHAPES for f in ([None, CL] if len(s) == 4 else [None])]


def _ref_fwd_bwd(x, fx, g, alpha, activation):
    xr = x.detach().double().requires_grad_()
    fr = fx.detach().double().requires_grad_()
    out = ref.residual_add(xr, fr, alpha, activation)
    gx, gf = torch.autograd.grad(out, (xr, fr), g.double())
    return out, gx, gf


@pytest.mark.parametrize("shape,memory_format", LAYOUTS)
@pytest.mark.parametrize("alpha,activation", [(1.0, "relu"), (0.5, "relu"), (1.0, None), (-2.0, None)],
                         ids=["a1-relu", "a.5-relu", "a1-none", "a-2-none"])
def test_forward_backward(backend_dtype, shape, memory_format, alpha, activation):
    _, device, dtype = backend_dtype
    x = rand(*shape, dtype=dtype, device=device, memory_format=memory_format, requires_grad=True)
    fx = rand(*shape, dtype=dtype, device=device, memory_format=memory_format, requires_grad=True)
    g = rand(*shape, dtype=dtype, device=device)
    out = dtk.residual_add(x, fx, alpha=alpha, activation=activation)
    gx, gf = torch.autograd.grad(out, (x, fx), g)
    r, rgx, rgf = _ref_fwd_bwd(x, fx, g, alpha, activation)
    assert out.dtype == dtype and out.shape == x.shape
    if memory_format is CL:
        assert out.is_contiguous(memory_format=CL), "output must keep channels_last"
    assert_close(out, r, dtype=dtype)
    assert_close(gx, rgx, dtype=dtype)
    assert_close(gf, rgf, dtype=dtype)


@pytest.mark.sanitize
@pytest.mark.parametrize("case", ["slice", "transpose", "mixed-formats", "expanded", "misaligned"])
def test_strided_inputs(backend, case):
    _, device = backend
    base = rand(4, 6, 10, 12, device=device)
    other = rand(4, 6, 10, 12, device=device)
    if case == "slice":
        x, fx = base[:, :, ::2, 1:7], other[:, :, 1::2, :6]
    elif case == "transpose":
        x, fx = base.transpose(2, 3), other.transpose(2, 3).contiguous()
    elif case == "mixed-formats":
        x, fx = base, other.contiguous(memory_format=CL)
    elif case == "expanded":  # a broadcast view that has the full shape
        x, fx = base, other[:1].expand(4, -1, -1, -1)
    else:  # dense, but one element off 16-byte alignment: the kernels' scalar paths
        x = torch.cat([base.flatten(), base.flatten()[:1]])[1:].view(4, 6, 10, 12)
        fx = torch.cat([other.flatten()[:1], other.flatten()])[1:].view(4, 6, 10, 12)
    x.requires_grad_(), fx.requires_grad_() if fx.is_leaf else None
    out = dtk.residual_add(x, fx, alpha=0.75)
    assert_close(out, ref.residual_add(x.detach(), fx.detach(), 0.75))
    assert out.stride() == torch.empty_like(x).stride(), "output takes x's layout"
    g = rand(*out.shape, device=device).transpose(0, 1).contiguous().transpose(0, 1)  # odd-strided grad
    (gx,) = torch.autograd.grad(out, (x,), g)
    assert_close(gx, g * (out > 0))


def test_inputs_not_modified(backend_dtype):
    _, device, dtype = backend_dtype
    x = rand(3, 4, 5, 6, dtype=dtype, device=device, requires_grad=True)
    fx = rand(3, 4, 5, 6, dtype=dtype, device=device, requires_grad=True)
    g = rand(3, 4, 5, 6, dtype=dtype, device=device)
    before = [t.detach().clone() for t in (x, fx, g)]
    out = dtk.residual_add(x, fx, alpha=0.5)
    out.backward(g)
    for b, t in zip(before, (x, fx, g)):
        assert torch.equal(b, t.detach())


def test_nan_and_inf(backend):
    _, device = backend
    x = torch.tensor([float("nan"), 1.0, -float("inf"), float("inf"), -1.0, 0.0], device=device)
    fx = torch.tensor([1.0, float("nan"), 1.0, -1.0, 0.5, -0.0], device=device)
    assert_close(dtk.residual_add(x, fx), ref.residual_add(x, fx))
    assert_close(dtk.residual_add(x, fx, activation=None), ref.residual_add(x, fx, activation=None))
    # Backward as eager relu's (threshold_backward): a NaN output passes its gradient;
    # fx's gradient is that times alpha (0 * alpha where blocked: -0, or NaN for inf).
    g = torch.arange(1.0, 7.0, device=device)
    for alpha in (1.0, 0.5, -2.0, float("inf")):
        ours = [t.clone().requires_grad_() for t in (x, fx)]
        eager = [t.clone().requires_grad_() for t in (x, fx)]
        dtk.residual_add(*ours, alpha=alpha).backward(g)
        torch.relu(eager[0] + alpha * eager[1]).backward(g)
        for a, b in zip(ours, eager):
            assert torch.equal(a.grad, b.grad), (alpha, a.grad, b.grad)


def test_alpha_overflow_is_atens_error(backend):
    """ATen converts alpha to the tensor's dtype on the CPU (float on CUDA) and raises
    when it overflows; infinite and NaN alphas pass."""
    _, device = backend
    for dtype, alpha, shape in ((torch.float16, 1e5, (2, 3)), (torch.bfloat16, -1e39, (2, 3)),
                                (torch.float32, 1e39, (2, 3)), (torch.float32, 1e39, (0, 3))):  # empty too
        x = rand(*shape, dtype=dtype, device=device)
        if device.type == "cpu" or dtype == torch.float32:
            with pytest.raises(RuntimeError) as want:
                torch.add(x, x, alpha=alpha)
            with pytest.raises(RuntimeError, match=str(want.value).splitlines()[0]):
                dtk.residual_add(x, x, alpha=alpha)
    from torch._subclasses.fake_tensor import FakeTensorMode

    # The fake kernel (what torch.compile traces) raises it too, by the device's rule:
    # 1e5 overflows float16 on the CPU; CUDA takes alpha as float, which 1e39 overflows.
    fake_dtype, fake_alpha = (torch.float16, 1e5) if device.type == "cpu" else (torch.float32, 1e39)
    with FakeTensorMode():
        fake = torch.empty(2, 3, dtype=fake_dtype, device=device)
        with pytest.raises(RuntimeError, match="without overflow"):
            torch.ops.dtkernels.residual_add(fake, fake, fake_alpha, True)
        if device.type != "cpu":  # and a 16-bit CUDA tensor takes 1e5, as ATen does
            half = torch.empty(2, 3, dtype=torch.float16, device=device)
            torch.ops.dtkernels.residual_add(half, half, 1e5, True)
    x = rand(2, 3, device=device)
    assert torch.equal(dtk.residual_add(x, x, alpha=float("inf")), torch.relu(torch.add(x, x, alpha=float("inf"))))
    assert dtk.residual_add(x, x, alpha=float("nan")).isnan().all()


@pytest.mark.skipif(INTERPRET, reason="the native CPU kernels against eager ATen")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_strided_inputs_match_eager_bit_for_bit(dtype):
    """Inputs without one shared dense layout take the element loop: x + alpha * fx
    rounds once there too (fma), as ATen and the flat kernels do. A double rounding
    was 1 ulp off on ~10% of elements, and gave inf or NaN where alpha * fx overflows."""
    big = torch.finfo(dtype).max / 1.5
    base = rand(6, 16, 9, 22, dtype=dtype)
    pairs = [(base[:, :, :, ::2], rand(6, 16, 9, 11, dtype=dtype)),
             (base.contiguous(memory_format=CL), rand(6, 16, 9, 22, dtype=dtype)),
             (rand(1, 16, 9, 22, dtype=dtype).expand(6, -1, -1, -1), base),
             (torch.full((4, 16), -big, dtype=dtype)[:, ::2], torch.full((4, 16), big, dtype=dtype)[:, ::2]),
             (torch.full((4, 16), -float("inf"), dtype=dtype)[:, ::2], torch.full((4, 16), big, dtype=dtype)[:, ::2])]
    for x, fx in pairs:
        for alpha in (0.1, 2.0, 3.0, -0.7):
            for act in ("relu", None):
                want = torch.add(x, fx, alpha=alpha)
                want = torch.relu(want) if act else want
                torch.testing.assert_close(dtk.residual_add(x, fx, alpha=alpha, activation=act), want,
                                           rtol=0, atol=0, equal_nan=True)


@pytest.mark.skipif(INTERPRET, reason="the native CPU kernels against eager ATen")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_16_bit_rounds_alpha_as_eager(dtype):
    """ATen's CPU add rounds alpha to the tensor's dtype, then computes in float with
    one rounding: equal bits (64-element multiples, where eager's vector path runs)."""
    x, fx = rand(4096, dtype=dtype), rand(4096, dtype=dtype)
    for alpha in (0.1, -0.7, 1 / 3, 2.5):
        for xs, fs in ((x, fx), (x.view(64, 64).t(), fx.view(64, 64).t())):
            assert torch.equal(dtk.residual_add(xs, fs, alpha=alpha, activation=None), torch.add(xs, fs, alpha=alpha))


@pytest.mark.sanitize
def test_empty(backend):
    _, device = backend
    x = rand(0, 3, 4, 4, device=device, requires_grad=True)
    out = dtk.residual_add(x, x.detach().clone())
    assert out.shape == (0, 3, 4, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_saves_only_the_output():
    """Backward keeps the output (for the ReLU mask), not the inputs."""
    x = rand(2, 3, 8, 8, requires_grad=True)
    fx = rand(2, 3, 8, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = dtk.residual_add(x, fx)
    assert len(saved) == 1 and saved[0].data_ptr() == out.data_ptr()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dtk.residual_add(x, fx, activation=None, alpha=3.0)
    assert saved == []


def test_alpha_one_shares_the_gradient():
    x = rand(2, 3, 8, 8, requires_grad=True)
    fx = rand(2, 3, 8, 8, requires_grad=True)
    gx, gf = torch.autograd.grad(dtk.residual_add(x, fx), (x, fx), rand(2, 3, 8, 8))
    assert gx.data_ptr() == gf.data_ptr(), "one gradient tensor serves both addends"


@pytest.mark.parametrize("relu", [True, False])
def test_opcheck(backend, relu):
    _, device = backend
    samples = [
        (rand(2, 3, 5, 7, device=device, requires_grad=True), rand(2, 3, 5, 7, device=device), 0.5),
        (rand(2, 3, 5, 7, device=device, memory_format=CL), rand(2, 3, 5, 7, device=device, memory_format=CL), 1.0),
        (rand(3, 9, device=device, requires_grad=True), rand(3, 9, device=device, requires_grad=True), -1.5),
    ]
    for x, fx, alpha in samples:
        torch.library.opcheck(torch.ops.dtkernels.residual_add.default, (x, fx, alpha, relu))
        y = torch.ops.dtkernels.residual_add(x.detach(), fx.detach(), alpha, relu)
        torch.library.opcheck(torch.ops.dtkernels.residual_add_backward.default, (rand(*y.shape, device=device), y, alpha))


def test_gradcheck_float64(backend):
    name, device = backend
    if device.type != "cpu":
        pytest.skip("float64 is claimed on the CPU only")
    x = rand(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    fx = rand(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    for alpha, act in [(1.0, "relu"), (0.3, "relu"), (-1.5, None)]:
        f = lambda a, b: dtk.residual_add(a, b, alpha=alpha, activation=act)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, fx))
        assert torch.autograd.gradgradcheck(f, (x, fx))


def test_meta_and_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.empty(2, 3, 8, 8, device="meta").contiguous(memory_format=CL)
    out = dtk.residual_add(x, x)
    assert out.device.type == "meta" and out.shape == x.shape and out.is_contiguous(memory_format=CL)
    with FakeTensorMode():
        a = torch.empty(4, 5, 6, 7)
        out = dtk.residual_add(a, a, alpha=2.0)
        assert out.shape == a.shape


@pytest.mark.slow
def test_torch_compile_fullgraph(backend):
    name, device = backend
    torch._dynamo.reset()

    def block(x, fx, w):
        return dtk.residual_add(x * w, fx, alpha=0.5).sum(dim=1)

    compiled = torch.compile(block, fullgraph=True)
    x = rand(2, 4, 6, 6, device=device, requires_grad=True)
    fx = rand(2, 4, 6, 6, device=device, requires_grad=True)
    w = rand(1, 4, 1, 1, device=device, requires_grad=True)
    out = compiled(x, fx, w)
    g = rand(*out.shape, device=device)
    grads = torch.autograd.grad(out, (x, fx, w), g)
    ref_out = block(x, fx, w)
    ref_grads = torch.autograd.grad(ref_out, (x, fx, w), g)
    assert_close(out, ref_out)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_errors(check_path):
    x = rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="same shape"):
        dtk.residual_add(x, rand(2, 3, 4, 5))
    with pytest.raises(ValueError, match="same shape"):
        dtk.residual_add(x, rand(1, 3, 4, 4))  # no broadcasting
    with pytest.raises(ValueError, match="same dtype"):
        dtk.residual_add(x, x.double())
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        dtk.residual_add(x, x, activation="gelu")
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
        dtk.residual_add(x.long(), x.long())
    with pytest.raises(TypeError, match="must be a Tensor"):
        dtk.residual_add(x, 1.0)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        dtk.residual_add(x, x, alpha=torch.tensor(2.0))
    with pytest.raises(ValueError, match="same shape"):  # the native kernel checks too
        torch.ops.dtkernels._residual_add(x, rand(2, 3, 4, 5), 1.0, True)


def test_module():
    m = dtk.nn.ResidualAdd(alpha=0.5)
    x, fx = rand(2, 3, 4, 4), rand(2, 3, 4, 4)
    assert_close(m(x, fx), ref.residual_add(x, fx, 0.5))
    assert "alpha=0.5" in repr(m)
    with pytest.raises(ValueError):
        dtk.nn.ResidualAdd(activation="tanh")


@pytest.mark.skipif(INTERPRET, reason="compiles the real kernels; the interpreter replaces them")
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "fp64"])
def test_triton_kernels_compile_for_sm90(dtype):
    """The Triton kernels lower to sm_90 code with no GPU here (the interpreter
    alone would not catch type or lowering errors)."""
    pytest.importorskip("triton")
    from dtkernels.testing import compile_triton
    from dtkernels.triton import residual_add as k

    p = f"*{dtype}"
    for kernel, name in ((k._residual_add_kernel, "alpha"), (k._residual_add_backward_kernel, "scale")):
        fn = kernel.fn  # the autotuner's JITFunction: alpha and scale launch as double
        assert {q.name: q.annotation_type for q in fn.params}[name] == "fp64"
    for relu, aligned in [(True, True), (False, False)]:
        c = compile_triton(k._residual_add_kernel, {"x_ptr": p, "fx_ptr": p, "out_ptr": p, "n": "i64", "alpha": "fp64"},
                           {"RELU": relu, "FP64": dtype == "fp64", "BLOCK": 2048}, aligned=aligned)
        assert "cubin" in c.asm
    c = compile_triton(k._residual_add_backward_kernel, {"g_ptr": p, "y_ptr": p, "gin_ptr": p, "n": "i64", "scale": "fp64"},
                       {"FP64": dtype == "fp64", "BLOCK": 2048})
    if dtype != "fp64":  # 16-byte vector accesses when aligned
        assert "ld.global.v4" in c.asm["ptx"] or "ld.global.v2" in c.asm["ptx"]


@pytest.mark.skipif(INTERPRET, reason="host code; the Triton run needs not repeat it")
def test_float16_f16c_kernels_match_the_clones():
    """float16 on a CPU with F16C runs its own kernels (eight conversions per
    instruction); they give the generic clones' bits: lengths around the 8-lane
    tails, NaN, -inf, -0, zero outputs, alpha != 1, relu or none, flat and strided."""
    if not dtk._C._set_cpu_f16c(True):
        pytest.skip("this CPU has no F16C")
    results = {}
    try:
        for on in (True, False):
            assert dtk._C._set_cpu_f16c(on) == on
            out = []
            for n in (1, 7, 8, 9, 31, 1000, 70001, 2**20 + 3):  # the last: FMA vs multiply-add shows
                x, fx, go = (torch.randn(n, generator=torch.Generator().manual_seed(n + k)).half() for k in range(3))
                x[::17], fx[::13], x[::19], fx[::23] = float("nan"), float("-inf"), -0.0, 0.0
                for alpha, act in ((1.0, True), (0.37, False), (-2.5, True)):
                    y = torch.ops.dtkernels._residual_add(x, fx, alpha, act)
                    out += [y, torch.ops.dtkernels._residual_add(x[::2], fx[::2], alpha, act),
                            torch.ops.dtkernels._residual_add_backward(go, y, alpha)]
            results[on] = out
    finally:
        dtk._C._set_cpu_f16c(True)
    assert len(results[True]) == len(results[False])
    for a, b in zip(results[True], results[False]):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
