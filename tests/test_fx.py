"""dtkernels.fx.fuse: the fused ops put into a traced model's graph, results and
gradients unchanged; what it cannot fuse exactly is left alone, and a fused call
given what the op cannot take runs the original ops."""
from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtkernels as dtk
from dtkernels import concat_skip
from dtkernels import fx as dfx
from dtkernels.testing import OpLog, rand

from conftest import INTERPRET

pytestmark = pytest.mark.skipif(INTERPRET, reason="graph rewrites: the native run covers them")


class Block(nn.Module):
    """torchvision's BasicBlock ending (out += identity; relu) and the decoder's skips."""

    def __init__(self, c=4):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)
        self.pool, self.up = nn.MaxPool2d(2), nn.Upsample(scale_factor=2)
        self.up_bilinear = nn.UpsamplingBilinear2d(scale_factor=2)

    def forward(self, x, skip):
        out = self.bn(self.conv(x))
        out += x
        out = self.relu(out)
        a = F.relu(out + x)
        b = torch.add(a, out, alpha=2).relu()
        p = F.max_pool2d(b, 2)
        y1 = torch.cat([F.interpolate(p, scale_factor=2.0, mode="nearest"), skip], 1)
        y2 = torch.cat([skip, self.up(self.pool(b))], dim=1)
        y3 = torch.cat((F.interpolate(p, scale_factor=2, mode="bilinear", align_corners=False), skip), 1)
        y4 = torch.cat([self.up_bilinear(p), skip], 1)
        return y1, y2, y3, y4


def _kinds(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def _grads(model, x, skip):
    outs = model(x, skip)
    loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
    return outs, torch.autograd.grad(loss, [x, skip, *model.parameters()])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_fuse_rewrites_and_keeps_results(channels_last):
    torch.manual_seed(0)
    model = Block().train()
    eager = copy.deepcopy(model)  # fuse() shares model's modules: the reference runs its own
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = rand(2, 4, 8, 8, memory_format=fmt, requires_grad=True)
    skip = rand(2, 3, 8, 8, memory_format=fmt, requires_grad=True)
    fused = dfx.fuse(model)
    kinds = _kinds(fused)
    assert kinds.count(dfx.concat_upsampled) == 4 and kinds.count(dfx.add_relu) == 3
    assert dtk.max_pool2d in kinds and type(fused.pool) is dtk.nn.MaxPool2d
    for gone in (torch.cat, F.interpolate, operator.add, operator.iadd, torch.add, F.relu, "relu", F.max_pool2d):
        assert gone not in kinds, gone
    assert type(model.pool) is nn.MaxPool2d, "the original model is left as it was"
    want, want_g = _grads(eager, x, skip)
    got, got_g = _grads(fused, x, skip)
    for i, (a, b) in enumerate(zip(got, want)):
        if i < 2:  # nearest: a copy
            assert torch.equal(a, b)
        else:  # bilinear: ATen's vectorised small-image kernel rounds by an ulp (README)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the running statistics moved the same way
    torch.testing.assert_close(fused.bn.running_mean, eager.bn.running_mean)
    torch.testing.assert_close(fused.bn.running_var, eager.bn.running_var)
    assert fused.bn.num_batches_tracked == eager.bn.num_batches_tracked == 1


class Unfusable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, skip):
        u = F.interpolate(x, scale_factor=2)
        r = [torch.cat([u, skip], 0),  # not the channel dimension
             torch.cat([u, skip, skip], 1),  # three parts
             torch.cat([u, u], 1),  # u is read twice anyway
             torch.cat([F.interpolate(x, scale_factor=1.5), skip[..., :6, :6]], 1),  # not an integer scale
             torch.cat([F.interpolate(x, scale_factor=2, mode="bicubic"), skip], 1),
             torch.cat([F.interpolate(x, scale_factor=2, mode="nearest-exact"), skip], 1),
             torch.cat([F.interpolate(x, scale_factor=2, mode="bilinear", antialias=True), skip], 1)]
        u2 = F.interpolate(x, scale_factor=2)
        r += [torch.cat([u2, skip], 1), u2 * 2]  # the upsampled x is needed anyway
        s = x + x
        r += [F.relu(s), s * 2]  # the sum is read twice
        r.append(F.relu(x + 1.0))  # a number, not a tensor
        t = self.bn(x)
        t2 = t + x
        r.append(torch.relu(t) + t2)  # relu of no sum
        r.append(F.leaky_relu(t2))
        return r


def test_fuse_leaves_what_it_cannot_fuse_exactly():
    model = Unfusable().eval()
    fused = dfx.fuse(model)
    kinds = _kinds(fused)
    assert dfx.concat_upsampled not in kinds and dfx.add_relu not in kinds
    x, skip = rand(1, 4, 4, 4), rand(1, 4, 8, 8)
    for a, b in zip(fused(x, skip), model(x, skip)):
        assert torch.equal(a, b)


class Shapes(nn.Module):
    def forward(self, x, skip, a, b):
        return torch.cat([F.interpolate(x, scale_factor=2), skip], 1), F.relu(a + b)


