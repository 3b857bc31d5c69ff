"""The backend registry, build info and packaging facts."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dtkernels as dtk
from dtkernels import backends
from dtkernels.testing import rand

from conftest import HAS_GPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ops_are_dispatcher_ops():
    names = dtk.build_info()["ops"]
    for op in ("residual_add", "residual_add_backward", "_residual_add", "_residual_add_backward"):
        assert op in names
        assert isinstance(getattr(torch.ops.dtkernels, op).default, torch._ops.OpOverload)


def test_available_backends():
    avail = dtk.available_backends()
    assert "cpu" in avail and "reference" in avail
    assert ("cuda" in avail) == (torch.cuda.is_available() and backends.cuda_kernels_built())


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        dtk.use_backend("tpu")


def test_use_backend_nests_and_restores():
    assert dtk.get_backend() == "auto"
    with dtk.use_backend("reference"):
        assert dtk.get_backend() == "reference"
        with dtk.use_backend("cpu"):
            assert dtk.get_backend() == "cpu"
        assert dtk.get_backend() == "reference"
    assert dtk.get_backend() == "auto"

    @dtk.use_backend("reference")
    def f():
        return dtk.get_backend()

    assert f() == "reference" and dtk.get_backend() == "auto"


@pytest.mark.skipif(backends.cuda_kernels_built(), reason="this build has CUDA kernels")
def test_cuda_backend_unavailable_is_an_error_not_a_fallback():
    with pytest.raises(RuntimeError, match="built without its CUDA kernels"):
        dtk.use_backend("cuda")


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="Triton can run here")
def test_triton_on_cpu_needs_the_interpreter():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dtk.use_backend("triton")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_backend_refuses_cuda_tensors():
    x = rand(2, 3, device="cuda")
    with dtk.use_backend("cpu"), pytest.raises(RuntimeError, match="runs CPU tensors only"):
        dtk.residual_add(x, x)


def test_auto_uses_the_cpu_kernel_on_cpu_tensors():
    assert backends.kernel("residual_add", torch.device("cpu")) is torch.ops.dtkernels._residual_add.default


def test_every_registered_op_has_a_cpp_route():
    assert sorted(backends._REGISTRY) == sorted(dtk._C._routed_ops())


@pytest.fixture
def python_lookups(monkeypatch):
    """Counts kernel lookups in the Python registry (every call that enters Python)."""
    calls = []
    real = backends._kernel

    def counting(op, device):
        calls.append(op)
        return real(op, device)

    monkeypatch.setattr(backends, "_kernel", counting)
    return calls


def _step(x, fx, inp, a, b):
    dtk.residual_add(x, fx).sum().backward()
    dtk.max_pool2d(inp, 3, 2, 1).sum().backward()
    dtk.concat_skip(a, b, upsample="bilinear").sum().backward()


def _step_inputs(device="cpu"):
    shapes = ((2, 3, 4, 4), (2, 3, 4, 4), (2, 3, 9, 9), (2, 3, 4, 4), (2, 2, 8, 8))
    return tuple(rand(*s, device=device, requires_grad=True) for s in shapes)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_native_path_never_enters_python(python_lookups, device):
    """auto: forward, routing and backward all stay in C++ (CUDA C++ on CUDA tensors)."""
    if device == "cuda" and "cuda" not in dtk.available_backends():
        pytest.skip("needs a CUDA GPU and the CUDA kernels")
    _step(*_step_inputs(device))
    assert python_lookups == []


def test_other_backends_route_through_the_registry(python_lookups):
    with dtk.use_backend("reference"):
        _step(*_step_inputs())
    assert sorted(set(python_lookups)) == ["concat_skip", "concat_skip_backward", "max_pool2d",
                                           "max_pool2d_backward", "residual_add", "residual_add_backward"]


def test_backward_runs_with_the_forwards_backend(python_lookups):
    x, fx = _step_inputs()[:2]
    with dtk.use_backend("reference"):
        out = dtk.residual_add(x, fx)
    out.sum().backward()  # under "auto", yet the reference backward runs
    assert python_lookups == ["residual_add", "residual_add_backward"]
    assert dtk.get_backend() == "auto"


def _calls():
    """One call of each public op as (name, fn(inputs) -> output, inputs)."""
    block = dtk.nn.DenseBlock(2, 3, 2).eval().requires_grad_(False)
    return [("residual_add", lambda a, b: dtk.residual_add(a, b), (rand(2, 3, 4, 4), rand(2, 3, 4, 4))),
            ("max_pool2d", lambda a: dtk.max_pool2d(a, 3, 2, 1), (rand(2, 3, 9, 9),)),
            ("concat_skip", lambda a, b: dtk.concat_skip(a, b, upsample="bilinear"),
             (rand(2, 3, 4, 4), rand(2, 2, 8, 8))),
            ("dense_block", block, (rand(2, 3, 5, 5),))]


@pytest.mark.parametrize("which", range(4), ids=["residual_add", "max_pool2d", "concat_skip", "dense_block"])
def test_autograd_records_exactly_when_needed(which):
    """The autograd kernels skip their Function when nothing needs recording, yet
    every input that requires grad still gets its gradient, and a forward-mode
    tangent is never dropped: the public functions carry it (through their ATen
    decomposition, tests/test_func.py) and the op itself refuses it."""
    name, f, inputs = _calls()[which]
    plain = f(*inputs)
    assert plain.grad_fn is None and not plain.requires_grad
    for i in range(len(inputs)):  # each input alone requiring grad
        args = [t.clone().requires_grad_(j == i) for j, t in enumerate(inputs)]
        out = f(*args)
        assert out.grad_fn is not None, (name, i)
        torch.testing.assert_close(out, plain, rtol=0, atol=0)
        out.backward(torch.ones_like(out))
        assert args[i].grad is not None and args[i].grad.abs().sum() > 0
        with torch.no_grad():
            assert f(*args).grad_fn is None
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = f(fwAD.make_dual(inputs[0], torch.ones_like(inputs[0])), *inputs[1:])
        assert fwAD.unpack_dual(dual).tangent is not None
        torch.testing.assert_close(fwAD.unpack_dual(dual).primal, plain, rtol=1e-6, atol=1e-6)
        with pytest.raises(RuntimeError, match="jvp is not implemented"):
            torch.ops.dtkernels.residual_add(fwAD.make_dual(inputs[0], torch.ones_like(inputs[0])), inputs[0])
    if name == "dense_block":  # the weights alone requiring grad
        w = f.denselayer2.conv2.weight.requires_grad_(True)
        f(*inputs).sum().backward()
        assert w.grad is not None and w.grad.abs().sum() > 0


# Each op's arguments as the Python wrapper passes them to the public op, good and bad.
_UNBOXED_CALLS = {
    "max_pool2d": [((rand(2, 3, 9, 9), (3, 3), (2, 2), (1, 1), (1, 1), False, False, True, True)),
                   ((rand(2, 8, 6, 7, memory_format=torch.channels_last), (2, 2), (2, 2), (0, 0), (1, 1), True,
                     True, False, False)),
                   ((rand(1, 2, 2, 2), (3, 3), (1, 1), (0, 0), (1, 1), False, False, False, False)),  # too small
                   ((rand(1, 2, 5, 5), (3, 3), (1, 1), (2, 2), (1, 1), False, False, False, False)),  # pad
                   ((torch.ones(1, 2, 5, 5, dtype=torch.int32), (2, 2), (2, 2), (0, 0), (1, 1), False, False, False,
                     False))],
    "residual_add": [(rand(2, 3, 4, 5), rand(2, 3, 4, 5), 0.5, True), (rand(2, 3), rand(3, 2), 1.0, True),
                     (rand(2, 3), rand(2, 3, dtype=torch.float64), 1.0, False)],
    "concat_skip": [(rand(2, 3, 4, 5), rand(2, 2, 8, 10), "bilinear", 2, False, False),
                    (rand(2, 3, 4, 5), rand(2, 2, 8, 10), "bilinear", 2, True, True),
                    (rand(2, 3, 4, 5), rand(2, 2, 4, 5), None, 2, False, True),
                    (rand(2, 3, 4, 5), rand(3, 2, 8, 10), "nearest", 2, False, False),
                    (rand(2, 3, 4, 5), rand(2, 2, 8, 10), "nearest", 2, True, False),
                    (rand(2, 3, 4, 5), rand(2, 2, 8, 10), "cubic", 2, False, False)],
}


def _outcome(fn, args):
    try:
        res = fn(*args)
    except Exception as e:  # noqa: BLE001 - the exception is the outcome compared
        return type(e), str(e)
    return tuple(res) if isinstance(res, (tuple, list)) else (res,)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("op", sorted(_UNBOXED_CALLS))
def test_unboxed_entries_match_torch_ops(op, backend):
    """_C._unboxed_<op> gives exactly torch.ops' results, and its errors: the same
    exception types and messages, from C++ checks and from Python kernels alike."""
    unboxed, boxed = getattr(dtk._C, f"_unboxed_{op}"), getattr(torch.ops.dtkernels, op).default
    errors = 0
    with dtk.use_backend(backend):
        for args in _UNBOXED_CALLS[op]:
            a, b = _outcome(unboxed, args), _outcome(boxed, args)
            if isinstance(b[0], type):
                errors += 1
                assert a == b, (op, a, b)
            else:
                assert len(a) == len(b)
                for u, v in zip(a, b):
                    assert u.stride() == v.stride()
                    torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True)
    assert errors >= 2


def test_public_functions_take_the_unboxed_entries(monkeypatch):
    calls = []
    for op in _UNBOXED_CALLS:
        real = getattr(dtk._C, f"_unboxed_{op}")
        monkeypatch.setattr(dtk._C, f"_unboxed_{op}", lambda *a, _real=real, _op=op: calls.append(_op) or _real(*a))
    _step(*_step_inputs())
    assert calls == ["residual_add", "max_pool2d", "concat_skip"]


class _Recorder(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class _Tagged(torch.Tensor):
    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})


_PUBLIC = ["dtkernels.residual_add.default", "dtkernels.max_pool2d.default", "dtkernels.concat_skip.default"]


def test_torch_function_modes_and_subclasses_see_the_public_ops():
    """__torch_function__ needs torch.ops' call: the unboxed entries must step aside."""
    with _Recorder() as mode:
        _step(*_step_inputs())
    assert [f for f in mode.seen if f.startswith("dtkernels.")] == _PUBLIC
    _Tagged.seen = []
    _step(*(t.as_subclass(_Tagged) for t in _step_inputs()))
    assert [f for f in _Tagged.seen if f.startswith("dtkernels.") and "backward" not in f] == _PUBLIC


