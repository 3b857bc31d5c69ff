"""dtkernels.nn.convert: nn.MaxPool2d and torchvision dense blocks swapped for the
drop-ins in an existing model, its parameters, state_dict and results kept."""
from __future__ import annotations

import copy

import torch
from torch import nn

import dtkernels as dtk
from dtkernels.reference import TorchvisionDenseBlock, TorchvisionDenseLayer
from dtkernels.testing import assert_close, rand


class _DenseLayer(TorchvisionDenseLayer):  # torchvision's layer carries drop_rate
    def __init__(self, c, g, bn_size, drop_rate=0.0):
        super().__init__(c, g, bn_size)
        self.drop_rate = drop_rate

    def forward(self, prev):
        out = super().forward(prev)
        return nn.functional.dropout(out, self.drop_rate, self.training) if self.drop_rate > 0 else out


class _DenseBlock(nn.ModuleDict):
    """torchvision.models.densenet._DenseBlock's shape, under its module name."""

    def __init__(self, num_layers, c, bn_size, g, drop_rate=0.0):
        super().__init__()
        for i in range(num_layers):
            self.add_module("denselayer%d" % (i + 1), _DenseLayer(c + i * g, g, bn_size, drop_rate))

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


_DenseBlock.__module__ = "torchvision.models.densenet"


def _model(drop_rate=0.0):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(3, 2, 1),
                      _DenseBlock(3, 8, 4, 4, drop_rate), nn.Conv2d(20, 6, 1), nn.MaxPool2d(2, ceil_mode=True),
                      TorchvisionDenseBlock(2, 6, 2, 3))
    for name, b in m.named_buffers():
        if name.endswith("running_mean"):
            b.normal_()
        elif name.endswith("running_var"):
            b.uniform_(0.5, 2.0)
    return m


def test_convert_swaps_and_keeps_results():
    theirs = _model()
    ours = dtk.nn.convert(copy.deepcopy(theirs))
    assert [type(m) for m in ours] == [nn.Conv2d, dtk.nn.MaxPool2d, dtk.nn.DenseBlock, nn.Conv2d, dtk.nn.MaxPool2d,
                                       dtk.nn.DenseBlock]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours[1].padding == 1 and ours[4].ceil_mode and ours[2].growth_rate == 4 and ours[2].bn_size == 4
    for training in (True, False):
        ours.train(training), theirs.train(training)
        x = rand(2, 3, 13, 11)
        a, b = ours(x), theirs(x)
        assert_close(a, b, rtol=1e-5, atol=1e-5)
        g = rand(*a.shape)
        ga = torch.autograd.grad(a, list(ours.parameters()), g)
        gb = torch.autograd.grad(b, list(theirs.parameters()), g)
        for u, v in zip(ga, gb):
            assert_close(u, v, rtol=1e-4, atol=1e-5)
    for (k, u), v in zip(ours.state_dict().items(), theirs.state_dict().values()):  # running statistics alike
        assert_close(u, v, rtol=1e-5, atol=1e-6, msg=k)


def test_convert_keeps_parameter_objects():
    """In place, with the same parameters and buffers: an optimizer made before the
    conversion still trains the model."""
    model = _model()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    block_weight = model[2].denselayer2.conv1.weight
    assert dtk.nn.convert(model) is model and isinstance(model[2], dtk.nn.DenseBlock)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    before = block_weight.detach().clone()
    model(rand(2, 3, 13, 11)).square().mean().backward()
    opt.step()
    assert model[2].denselayer2.conv1.weight is block_weight and not torch.equal(block_weight, before)
    assert all(p.device.type == "cpu" for p in model.parameters())  # nothing left on the meta device


def test_convert_leaves_what_it_cannot_run_exactly():
    assert isinstance(dtk.nn.convert(_model(drop_rate=0.2))[2], _DenseBlock)  # dropout
    m = _model()
    m[2].denselayer2.norm2.eps = 1e-3  # one eps per block
    assert isinstance(dtk.nn.convert(m)[2], _DenseBlock)
    m = _model()
    m[2].denselayer1.conv2 = nn.Conv2d(16, 4, 3, padding=1, bias=True)
    assert isinstance(dtk.nn.convert(m)[2], _DenseBlock)
    m = _model()
    m[5].denselayer1.norm1 = nn.BatchNorm2d(6, affine=False)
    assert isinstance(dtk.nn.convert(m)[5], TorchvisionDenseBlock)

    class Lookalike(_DenseBlock):  # a user's block: its forward may differ
        pass

    Lookalike.__module__ = __name__
    Lookalike.__name__ = "_DenseBlock"
    assert type(dtk.nn.convert(Lookalike(2, 4, 2, 2))) is Lookalike

    class MyPool(nn.MaxPool2d):  # subclasses keep their own forward
        pass

    assert type(dtk.nn.convert(MyPool(2))) is MyPool
    assert dtk.nn.convert(_model(), max_pool=False, dense_blocks=False)[1].__class__ is nn.MaxPool2d


def test_convert_root_module():
    pool = nn.MaxPool2d(3, 2, 1, return_indices=True)
    new = dtk.nn.convert(pool)
    assert type(new) is dtk.nn.MaxPool2d and type(pool) is nn.MaxPool2d and repr(new) == repr(pool)
    x = rand(2, 3, 9, 9)
    for u, v in zip(new(x), pool(x)):
        assert torch.equal(u, v)
    block = TorchvisionDenseBlock(2, 4, 2, 3).eval()
    new = dtk.nn.convert(block)
    assert type(new) is dtk.nn.DenseBlock and not new.training
    x = rand(2, 4, 5, 5)
    assert_close(new(x), block(x), rtol=1e-5, atol=1e-5)


def test_whole_models_match_eager():
    """The two whole-model benchmarks' models: a torchvision-layout DenseNet-121
    converted, and the residual U-Net on our ops, against their eager selves
    (outputs bit-identical, gradients to rounding)."""
    from benchmarks.densenet import densenet121
    from benchmarks.unet import UNet

    torch.manual_seed(0)
    theirs = densenet121(num_classes=10)
    ours = dtk.nn.convert(copy.deepcopy(theirs))
    x = rand(2, 3, 64, 64)
    a, b = ours(x), theirs(x)
    assert torch.equal(a, b)
    for u, v in zip(torch.autograd.grad(a.sum(), list(ours.parameters())),
                    torch.autograd.grad(b.sum(), list(theirs.parameters()))):
        assert_close(u, v, rtol=1e-4, atol=1e-5)
    unet = UNet()
    state = copy.deepcopy(unet.state_dict())
    outs, grads = [], []
    for fast in (False, True):
        unet.load_state_dict(state)
        unet.fast = fast
        out = unet(x)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), list(unet.parameters())))
    assert torch.equal(outs[0], outs[1])
    for u, v in zip(*grads):
        assert_close(u, v, rtol=1e-4, atol=1e-5)