@pytest.mark.parametrize("case", ["5d", "broadcast", "mixed-dtypes", "integers", "sizes"])
def test_fused_calls_run_the_original_ops_otherwise(case):
    """What the trace could not see (ranks, dtypes, broadcasting) is checked per call."""
    model = Shapes()
    fused = dfx.fuse(model)
    assert _kinds(fused) == [dfx.concat_upsampled, dfx.add_relu]
    x, skip, a, b = rand(2, 3, 4, 5), rand(2, 2, 8, 10), rand(2, 3, 4, 5), rand(2, 3, 4, 5)
    if case == "5d":
        x, skip = rand(1, 2, 3, 4, 5), rand(1, 2, 6, 8, 10)
    elif case == "broadcast":
        b = rand(3, 1, 5)
    elif case == "mixed-dtypes":
        skip, b = skip.double(), b.double()
    elif case == "integers":
        a, b = torch.arange(120).view(2, 3, 4, 5) - 60, torch.ones(2, 3, 4, 5, dtype=torch.long)
    else:  # F.interpolate's output does not match skip: the original error
        skip = rand(2, 2, 9, 10)
        with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
            fused(x, skip, a, b)
        return
    for got, want in zip(fused(x, skip, a, b), model(x, skip, a, b)):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_fuse_keeps_dtkernels_modules_and_calls():
    """A model that already uses dtkernels traces (its modules and functions stay
    whole, called through the package or by a module-level name)."""
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.cs, self.pool = dtk.nn.ConcatSkip(), dtk.nn.MaxPool2d(2)

        def forward(self, x, y):
            return dtk.residual_add(self.cs(self.pool(x), y), concat_skip(y, y, upsample=None))

    model = Mixed()
    fused = dfx.fuse(model)
    x, y = rand(1, 4, 8, 8), rand(1, 4, 8, 8)
    assert torch.equal(fused(x, y), model(x, y))
    assert type(fused.cs) is dtk.nn.ConcatSkip


def test_fuse_a_whole_unet():
    """The benchmark's residual U-Net, written with eager ops, fused: every max-pool,
    skip and residual closing is ours, and the outputs and gradients are its own."""
    from benchmarks.unet import UNet

    torch.manual_seed(0)
    model = UNet(widths=(8, 16, 32), upsample="nearest").train()
    fused = dfx.fuse(model)
    kinds = _kinds(fused)
    assert kinds.count(dfx.concat_upsampled) == 2 and kinds.count(dfx.add_relu) == 3
    assert kinds.count(dtk.max_pool2d) == 2 and torch.cat not in kinds and F.max_pool2d not in kinds
    x = rand(2, 3, 32, 32, requires_grad=True)
    out, out_f = model(x), fused(x)
    assert torch.equal(out, out_f)
    g, g_f = (torch.autograd.grad(o.square().sum(), [x, *model.parameters()]) for o in (out, out_f))
    for a, b in zip(g_f, g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_model_compiles_and_exports():
    model = Block().eval()
    fused = dfx.fuse(model)
    x, skip = rand(2, 4, 8, 8), rand(2, 3, 8, 8)
    for got, want in zip(torch.compile(fused, fullgraph=True)(x, skip), fused(x, skip)):
        assert torch.equal(got, want)
    ep = torch.export.export(fused, (x, skip))
    names = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("dtkernels.concat_skip" in n for n in names) == 4
    assert sum("dtkernels.residual_add" in n for n in names) == 3


class ToSize(nn.Module):
    """Decoders that upsample to the skip's size (odd inputs, DeepLab-style heads)."""

    def forward(self, x, skip):
        return (torch.cat([F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False), skip], 1),
                torch.cat([skip, F.interpolate(x, size=skip.shape[-2:])], 1),
                torch.cat([F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=True), skip], 1))


@pytest.mark.parametrize("case", ["x2", "x3", "not-a-multiple"])
def test_fuse_interpolate_to_a_size(case):
    """``size=`` that is a whole multiple s of x's size gives ATen's results for that
    scale, bit for bit (outputs with H + W > 128: ATen's generic bilinear kernel), so
    the fused call uses concat_skip; any other size runs the original ops."""
    model = ToSize()
    fused = dfx.fuse(model)
    assert _kinds(fused).count(dfx.concat_upsampled) == 3 and torch.cat not in _kinds(fused)
    x = rand(2, 3, 40, 50, requires_grad=True)
    hw = {"x2": (80, 100), "x3": (120, 150), "not-a-multiple": (81, 100)}[case]
    skip = rand(2, 4, *hw, requires_grad=True)
    with OpLog() as log:
        got = fused(x, skip)
    ours = sum(name.startswith("dtkernels.concat_skip") for name, _, _ in log.calls)
    assert ours == (0 if case == "not-a-multiple" else 3)
    want = model(x, skip)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    g = [torch.randn_like(o) for o in want]
    for a, b in zip(torch.autograd.grad(got, (x, skip), g), torch.autograd.grad(want, (x, skip), g)):
        assert torch.equal(a, b)
