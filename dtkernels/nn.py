"""Modules over the dtkernels ops, drop-in for their torch.nn counterparts, and
convert(), which swaps them into an existing model."""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from . import ops


class ResidualAdd(nn.Module):
    """``act(x + alpha * fx)``: the ResNet block's closing ``relu(x + F(x))``."""

    def __init__(self, alpha: float = 1.0, activation: str | None = "relu"):
        super().__init__()
        ops._common.check_activation("ResidualAdd", activation)
        self.alpha, self.activation = float(alpha), activation

    def forward(self, x: Tensor, fx: Tensor) -> Tensor:
        return ops.residual_add(x, fx, alpha=self.alpha, activation=self.activation)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, activation={self.activation!r}"


class ConcatSkip(nn.Module):
    """``cat([up(x), skip], 1)`` (``skip_first``: ``cat([skip, up(x)], 1)``): the U-Net
    decoder's upsample-and-concatenate, in one pass. ``upsample`` is None, "nearest"
    or "bilinear" (``align_corners`` as F.interpolate's)."""

    def __init__(self, upsample: str | None = "nearest", scale_factor: int = 2, align_corners: bool = False,
                 skip_first: bool = False):
        super().__init__()
        ops._common.check_upsample("ConcatSkip", upsample)
        self.upsample = upsample
        self.scale_factor = ops._common.check_scale_factor("ConcatSkip", scale_factor)
        self.align_corners = ops._common.check_align_corners("ConcatSkip", upsample, align_corners)
        self.skip_first = bool(skip_first)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return ops.concat_skip(x, skip, upsample=self.upsample, scale_factor=self.scale_factor,
                               align_corners=self.align_corners, skip_first=self.skip_first)

    def extra_repr(self) -> str:
        extra = (", align_corners=True" if self.align_corners else "") + (", skip_first=True" if self.skip_first else "")
        return f"upsample={self.upsample!r}, scale_factor={self.scale_factor}{extra}"


class _DenseLayer(nn.Module):
    """One DenseNet-BC layer's parameters, under torchvision's _DenseLayer names
    (norm1, relu1, conv1, norm2, relu2, conv2) so state_dicts load both ways.
    DenseBlock runs the layers; a layer on its own has no forward."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)

    def weights(self) -> list[Tensor]:
        return [self.norm1.weight, self.norm1.bias, self.conv1.weight,
                self.norm2.weight, self.norm2.bias, self.conv2.weight]


class DenseBlock(nn.Module):
    """DenseNet-BC dense block: each layer is BN-ReLU-1x1 conv (to bn_size * growth_rate
    channels) then BN-ReLU-3x3 conv (to growth_rate); the output is the input and every
    layer's features, concatenated on channels (in_channels + num_layers * growth_rate).

    Drop-in for torchvision's _DenseBlock (drop_rate=0): the same children
    (denselayer1..N) and state_dict keys. Memory-lean: every layer writes its new
    features straight into its slice of one preallocated buffer (the output), nothing
    is re-concatenated, and backward recomputes each layer's BN-ReLUs instead of
    keeping them, so autograd saves the output, the 1x1 bottlenecks and per-channel
    statistics: memory linear in depth (see dtkernels/ops/dense_block.py). Training
    mode normalises with batch statistics and updates running statistics once per
    forward, as BatchNorm2d does; eval mode uses the running statistics.
    """

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int = 4):
        super().__init__()
        if num_layers < 1 or in_channels < 1 or growth_rate < 1 or bn_size < 1:
            raise ValueError("DenseBlock: num_layers, in_channels, growth_rate and bn_size must be positive")
        self.num_layers, self.in_channels, self.growth_rate, self.bn_size = num_layers, in_channels, growth_rate, bn_size
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size))

    @property
    def out_channels(self) -> int:
        return self.in_channels + self.num_layers * self.growth_rate

    def forward(self, x: Tensor) -> Tensor:
        layers = list(self.children())
        weights = [t for layer in layers for t in layer.weights()]
        norms = [(layer.norm1, layer.norm2) for layer in layers]
        running = [] if self.training else [t for n1, n2 in norms for t in (n1.running_mean, n1.running_var,
                                                                             n2.running_mean, n2.running_var)]
        out, stats = ops.dense_block.dense_block(x, weights, running, self.growth_rate, self.training,
                                                 layers[0].norm1.eps)
        if self.training:
            self._update_running_stats(norms, stats)
        return out

    @torch.no_grad()
    def _update_running_stats(self, norms, stats) -> None:
        # What BatchNorm2d does in training: running = (1 - f) * running + f * batch
        # (the unbiased variance), f = momentum, or 1 / batches seen for momentum=None.
        # One foreach call per quantity for the whole block, not a few small ops per
        # norm: those alone cost more host time than the block's GPU kernels.
        mean1, var1, _, mean2, var2, _ = (t.detach() for t in stats)
        bns, means, variances = [], [], []
        for i, (n1, n2) in enumerate(norms):
            c = self.in_channels + i * self.growth_rate
            bns += [n1, n2]
            means += [mean1[:c], mean2[i]]
            variances += [var1[:c], var2[i]]
        torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)
        momenta = {bn.momentum for bn in bns}
        if len(momenta) == 1 and None not in momenta:
            f = momenta.pop()
            for running, batch in (([bn.running_mean for bn in bns], means),
                                   ([bn.running_var for bn in bns], variances)):
                torch._foreach_mul_(running, 1 - f)
                torch._foreach_add_(running, torch._foreach_mul(batch, f))
            return
        for bn, mean, var in zip(bns, means, variances):
            f = (1.0 / bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - f).add_(mean * f)
            bn.running_var.mul_(1 - f).add_(var * f)

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, in_channels={self.in_channels}, growth_rate={self.growth_rate}, "
                f"bn_size={self.bn_size}")


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments, attributes and repr) on dtkernels.max_pool2d."""

    def forward(self, input: Tensor):
        return ops.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                              ceil_mode=self.ceil_mode, return_indices=self.return_indices)