def test_dispatch_modes_see_the_public_ops():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen() as mode:
        _step(*_step_inputs())
    assert [f for f in mode.ops if f in _PUBLIC] == _PUBLIC


def test_vmap_matches_per_example_calls():
    """Under torch.vmap the public functions run their ATen decompositions (ATen's
    batching rules; tests/test_func.py): each example's result is that example's own
    call's, exactly, except the bilinear upsample, where ATen's vectorised kernel
    and ours differ by about an ulp (README)."""
    xb = rand(4, 2, 3, 9, 9)
    calls = [(lambda t: dtk.max_pool2d(t, 3, 2, 1), 0), (lambda t: dtk.residual_add(t, t * 2), 0),
             (lambda t: dtk.concat_skip(t[:, :2, :3, :3], t, upsample="bilinear", scale_factor=3), 1e-6)]
    for f, tol in calls:
        want = torch.stack([f(t) for t in xb])
        torch.testing.assert_close(torch.vmap(f)(xb), want, rtol=tol, atol=tol)
        torch.testing.assert_close(torch.vmap(f, in_dims=1)(xb.transpose(0, 1).contiguous()), want, rtol=tol,
                                   atol=tol)


# ---- torch.autocast ---------------------------------------------------------------------
# The ops that join two tensors follow torch.cat's autocast policy ("promote"): an
# autocast-made 16-bit tensor next to a float32 one meets it in float32. Outside
# autocast a dtype mismatch stays an error. Single-input max_pool2d passes through.

