"""The public ops' hand-written autograd nodes (csrc/autograd.h): what
torch::autograd::Function used to provide, checked directly. Saved tensors go
through SavedVariable (backward twice, in-place changes, no reference cycle), the
node refuses forward-mode tangents and torch.func transforms with a clear error,
anomaly mode and compiled autograd work."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import dtkernels as dtk
from dtkernels.testing import OpLog, rand


def _ops():
    """(name, ours, eager, input shapes): each op with an input that requires grad."""
    return [
        ("residual_add", lambda a, b: dtk.residual_add(a, b, alpha=0.5), lambda a, b: torch.relu(a + 0.5 * b),
         [(2, 3, 5, 4), (2, 3, 5, 4)]),
        ("max_pool2d", lambda a: dtk.max_pool2d(a, 3, 2, 1), lambda a: F.max_pool2d(a, 3, 2, 1), [(2, 3, 7, 6)]),
        ("concat_skip", lambda a, b: dtk.concat_skip(a, b, upsample="bilinear"),
         lambda a, b: torch.cat([F.interpolate(a, scale_factor=2, mode="bilinear"), b], 1),
         [(2, 3, 4, 5), (2, 2, 8, 10)]),
    ]


OPS = _ops()
IDS = [o[0] for o in OPS]


@pytest.mark.parametrize("which", range(len(OPS)), ids=IDS)
def test_node_names_edges_and_gradients(which):
    name, ours, eager, shapes = OPS[which]
    xs = [rand(*s, dtype=torch.float64, requires_grad=True) for s in shapes]
    out = ours(*xs)
    node = {"residual_add": "ResidualAdd", "max_pool2d": "MaxPool2d", "concat_skip": "ConcatSkip"}[name]
    assert out.grad_fn.name() == f"dtkernels_{node}Backward"
    assert len(out.grad_fn.next_functions) == len(xs)
    g = rand(*out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, xs, g)
    want = torch.autograd.grad(eager(*xs), xs, g)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-12, atol=1e-12)


# Backward kernel calls when only input i needs a gradient (None: both), per op:
# residual_add (alpha 0.5) runs its backward once per addend; concat_skip's skip
# gradient is a view, so only x's upsample adjoint is a kernel.
_BACKWARD_CALLS = {"residual_add": {0: 1, 1: 1, None: 2}, "max_pool2d": {0: 1, None: 1},
                   "concat_skip": {0: 1, 1: 0, None: 1}}


@pytest.mark.parametrize("which", range(len(OPS)), ids=IDS)
def test_only_inputs_that_need_grad_get_one(which):
    """Edges only to inputs that require grad, and backward computes no gradient
    nobody needs (the node's needs-input-grad flags)."""
    name, ours, _, shapes = OPS[which]
    for i in [*range(len(shapes)), None]:
        xs = [rand(*s, requires_grad=(i is None or j == i)) for j, s in enumerate(shapes)]
        out = ours(*xs)
        for j, (f, _) in enumerate(out.grad_fn.next_functions):
            assert (f is not None) == xs[j].requires_grad
        with OpLog() as log:
            out.sum().backward()
        kernels = [c[0] for c in log.calls if c[0] == f"dtkernels.{name}_backward.default"]
        assert len(kernels) == _BACKWARD_CALLS[name][i], (i, log.calls)
        assert all((x.grad is not None) == x.requires_grad for x in xs)


@pytest.mark.parametrize("name", ["residual_add", "max_pool2d"])
def test_saved_tensors_are_checked(name):
    """Backward twice without retain_graph, and a saved tensor changed in place,
    are ATen's errors (SavedVariable's checks)."""
    x = rand(2, 3, 6, 6, requires_grad=True)
    if name == "residual_add":
        out = dtk.residual_add(x, x.detach())  # saves out for the ReLU mask
        saved = out
    else:
        out, _, saved = torch.ops.dtkernels.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False, False, False, True)
    out.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.sum().backward()
    if name == "residual_add":
        out = dtk.residual_add(x, x.detach())
        saved = out
    else:
        out, _, saved = torch.ops.dtkernels.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False, False, False, True)
    loss = out.sum()
    with torch.no_grad():
        saved.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_saved_output_makes_no_reference_cycle():
    """residual_add saves its own output: saved as an output, it must not keep its
    node (and so itself) alive once the caller drops it."""
    x = rand(2, 3, 6, 6, requires_grad=True)
    gc.collect()
    gc.disable()
    try:
        out = dtk.residual_add(x, x.detach())
        ref = weakref.ref(out)
        del out
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("which", range(len(OPS)), ids=IDS)
def test_anomaly_mode(which):
    name, ours, eager, shapes = OPS[which]
    xs = [rand(*s, requires_grad=True) for s in shapes]
    with torch.autograd.detect_anomaly():
        got = torch.autograd.grad(ours(*xs).sum(), xs)
    want = torch.autograd.grad(eager(*xs).sum(), xs)
    for a, b in zip(got, want):
        assert_close(a, b)


