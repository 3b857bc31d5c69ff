"""torch.export and dtkernels.decompositions(): a model using the ops exports, and its
exported program lowers to ATen ops alone (what ONNX and runtimes without this
library need) with the same results."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dtkernels as dtk
from dtkernels import reference as ref
from dtkernels.testing import assert_close, rand
from dtkernels.testing import rand as _rand

from conftest import HAS_GPU

CL = torch.channels_last


class _Net(torch.nn.Module):
    """Every op once: conv, max_pool2d, residual_add, DenseBlock, concat_skip."""

    def __init__(self, upsample="bilinear"):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.pool = dtk.nn.MaxPool2d(3, 2, 1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.res = dtk.nn.ResidualAdd(alpha=0.5)
        self.block = dtk.nn.DenseBlock(2, 8, 4)
        self.c3 = torch.nn.Conv2d(16, 8, 1)
        self.cat = dtk.nn.ConcatSkip(upsample=upsample)
        self.out = torch.nn.Conv2d(16, 2, 1)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        b = self.pool(a)
        c = self.c3(self.block(self.res(b, self.c2(b))))
        return self.out(self.cat(c, a))


def _dtk_nodes(ep):
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "dtkernels" in str(n.target)]


def _lower(ep):
    table = torch.export.default_decompositions()
    table.update(dtk.decompositions())
    return ep.run_decompositions(table)


def _randomize_running_stats(model):
    torch.manual_seed(1)
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.normal_()
        elif name.endswith("running_var"):
            b.uniform_(0.5, 2.0)


@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("memory_format", [None, CL], ids=["nchw", "cl"])
def test_export_lowers_to_aten(upsample, training, memory_format):
    torch.manual_seed(0)
    model = _Net(upsample).train(training)
    _randomize_running_stats(model)
    x = rand(2, 3, 14, 10, memory_format=memory_format)
    ep = torch.export.export(model, (x,))
    assert len(_dtk_nodes(ep)) == 4, "the exported program keeps the ops themselves"
    lowered = _lower(ep)
    assert _dtk_nodes(lowered) == []
    x2 = rand(2, 3, 14, 10, memory_format=memory_format)
    want = model(x2)
    assert_close(ep.module()(x2), want, rtol=1e-5, atol=1e-5)
    assert_close(lowered.module()(x2), want, rtol=1e-5, atol=1e-5)


def test_export_dynamic_batch():
    model = _Net().eval()
    _randomize_running_stats(model)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (rand(2, 3, 16, 16),), dynamic_shapes={"x": {0: batch}})
    lowered = _lower(ep)
    assert _dtk_nodes(lowered) == []
    for n in (1, 5):
        x = rand(n, 3, 16, 16)
        assert_close(lowered.module()(x), model(x), rtol=1e-5, atol=1e-5)


def _decomp(op):
    return dtk.decompositions()[op.default]


def test_table_covers_every_forward_op():
    ops = torch.ops.dtkernels
    table = dtk.decompositions()
    for name in ("residual_add", "concat_skip", "max_pool2d", "dense_block", "residual_add_backward",
                 "concat_skip_backward", "max_pool2d_backward"):
        assert getattr(ops, name).default in table, name
    table.clear()  # a copy: the library's table is untouched
    assert ops.residual_add.default in dtk.decompositions()


_GPU = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", _GPU])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_decompositions_match_the_ops(dtype, device):
    """Each decomposition against the op it replaces, on random data: exact where
    the op is exact to ATen (on the CPU), max_pool2d's indices and window offsets
    included. On CUDA values within an ulp (ATen's CUDA kernels round differently),
    indices and offsets exact."""
    if device == "cuda":
        if dtype == torch.float64:
            pytest.skip("float64 is CPU-only")
        _decompositions_match_on(dtype, device, exact=False)
    else:
        _decompositions_match_on(dtype, device, exact=True)


def _decompositions_match_on(dtype, device, exact):
    ops = torch.ops.dtkernels
    def eq(a, b):  # exact on the CPU, within an ulp on CUDA
        if exact or not a.dtype.is_floating_point:
            return torch.equal(a, b)
        assert_close(a, b)
        return True

    def rand(*shape, dtype=dtype):  # on `device`
        return _rand(*shape, dtype=dtype, device=device)

    x, fx = rand(2, 5, 7, 9, dtype=dtype), rand(2, 5, 7, 9, dtype=dtype)
    for alpha, relu in ((1.0, True), (-0.75, False)):
        got, want = _decomp(ops.residual_add)(x, fx, alpha, relu), ops.residual_add(x, fx, alpha, relu)
        if dtype == torch.bfloat16 or not exact:  # eager's 16-bit tail rounds alpha * fx first (README)
            assert_close(got, want)
        else:
            assert torch.equal(got, want)
    out = ops.residual_add(x, fx)
    g = rand(*out.shape, dtype=dtype)
    assert eq(_decomp(ops.residual_add_backward)(g, out, 0.5), ops.residual_add_backward(g, out, 0.5))

    def up_backward(*args):
        # ATen's CUDA upsample backward accumulates 16-bit gradients in 16 bits (atomics),
        # ours in float: there the decomposition runs in float and rounds once, as ours does.
        if exact or dtype.itemsize > 2:
            return _decomp(ops.concat_skip_backward)(*args)
        return _decomp(ops.concat_skip_backward)(args[0].float(), *args[1:]).to(dtype)

    skip = rand(2, 3, 14, 18, dtype=dtype)
    for up in (None, "nearest", "bilinear"):
        xs = x if up else rand(2, 5, 14, 18, dtype=dtype)
        assert_close(_decomp(ops.concat_skip)(xs, skip, up, 2), ops.concat_skip(xs, skip, up, 2), rtol=0,
                     atol=1e-6 if dtype != torch.bfloat16 else 1e-2)
        gu = rand(2, 5, 14, 18, dtype=dtype)
        assert_close(up_backward(gu, up, 2), ops.concat_skip_backward(gu, up, 2))
    for first in (False, True):
        assert_close(_decomp(ops.concat_skip)(x, skip, "bilinear", 2, True, first),
                     ops.concat_skip(x, skip, "bilinear", 2, True, first), rtol=0,
                     atol=1e-6 if dtype != torch.bfloat16 else 1e-2)
    assert_close(up_backward(gu, "bilinear", 2, True),
                 ops.concat_skip_backward(gu, "bilinear", 2, True))

    pool = rand(2, 3, 13, 11, dtype=dtype)
    pool[0, 0, 2, 3] = float("nan")
    for k, s, p, d, ceil in (([3, 3], [2, 2], [1, 1], [1, 1], False), ([2, 3], [1, 2], [0, 1], [2, 1], True),
                             ([12, 11], [1, 1], [0, 0], [1, 1], False)):  # 132 taps: int16 offsets
        for want_idx, want_off in ((False, False), (True, False), (False, True), (True, True)):
            args = (pool, k, s, p, d, ceil, False, want_idx, want_off)
            got, want = _decomp(ops.max_pool2d)(*args), ops.max_pool2d(*args)
            for a, b in zip(got, want):
                assert a.dtype == b.dtype and a.shape == b.shape
                assert eq(a.nan_to_num(1e4), b.nan_to_num(1e4))
        out, _, off = ops.max_pool2d(pool, k, s, p, d, ceil, False, False, True)
        g = rand(*out.shape, dtype=dtype)
        assert eq(_decomp(ops.max_pool2d_backward)(g, off, list(pool.shape), k, s, p, d),
                  ops.max_pool2d_backward(g, off, list(pool.shape), k, s, p, d))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("conv_dtype", [torch.float32, torch.bfloat16], ids=["same", "bf16_convs"])
def test_dense_block_decomposition(training, conv_dtype):
    """All three outputs: the block, the bottlenecks and (training) the batch
    statistics the module folds into its running ones; with autocast's 16-bit conv
    weights too."""
    torch.manual_seed(0)
    block = dtk.nn.DenseBlock(3, 5, 4).train(training)
    _randomize_running_stats(block)
    layers = list(block.children())
    weights = [t.detach() for layer in layers for t in layer.weights()]
    weights = [w.to(conv_dtype) if i % 6 in (2, 5) else w for i, w in enumerate(weights)]
    running = [] if training else [t for layer in layers for n in (layer.norm1, layer.norm2)
                                   for t in (n.running_mean, n.running_var)]
    x = rand(2, 5, 6, 7)
    args = (x, weights, running, 4, training, 1e-5)
    got, want = ref.dense_block(*args), torch.ops.dtkernels.dense_block(*args)
    tol = dict(rtol=1e-5, atol=1e-5) if conv_dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert_close(got[0], want[0], **tol)
    assert len(got[1]) == len(want[1]) == 3 and len(got[2]) == len(want[2]) == (6 if training else 0)
    for a, b in zip(got[1] + got[2], want[1] + want[2]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_close(a, b, **tol)


def test_onnx_round_trip():
    """The recipe in the README: export, lower, torch.onnx.export, run in onnxruntime.
    Needs onnx, onnxscript and onnxruntime, which are not dependencies (skipped
    without them)."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = _Net().eval()
    _randomize_running_stats(model)
    x = rand(2, 3, 16, 16)
    program = torch.onnx.export(_lower(torch.export.export(model, (x,))), (x,), dynamo=True)
    import tempfile, os
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        program.save(path)
        session = ort.InferenceSession(path)
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert_close(torch.from_numpy(y), model(x).detach(), rtol=1e-4, atol=1e-5)