_JOINS = {
    "residual_add": (lambda a, b: dtk.residual_add(a, b, alpha=0.5), lambda a, b: torch.relu(a + 0.5 * b),
                     (2, 6, 5, 7), (2, 6, 5, 7)),
    "concat_skip": (lambda a, b: dtk.concat_skip(a, b, upsample="bilinear"),
                    lambda a, b: torch.cat([F.interpolate(a, scale_factor=2, mode="bilinear"), b], 1),
                    (2, 6, 5, 7), (2, 3, 10, 14)),
}
_GPU = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", _GPU])
@pytest.mark.parametrize("dtypes", [("low", "f32"), ("f32", "low"), ("bf16", "f16")])
@pytest.mark.parametrize("op", sorted(_JOINS))
def test_autocast_promotes_mixed_dtypes_as_torch_cat(op, dtypes, device):
    ours, eager, sa, sb = _JOINS[op]
    low = torch.bfloat16 if device == "cpu" else torch.float16
    names = {"low": low, "f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
    a = rand(*sa, dtype=names[dtypes[0]], device=device, requires_grad=True)
    b = rand(*sb, dtype=names[dtypes[1]], device=device, requires_grad=True)
    with pytest.raises(ValueError, match="must have the same dtype"):
        ours(a, b)
    with torch.autocast(device, dtype=low):
        out = ours(a, b)
        if "low" in dtypes:  # ATen's autocast rejects float16 with bfloat16; ours promotes as eager does
            assert eager(a.detach(), b.detach()).dtype == torch.float32
    assert out.dtype == torch.promote_types(a.dtype, b.dtype) == torch.float32
    a32, b32 = (t.detach().float().requires_grad_() for t in (a, b))
    want = ours(a32, b32)
    assert torch.equal(out, want)
    g = rand(*out.shape, device=device)
    out.backward(g)
    want.backward(g)
    for t, t32 in ((a, a32), (b, b32)):  # each gradient in its input's dtype, through the cast
        assert t.grad.dtype == t.dtype and torch.equal(t.grad, t32.grad.to(t.dtype))


@pytest.mark.parametrize("op", sorted(_JOINS))
def test_autocast_leaves_matching_dtypes_and_max_pool2d_alone(op):
    ours, _, sa, sb = _JOINS[op]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a, b = rand(*sa, dtype=dtype), rand(*sb, dtype=dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ours(a, b)
            pooled = dtk.max_pool2d(a, 2)
        assert out.dtype == pooled.dtype == dtype
        assert torch.equal(out, ours(a, b)) and torch.equal(pooled, F.max_pool2d(a, 2))


@pytest.mark.slow
def test_autocast_under_torch_compile():
    """A U-Net-like step under autocast, compiled: the conv's bfloat16 output and a
    float32 skip meet in float32, as in eager."""
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    x, skip = rand(2, 3, 6, 6), rand(2, 5, 12, 12)

    def step(x, skip):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
            return dtk.residual_add(y, y.float()), dtk.concat_skip(y, skip, upsample="nearest")

    got, want = torch.compile(step, fullgraph=True)(x, skip), step(x, skip)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, **env}
    e.pop("TRITON_INTERPRET", None) if "TRITON_INTERPRET" not in env else None
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, cwd=ROOT)


