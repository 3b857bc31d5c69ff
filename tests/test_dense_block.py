"""dtkernels.nn.DenseBlock against a torchvision-layout block (dtkernels.reference.
TorchvisionDenseBlock, a transcription of torchvision's _DenseBlock): outputs, the
gradients of the input and of every parameter, running statistics, state_dicts
both ways, and what autograd saves."""
from __future__ import annotations

import pytest
import torch

import dtkernels as dtk
from dtkernels.reference import TorchvisionDenseBlock
from dtkernels.testing import assert_close, rand, saved_tensor_bytes

from conftest import HAS_GPU

CL = torch.channels_last
NCHW = torch.contiguous_format


def _pair(layers=3, c0=5, growth=4, bn_size=2, *, dtype=torch.float64, device="cpu", seed=0):
    """A torchvision-layout block with non-trivial BN parameters and running
    statistics, and a DenseBlock loaded from its state_dict."""
    torch.manual_seed(seed)
    tv = TorchvisionDenseBlock(layers, c0, bn_size, growth)
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    ours = dtk.nn.DenseBlock(layers, c0, growth, bn_size)
    ours.load_state_dict(tv.state_dict())
    return tv.to(device=device, dtype=dtype), ours.to(device=device, dtype=dtype)


def _step(block, x, g):
    out = block(x)
    return out, torch.autograd.grad(out, [x, *block.parameters()], g)


def _running(block):
    """Per layer: norm1's running mean and var, norm2's (dense_block's eval input)."""
    return [t for layer in block.children() for bn in (layer.norm1, layer.norm2)
            for t in (bn.running_mean, bn.running_var)]


def _compare(tv, ours, x, *, steps=2, grad_tol=None):
    """Outputs (values and strides), gradients of the input and every parameter,
    then the state (running statistics, batch counters) after `steps` steps; the
    second step sees the first one's running statistics."""
    dtype = x.dtype
    for _ in range(steps):
        xt = x.detach().clone().requires_grad_()
        xo = x.detach().clone().requires_grad_()
        ref_out = tv(xt)
        g = rand(*ref_out.shape, dtype=dtype, device=x.device)
        ref_grads = torch.autograd.grad(ref_out, [xt, *tv.parameters()], g)
        out, grads = _step(ours, xo, g)
        assert out.shape == ref_out.shape and out.stride() == ref_out.stride()
        assert_close(out, ref_out, dtype=dtype)
        for name, a, b in zip(["input"] + [n for n, _ in tv.named_parameters()], grads, ref_grads):
            assert_close(a, b, dtype=dtype, msg=f"gradient of {name}", **(grad_tol or {}))
    for (name, a), b in zip(ours.state_dict().items(), tv.state_dict().values()):
        if a.is_floating_point():
            assert_close(a, b, dtype=dtype, msg=name)
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_matches_torchvision_layout_float64(fmt, train):
    tv, ours = _pair()
    tv.train(train)
    ours.train(train)
    _compare(tv, ours, rand(3, 5, 6, 7, dtype=torch.float64, memory_format=fmt))


@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_matches_torchvision_layout_float32(fmt, train):
    tv, ours = _pair(4, 16, 8, 4, dtype=torch.float32)
    tv.train(train)
    ours.train(train)
    # Four BN-ReLU-conv layers deep, float32 rounds differently in ATen's batch-norm
    # statistics (double) and ours (shared per channel): gradients agree to ~1e-5.
    _compare(tv, ours, rand(4, 16, 9, 10, memory_format=fmt), grad_tol={"rtol": 1e-4, "atol": 1e-4})


