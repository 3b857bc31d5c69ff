"""A whole model: DenseNet-121 (torchvision's layout, built from the reference block
so torchvision is not needed) before and after dtkernels.nn.convert. Training step
time (forward + backward, interleaved rounds, medians) and the bytes autograd saves.

    PYTHONPATH=. python benchmarks/densenet.py [batch] [size] [rounds]
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from collections import OrderedDict

import torch
from torch import nn

import dtkernels as dtk
from dtkernels.reference import TorchvisionDenseBlock
from dtkernels.testing import saved_tensor_bytes


def densenet121(num_classes: int = 1000) -> nn.Module:
    """torchvision.models.densenet121's modules and names (growth 32, blocks 6-12-24-16)."""
    features = [("conv0", nn.Conv2d(3, 64, 7, 2, 3, bias=False)), ("norm0", nn.BatchNorm2d(64)),
                ("relu0", nn.ReLU(inplace=True)), ("pool0", nn.MaxPool2d(3, 2, 1))]
    c = 64
    for i, layers in enumerate((6, 12, 24, 16)):
        features.append((f"denseblock{i + 1}", TorchvisionDenseBlock(layers, c, 4, 32)))
        c += layers * 32
        if i < 3:
            features.append((f"transition{i + 1}", nn.Sequential(OrderedDict(
                norm=nn.BatchNorm2d(c), relu=nn.ReLU(inplace=True), conv=nn.Conv2d(c, c // 2, 1, bias=False),
                pool=nn.AvgPool2d(2, 2)))))
            c //= 2
    features.append(("norm5", nn.BatchNorm2d(c)))
    return nn.Sequential(OrderedDict(features=nn.Sequential(OrderedDict(features)), relu=nn.ReLU(),
                                     pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), classifier=nn.Linear(c, num_classes)))


def saved_bytes(model, x) -> int:
    """Bytes autograd saves for one forward, parameters and buffers left out."""
    exclude = [*model.parameters(), *model.buffers()]
    return saved_tensor_bytes(lambda: model(x).sum(), exclude)[0]


def main() -> None:
    batch, size, rounds = (int(a) for a in (sys.argv[1:] + ["4", "160", "5"][len(sys.argv) - 1:]))
    torch.manual_seed(0)
    theirs = densenet121().train()
    ours = dtk.nn.convert(copy.deepcopy(theirs))
    x = torch.randn(batch, 3, size, size)
    out_t, out_o = theirs(x), ours(x)
    print(f"DenseNet-121 train mode, batch {batch}, {size}x{size}, float32, {torch.get_num_threads()} threads")
    print(f"max |output difference| {(out_t - out_o).abs().max().item():.2e} (logits up to {out_t.abs().max().item():.1f})")
    times = {"torchvision layout": [], "converted": []}
    for _ in range(rounds):
        for name, m in (("torchvision layout", theirs), ("converted", ours)):
            t0 = time.perf_counter()
            m(x).sum().backward()
            times[name].append(time.perf_counter() - t0)
            m.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {"torchvision layout": saved_bytes(theirs, x), "converted": saved_bytes(ours, x)}
    print("| model | step ms (median) | min–max ms | saved MiB |")
    print("|---|---|---|---|")
    for k in times:
        print(f"| {k} | {med[k] * 1e3:.0f} | {min(times[k]) * 1e3:.0f}–{max(times[k]) * 1e3:.0f} | {mem[k] / 2**20:.1f} |")
    t, o = "torchvision layout", "converted"
    print(f"speed {med[t] / med[o]:.2f}x, saved activations {mem[o] / mem[t]:.3f}x")


if __name__ == "__main__":
    main()