def test_ops_refuse_transforms_and_tangents_clearly():
    """The ops themselves (torch.ops.dtkernels.*) under torch.func raise; the Python
    functions run their decompositions there instead (tests/test_func.py)."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import grad

    x, s = rand(2, 3, 4, 4), rand(2, 2, 8, 8)
    calls = {
        "residual_add": lambda a: torch.ops.dtkernels.residual_add(a, a, 1.0, True),
        "max_pool2d": lambda a: torch.ops.dtkernels.max_pool2d(a, [2, 2], [2, 2], [0, 0], [1, 1], False, False,
                                                               False, False)[0],
        "concat_skip": lambda a: torch.ops.dtkernels.concat_skip(a, s, "nearest", 2, False, False),
    }
    for name, f in calls.items():
        with pytest.raises(RuntimeError, match=f"dtkernels::{name}: the op's autograd does not support torch.func"):
            grad(lambda a: f(a).sum())(x)
        with fwAD.dual_level(), pytest.raises(RuntimeError, match=f"dtkernels::{name}: jvp is not implemented"):
            f(fwAD.make_dual(x, torch.ones_like(x)))
        assert_close(f(x), f(x.requires_grad_(False)))  # and after a transform, the plain op works


@pytest.mark.slow
def test_compiled_autograd():
    """Compiled autograd traces each node's backward (apply_with_saved) as one call;
    gradients equal eager's across shapes (dynamic sizes on the second)."""
    from torch._dynamo import compiled_autograd

    def ours(a, b):
        y = dtk.max_pool2d(dtk.residual_add(a, a.flip(-1), alpha=0.5), 3, 2, 1)
        return dtk.concat_skip(y, b, upsample="bilinear").square().sum()

    def eager(a, b):
        y = F.max_pool2d(torch.relu(a + 0.5 * a.flip(-1)), 3, 2, 1)
        return torch.cat([F.interpolate(y, scale_factor=2, mode="bilinear"), b], 1).square().sum()

    codes = []

    def backend(gm, _):
        codes.append(gm.code)
        return gm

    torch._dynamo.reset()
    for shape in [(2, 3, 8, 8), (3, 3, 12, 10)]:
        x = rand(*shape, dtype=torch.float64, requires_grad=True)
        s = rand(shape[0], 2, shape[2] // 2 * 2, shape[3] // 2 * 2, dtype=torch.float64, requires_grad=True)
        want = torch.autograd.grad(eager(x, s), (x, s))
        with compiled_autograd._enable(torch.compile(backend=backend)):
            got = torch.autograd.grad(ours(x, s), (x, s))
        for a, b in zip(got, want):
            assert_close(a, b, rtol=1e-12, atol=1e-12)
    for n in ("MaxPool2dBackward", "ResidualAddBackward", "ConcatSkipBackward"):
        assert any("dtkernels_" + n in c for c in codes), n
    torch._dynamo.reset()


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant):
    """torch.utils.checkpoint: the non-reentrant kind recomputes through the saved
    tensors' hooks, the reentrant kind reruns the forward in backward."""
    from torch.utils.checkpoint import checkpoint

    x, s = rand(2, 3, 8, 8, requires_grad=True), rand(2, 2, 8, 8, requires_grad=True)

    def ours(a, b):
        return dtk.concat_skip(dtk.max_pool2d(dtk.residual_add(a, a.flip(-1)), 2), b, upsample="nearest")

    def eager(a, b):
        return torch.cat([F.interpolate(F.max_pool2d(torch.relu(a + a.flip(-1)), 2), scale_factor=2), b], 1)

    want = torch.autograd.grad(eager(x, s).square().sum(), (x, s))
    checkpoint(ours, x, s, use_reentrant=reentrant).square().sum().backward()
    assert torch.equal(x.grad, want[0]) and torch.equal(s.grad, want[1])