def test_environment_variable_sets_the_backend():
    p = _run("import dtkernels as d, torch; x = torch.randn(3); print(d.get_backend(), d.residual_add(x, x).shape)",
             DTKERNELS_BACKEND="reference")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[0] == "reference"


def test_bad_environment_variable_is_a_clear_error():
    p = _run("import dtkernels as d, torch; x = torch.randn(3); d.residual_add(x, x)", DTKERNELS_BACKEND="gpu")
    assert p.returncode != 0 and "unknown backend 'gpu'" in p.stderr


def test_importing_dtkernels_does_not_import_triton():
    p = _run("import sys, dtkernels; print('triton' in sys.modules)")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"


def test_build_info_and_cli():
    info = dtk.build_info()
    for key in ("version", "torch_built_with", "torch_runtime", "compiler", "openmp", "cuda",
                "cuda_arch_flags", "triton", "available_backends", "cpu_isa_selected"):
        assert key in info, key
    assert info["openmp"], "the CPU kernels must be built with OpenMP (at::parallel_for)"
    p = subprocess.run([sys.executable, "-m", "dtkernels", "info"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "torch_built_with" in p.stdout and "available_backends" in p.stdout


def test_fast_divmod_is_exact():
    """FastDivmod, the CUDA kernels' multiply-shift division (csrc/common.h; host code
    computes the same bits), against integer division: numerators up to 2^31 - 1,
    divisors from 1 to 2^31 - 1, powers of two and their neighbours."""
    g = torch.Generator().manual_seed(0)
    top = 2**31 - 1
    edges = torch.tensor([0, 1, 2, 3, top - 1, top], dtype=torch.int64)
    divisors = [1, 2, 3, 5, 7, 56, 112, top - 1, top] + [2**k + e for k in range(1, 31) for e in (-1, 0, 1)]
    divisors += torch.randint(1, top, (200,), generator=g).tolist()
    for d in divisors:
        multiples = d * torch.arange(0, 3)
        n = torch.cat([edges, torch.randint(0, top, (500,), generator=g), multiples, multiples + d - 1])
        n = n[(n >= 0) & (n <= top)]
        assert torch.equal(dtk._C._fast_divmod(n, d), n // d), f"divisor {d}"


def _triton_launcher_calls():
    """One call of each Triton launcher kind; two shapes of one kernel (two autotune keys).
    The set-up's forwards (for the offsets) tune keys of their own: no case repeats one."""
    from dtkernels.triton import concat_skip as tc
    from dtkernels.triton import max_pool2d as tm
    from dtkernels.triton import residual_add as tr

    geo = ((3, 3), (2, 2), (1, 1), (1, 1))
    x, x2 = rand(2, 5, 9, 11), rand(1, 3, 16, 7)
    xc = rand(2, 5, 9, 11, memory_format=torch.channels_last)
    _, _, off = tm.max_pool2d(x, *geo, False, False, False, True)
    _, _, offc = tm.max_pool2d(xc, *geo, False, True, False, True)
    g = rand(*off.shape)
    gc = g.contiguous(memory_format=torch.channels_last)
    y = rand(3, 4, 5, 6)
    small, skip, gup = rand(1, 4, 3, 5), rand(1, 2, 6, 10), rand(1, 6, 6, 10)[:, :4]
    return {
        "max_pool2d": lambda: tm.max_pool2d(x, *geo, False, False, True, True),
        "max_pool2d other shape": lambda: tm.max_pool2d(x2, *geo, False, False, True, True),
        "max_pool2d channels_last": lambda: tm.max_pool2d(xc, *geo, False, True, True, True),
        "max_pool2d_backward": lambda: tm.max_pool2d_backward(g, off, x.shape, *geo, False),
        "max_pool2d_backward channels_last": lambda: tm.max_pool2d_backward(gc, offc, x.shape, *geo, True),
        "residual_add": lambda: tr.residual_add(y, y, 0.5, True),
        "residual_add other size": lambda: tr.residual_add(y[:2], y[:2], 0.5, True),
        "residual_add_backward": lambda: tr.residual_add_backward(y, y, 0.5),
        "concat_skip": lambda: tc.concat_skip(small, skip, "nearest", 2),
        "concat_skip_backward": lambda: tc.concat_skip_backward(gup, "bilinear", 2),
    }


def _check_triton_fast_path(seed: int = 0) -> None:
    """test_triton_launches_skip_the_autotuner_once_it_has_picked's body, run in a
    process with every autotune config (the suite keeps one, conftest.py)."""
    import random

    import triton

    from dtkernels.testing import fake_cuda_driver
    from dtkernels.triton import max_pool2d as tm

    autotuner = triton.runtime.autotuner.Autotuner
    entered = []
    run = autotuner.run
    autotuner.run = lambda self, *a, **k: (entered.append(self), run(self, *a, **k))[1]
    rng = random.Random(seed)  # random config timings: keys pick different configs
    with fake_cuda_driver(bench_ms=lambda config: rng.random()) as launches:
        calls = _triton_launcher_calls()
        picked = {}
        for name, call in calls.items():  # first calls: the autotuner benchmarks and launches
            before = len(entered)
            call()
            assert len(entered) > before, name
            picked[name] = launches[-1]
        del entered[:]
        for name, call in calls.items():  # again: straight to the JIT function
            del launches[:]
            call()
            assert len(launches) == 1 and launches[0].same_as(picked[name]), name
        assert not entered
    # the test has teeth: the two shapes of one kernel picked different configs
    assert len({tuple(sorted(c.items())) for c in tm._max_pool2d_nchw_kernel._picked.values()}) > 1
    t = rand(4)
    assert tm._max_pool2d_nchw_kernel.picked(t, t, t, t, 12345, 9, 9, 5, 5, KH=3, KW=3, SH=2, SW=2) is None


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="the fake driver runs where no GPU is, on compiled (not interpreted) kernels")
def test_triton_launches_skip_the_autotuner_once_it_has_picked():
    """After the autotuner has picked a config for a key, the launchers hand Triton
    the very launch the autotuner would (same compiled kernel, grid and arguments)
    without entering it; each key keeps its own pick (dtkernels.triton._utils._Tuned).
    Triton's real host path runs, compiling for sm_90; only the driver is faked."""
    pytest.importorskip("triton")
    env = dict(os.environ, DTK_TRITON_AUTOTUNE="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", "import test_backends as t; t._check_triton_fast_path()"],
                       cwd=os.path.join(ROOT, "tests"), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