# ---- convert(): the drop-ins swapped into an existing model ------------------------------


def convert(module: nn.Module, *, max_pool: bool = True, dense_blocks: bool = True) -> nn.Module:
    """Swaps dtkernels' drop-ins into ``module``, in place, and returns it (or the
    replacement, when ``module`` itself is converted):

    - ``torch.nn.MaxPool2d`` becomes :class:`MaxPool2d` (same arguments, same results);
    - a torchvision DenseNet ``_DenseBlock`` (``torchvision.models.densenet121()`` and
      friends; also ``dtkernels.reference.TorchvisionDenseBlock``) becomes
      :class:`DenseBlock`, reusing its layers' own BatchNorm2d and Conv2d modules:
      the same parameter and buffer objects (an optimizer made before keeps working),
      the same ``state_dict`` keys. A block that DenseBlock cannot run exactly is
      left alone: dropout (``drop_rate > 0``), norms without affine parameters or
      running statistics, different eps across its norms, convolutions other than
      torchvision's.

    ResidualAdd and ConcatSkip replace code in a forward, not modules: call
    ``dtkernels.residual_add`` / ``concat_skip`` there.
    """
    new = _converted(module, max_pool, dense_blocks)
    if new is not module:
        return new
    for name, child in module.named_children():
        new = convert(child, max_pool=max_pool, dense_blocks=dense_blocks)
        if new is not child:
            setattr(module, name, new)
    return module


def _converted(m: nn.Module, max_pool: bool, dense_blocks: bool) -> nn.Module:
    if max_pool and type(m) is nn.MaxPool2d:
        new = copy.copy(m)  # same attributes, hooks and mode; our forward
        new.__class__ = MaxPool2d
        return new
    if dense_blocks and _is_torchvision_dense_block(m):
        return _dense_block_from(m) or m
    return m


def _is_torchvision_dense_block(m: nn.Module) -> bool:
    from .reference import TorchvisionDenseBlock

    return isinstance(m, TorchvisionDenseBlock) or (
        type(m).__name__ == "_DenseBlock" and type(m).__module__.startswith("torchvision."))


def _dense_block_from(m: nn.Module) -> DenseBlock | None:
    """A DenseBlock running m's own layers, or None if it cannot run them exactly."""
    layers = list(m.children())
    if not layers or [n for n, _ in m.named_children()] != [f"denselayer{i + 1}" for i in range(len(layers))]:
        return None
    try:
        c0, g = layers[0].norm1.num_features, layers[0].conv2.out_channels
        width, eps = layers[0].conv1.out_channels, layers[0].norm1.eps
    except AttributeError:
        return None
    for i, layer in enumerate(layers):
        if getattr(layer, "drop_rate", 0) > 0 or not all(
                hasattr(layer, k) for k in ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2")):
            return None
        if not (type(layer.relu1) is nn.ReLU and type(layer.relu2) is nn.ReLU):
            return None
        for norm, channels in ((layer.norm1, c0 + i * g), (layer.norm2, width)):
            if not (type(norm) is nn.BatchNorm2d and norm.affine and norm.track_running_stats
                    and norm.num_features == channels and norm.eps == eps):
                return None
        for conv, cin, cout, k, pad in ((layer.conv1, c0 + i * g, width, 1, 0), (layer.conv2, width, g, 3, 1)):
            if not (type(conv) is nn.Conv2d and conv.in_channels == cin and conv.out_channels == cout
                    and conv.kernel_size == (k, k) and conv.stride == (1, 1) and conv.padding == (pad, pad)
                    and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is None
                    and conv.padding_mode == "zeros"):
                return None
    if width % g:
        return None
    with torch.device("meta"):  # its own parameters are replaced below: allocate none
        block = DenseBlock(len(layers), c0, g, width // g)
    for ours, theirs in zip(block.children(), layers):
        for k in ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2"):
            setattr(ours, k, getattr(theirs, k))
    return block.train(m.training)
