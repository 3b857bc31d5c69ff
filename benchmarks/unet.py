"""A whole model: a residual U-Net (ResNet-style encoder blocks, max-pool downsampling,
upsample-and-concatenate decoder) run with eager PyTorch's ops and with dtkernels'
(residual_add, max_pool2d, concat_skip), on the same parameters. Training step time
(forward + backward, interleaved rounds, medians) and the bytes autograd saves.

    PYTHONPATH=. python benchmarks/unet.py [batch] [size] [rounds] [nearest|bilinear|bilinear-ac] [cl]
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import dtkernels as dtk
from dtkernels.testing import saved_tensor_bytes


class _Res(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.proj = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()

    def forward(self, x, fast: bool):
        fx = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        return dtk.residual_add(self.proj(x), fx) if fast else F.relu(self.proj(x) + fx)


class UNet(nn.Module):
    def __init__(self, widths=(32, 64, 128, 256), classes: int = 2, upsample: str = "nearest",
                 align_corners: bool = False):
        super().__init__()
        self.upsample, self.align_corners, self.fast = upsample, align_corners, False
        self.enc = nn.ModuleList(_Res(cin, cout) for cin, cout in zip((3, *widths[:-1]), widths))
        self.dec = nn.ModuleList(nn.Sequential(nn.Conv2d(cin + cskip, cskip, 3, padding=1, bias=False),
                                               nn.BatchNorm2d(cskip), nn.ReLU(inplace=True))
                                 for cin, cskip in zip(widths[:0:-1], widths[-2::-1]))
        self.head = nn.Conv2d(widths[0], classes, 1)

    def _pool(self, x):
        return dtk.max_pool2d(x, 2) if self.fast else F.max_pool2d(x, 2)

    def _join(self, x, skip):
        if self.fast:
            return dtk.concat_skip(x, skip, upsample=self.upsample, align_corners=self.align_corners)
        kw = {"align_corners": self.align_corners} if self.upsample == "bilinear" else {}
        return torch.cat([F.interpolate(x, scale_factor=2, mode=self.upsample, **kw), skip], 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.enc):
            x = block(x if i == 0 else self._pool(x), self.fast)
            skips.append(x)
        x = skips.pop()
        for dec in self.dec:
            x = dec(self._join(x, skips.pop()))
        return self.head(x)


def main() -> None:
    a = sys.argv[1:]
    batch, size, rounds = (int(v) for v in (a[:3] + ["4", "256", "5"][len(a[:3]):]))
    mode = a[3] if len(a) > 3 else "nearest"
    cl = len(a) > 4 and a[4] == "cl"
    torch.manual_seed(0)
    model = UNet(upsample="bilinear" if mode.startswith("bilinear") else "nearest",
                 align_corners=mode == "bilinear-ac").train()
    x = torch.randn(batch, 3, size, size)
    if cl:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    outs = {}
    for fast in (False, True):
        model.load_state_dict(state)
        model.fast = fast
        outs[fast] = model(x).detach()
    model.load_state_dict(state)
    print(f"residual U-Net (widths 32-64-128-256), train mode, batch {batch}, {size}x{size}, {mode}, "
          f"{'channels_last' if cl else 'NCHW'}, float32, {torch.get_num_threads()} threads")
    print(f"max |output difference| {(outs[False] - outs[True]).abs().max().item():.2e}")
    names = {False: "eager ops", True: "dtkernels ops"}
    times = {k: [] for k in names}
    for _ in range(rounds):
        for fast in (False, True):
            model.fast = fast
            t0 = time.perf_counter()
            model(x).sum().backward()
            times[fast].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    exclude = [*model.parameters(), *model.buffers()]
    mem = {}
    for fast in (False, True):
        model.fast = fast
        mem[fast] = saved_tensor_bytes(lambda: model(x).sum(), exclude)[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    print("| ops | step ms (median) | min–max ms | saved MiB |")
    print("|---|---|---|---|")
    for k, name in names.items():
        print(f"| {name} | {med[k] * 1e3:.0f} | {min(times[k]) * 1e3:.0f}–{max(times[k]) * 1e3:.0f} | "
              f"{mem[k] / 2**20:.1f} |")
    print(f"speed {med[False] / med[True]:.2f}x, saved activations {mem[True] / mem[False]:.3f}x")


if __name__ == "__main__":
    main()