def test_momentum_none_is_a_cumulative_average():
    tv, ours = _pair()
    for m in (*tv.modules(), *ours.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    _compare(tv, ours, rand(2, 5, 4, 4, dtype=torch.float64), steps=3)


def test_state_dict_loads_both_ways():
    tv, ours = _pair(dtype=torch.float32)
    assert list(ours.state_dict()) == list(tv.state_dict())
    assert "denselayer1.norm1.weight" in ours.state_dict() and "denselayer3.conv2.weight" in ours.state_dict()
    assert [n for n, _ in ours.named_children()] == ["denselayer1", "denselayer2", "denselayer3"]
    assert [n for n, _ in ours.denselayer2.named_children()] == ["norm1", "relu1", "conv1", "norm2", "relu2", "conv2"]
    back = TorchvisionDenseBlock(3, 5, 2, 4)
    back.load_state_dict(ours.state_dict())  # strict: same keys and shapes
    for a, b in zip(back.state_dict().values(), tv.state_dict().values()):
        assert torch.equal(a, b)


def _saved(block, x):
    """Bytes of the distinct storages autograd saves in the forward, parameters and
    buffers left out (both blocks save their weights alike)."""
    return saved_tensor_bytes(lambda: block(x), exclude=[*block.parameters(), *block.buffers()])


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_saves_the_buffer_once_and_linear_memory(train):
    """The issue's block (12 layers, 64 in, growth 32), on a small image: every
    activation scales with N*H*W alike, so the ratio is the target shape's."""
    tv, ours = _pair(12, 64, 32, 4, dtype=torch.float32)
    tv.train(train)
    ours.train(train)
    x = rand(2, 64, 6, 6, requires_grad=True)
    tv_bytes, _, _ = _saved(tv, x)
    ours_bytes, storages, out = _saved(ours, x)
    assert ours_bytes <= 0.35 * tv_bytes, (ours_bytes, tv_bytes)
    # Exactly the output buffer (once), 12 bottlenecks of bn_size * growth = 128
    # channels, and in training six per-channel statistics vectors.
    assert len(storages) == 1 + 12 + (6 if train else 0)
    assert storages[out.untyped_storage().data_ptr()] == out.numel() * 4
    pixel_bytes = 2 * 6 * 6 * 4
    stats_bytes = 3 * 4 * (448 - 32 + 12 * 128) if train else 0
    assert ours_bytes == (448 + 12 * 128) * pixel_bytes + stats_bytes


def test_backward_accumulates_into_one_buffer():
    """No concatenation in either direction: the forward never calls cat, and
    backward neither splits nor concatenates."""
    _, ours = _pair(dtype=torch.float32)
    x = rand(2, 5, 4, 4, requires_grad=True)
    with torch.profiler.profile() as prof:
        ours(x).sum().backward()
    names = {e.name for e in prof.events()}
    assert "aten::cat" not in names and "aten::split" not in names, sorted(n for n in names if "cat" in n)


def test_inputs_not_modified_and_deterministic():
    _, ours = _pair(dtype=torch.float32)
    x = rand(2, 5, 4, 4, requires_grad=True)
    before = x.detach().clone()
    out = ours(x)
    g = rand(*out.shape)
    first = torch.autograd.grad(out, [x, *ours.parameters()], g, retain_graph=True)
    second = torch.autograd.grad(out, [x, *ours.parameters()], g)
    assert torch.equal(x.detach(), before)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(train):
    _, ours = _pair(2, 3, 2, 2)
    weights = [p.detach().clone().requires_grad_() for p in ours.parameters()]
    running = [] if train else _running(ours)
    x = rand(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x, *w):
        return dtk.ops.dense_block.dense_block(x, list(w), running, 2, train)[0]

    assert torch.autograd.gradcheck(f, (x, *weights))


def test_opcheck():
    _, ours = _pair(2, 3, 2, 2, dtype=torch.float32)
    weights = [p.detach().clone().requires_grad_() for p in ours.parameters()]
    # Mixed precision (what the autocast kernel passes): bfloat16 conv weights.
    mixed = [w.detach().bfloat16().requires_grad_() if k % 6 in (2, 5) else w for k, w in enumerate(weights)]
    for fmt in (NCHW, CL):
        x = rand(2, 3, 4, 5, memory_format=fmt, requires_grad=True)
        for running, train in (([], True), (_running(ours), False)):
            for w in (weights, mixed):
                torch.library.opcheck(torch.ops.dtkernels.dense_block.default, (x, w, running, 2, train, 1e-5))


def test_double_backward_is_a_clear_error():
    _, ours = _pair(dtype=torch.float32)
    x = rand(2, 5, 4, 4, requires_grad=True)
    (gx,) = torch.autograd.grad(ours(x).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gx.sum().backward()


def test_backward_op_checks_its_lists():
    """Autograd passes the forward's own lists; direct calls of the backward op with
    wrong ones are clear errors (they indexed past the lists: a null dereference)."""
    block = dtk.nn.DenseBlock(2, 4, 3, bn_size=2)
    x = rand(2, 4, 5, 5)
    weights = [p.detach() for p in block.parameters()]
    out, bottlenecks, stats = torch.ops.dtkernels.dense_block(x, weights, [], 3, True, 1e-5)
    bwd = torch.ops.dtkernels.dense_block_backward
    g = rand(*out.shape)
    gx, gw = bwd(g, out, bottlenecks, stats, weights, [], 3, True, 1e-5)
    assert gx.shape == x.shape and len(gw) == len(weights)
    bad = [
        (g, out, bottlenecks[:1], [], [], [], 3, True, "bottlenecks expected"),
        (g, out, bottlenecks, stats[:5], weights, [], 3, True, "bottlenecks expected"),
        (g, out, bottlenecks, stats, weights[:6], [], 3, True, "bottlenecks expected"),
        (g, out, bottlenecks, [], weights, [], 3, False, "bottlenecks expected"),
        (g[:, :5], out, bottlenecks, stats, weights, [], 3, True, "grad_out must match"),
        (g, out, bottlenecks, stats, weights, [], 5, True, "cannot hold"),
        (g, out, [b[:, :3] for b in bottlenecks], stats, weights, [], 3, True, "bottlenecks must be"),
        (g, out, bottlenecks, [s[:2] for s in stats], weights, [], 3, True, "statistic 0 must be"),
    ]
    for *args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            bwd(*args, 1e-5)


def test_errors():
    block = dtk.nn.DenseBlock(2, 4, 3)
    with pytest.raises(ValueError, match="4-D"):
        block(rand(4, 5, 5))
    with pytest.raises(ValueError, match="layer 1 expects 4 input channels, but x has 6"):
        block(rand(2, 6, 5, 5))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        block(rand(1, 4, 1, 1))
    with pytest.raises(ValueError, match="must match x's dtype"):
        block(rand(2, 4, 5, 5, dtype=torch.float64))
    weights = [p.detach() for p in block.parameters()]
    for bad in ({2: torch.float16, 5: torch.bfloat16}, {0: torch.bfloat16}, {2: torch.float64, 5: torch.float64}):
        w = [t.to(bad[k % 6]) if k % 6 in bad else t for k, t in enumerate(weights)]
        with pytest.raises(ValueError, match="conv weights may instead all be one 16-bit dtype"):
            torch.ops.dtkernels.dense_block(rand(2, 4, 5, 5), w, [], 3, True, 1e-5)
    with pytest.raises(ValueError, match="positive"):
        dtk.nn.DenseBlock(0, 4, 3)
    assert "num_layers=2, in_channels=4, growth_rate=3, bn_size=4" in repr(block)
    assert block.out_channels == 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_16_bit(dtype):
    """Runs in 16-bit and stays near the float32 computation of the same block."""
    tv, ours = _pair(2, 8, 4, 2, dtype=torch.float32)
    x = rand(2, 8, 5, 5)
    ref = tv(x)
    out = ours.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in ours.parameters())


def _near(a, b, rel, what):
    """Within rel of b's norm: elementwise tolerances fail 16-bit on near-zero entries."""
    err = (a.float() - b.float()).norm() / b.float().norm()
    assert err <= rel, f"{what}: relative error {err:.3g} > {rel}"


@pytest.mark.parametrize("x_dtype", [torch.float32, "low"], ids=["x32", "xlow"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_autocast_mixed_precision(dtype, train, x_dtype):
    """Under torch.autocast, mixed precision as a torchvision-layout block gets it:
    16-bit convolutions, float32 batch norms and buffer. Outputs, gradients (in each
    parameter's float32) and running statistics stay near that block's under the same
    autocast, and the bottlenecks are saved in 16 bits."""
    tv, ours = _pair(3, 8, 4, 2, dtype=torch.float32)
    tv.train(train)
    ours.train(train)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3  # backward's 16-bit roundings differ (measured <= 1.1e-2)
    for _ in range(2):
        x = rand(2, 8, 6, 7, memory_format=CL, dtype=dtype if x_dtype == "low" else x_dtype)
        xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            ref = tv(xt)
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                out = ours(xo)
        assert out.dtype == torch.float32 and out.is_contiguous(memory_format=CL)
        assert {t.dtype for t in saved if t.dim() == 4 and t.shape[1] == 8} == {dtype}  # the 1x1 bottlenecks
        _near(out, ref, 1e-4, "output")  # the same roundings: equal in practice
        g = rand(*ref.shape)
        ref.backward(g)
        out.backward(g)
        assert xo.grad.dtype == x.dtype
        _near(xo.grad, xt.grad, tol, "input gradient")
        for (name, p), q in zip(ours.named_parameters(), tv.parameters()):
            assert p.dtype == p.grad.dtype == torch.float32, name
            _near(p.grad, q.grad, tol, f"gradient of {name}")
    for (name, a), b in zip(ours.state_dict().items(), tv.state_dict().values()):
        assert a.dtype == b.dtype, name
        if a.is_floating_point():
            _near(a, b, 2e-3, name)
        else:
            assert torch.equal(a, b), name


@pytest.mark.slow
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph(train):
    torch._dynamo.reset()
    tv, ours = _pair(dtype=torch.float32)
    tv.train(train)
    ours.train(train)
    compiled = torch.compile(ours, fullgraph=True)
    x = rand(2, 5, 4, 4, memory_format=CL)
    g = rand(2, 17, 4, 4)
    for _ in range(2):
        xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref_out, ref_grads = _step(tv, xt, g)
        out, grads = _step(compiled, xo, g)
        assert_close(out, ref_out)
        for a, b in zip(grads, ref_grads):
            assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(ours.state_dict().values(), tv.state_dict().values()):
        assert_close(a.float(), b.float())


@pytest.mark.slow
def test_torch_compile_under_autocast():
    torch._dynamo.reset()
    tv, ours = _pair(dtype=torch.float32)
    compiled = torch.compile(ours, fullgraph=True)
    x = rand(2, 5, 4, 4, memory_format=CL)
    xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = tv(xt), compiled(xo)
    assert out.dtype == ref.dtype == torch.float32
    _near(out, ref, 1e-4, "output")
    g = rand(*ref.shape)
    ref.backward(g)
    out.backward(g)
    _near(xo.grad, xt.grad, 2e-2, "input gradient")
    for (name, p), q in zip(ours.named_parameters(), tv.parameters()):
        _near(p.grad, q.grad, 2e-2, f"gradient of {name}")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cuda(train):
    tv, ours = _pair(3, 8, 4, 2, dtype=torch.float32, device="cuda")
    tv.train(train)
    ours.train(train)
    _compare(tv, ours, rand(2, 8, 6, 6, device="cuda", memory_format=CL), grad_tol={"rtol": 1e-4, "atol": 1e-4})


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_cuda_autocast():
    tv, ours = _pair(3, 8, 4, 2, dtype=torch.float32, device="cuda")
    x = rand(2, 8, 6, 6, device="cuda", memory_format=CL)
    xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.float16):
        ref, out = tv(xt), ours(xo)
    assert out.dtype == ref.dtype == torch.float32
    _near(out, ref, 1e-3, "output")
    g = rand(*ref.shape, device="cuda")
    ref.backward(g)
    out.backward(g)
    for (name, p), q in zip(ours.named_parameters(), tv.parameters()):
        _near(p.grad, q.grad, 1e-2, f"gradient of {name}")
