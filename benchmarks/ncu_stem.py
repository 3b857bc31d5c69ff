"""Nsight Compute counters for the ResNet stem's max_pool2d forward on a GPU: why the
default CUDA kernel moved 0.77 of the copy's bandwidth on the H100 where the k2s2
forward moved 0.96 (benchmarks/results/h100-20261127.md), and what the candidates
change (benchmarks/results/cuda-candidates-20261127.md).

    python benchmarks/ncu_stem.py --md out/ncu.md    # a CUDA build, with ncu on PATH

It runs itself under ncu (--child): one launch of each kernel below, in a fixed
order, then a table of time, DRAM bytes and share of peak, L2 and L1 traffic and hit
rates, occupancy and instructions issued. ncu flushes the caches before each kernel
(its default --cache-control all), so every byte is first read from DRAM; clocks are
left alone (--clock-control none), as on the bench. Rows:
- cuda-vec-r{0,1,2}[-full]: the stem's vec kernel with 0 (the default), 1 or 2 output
  rows per thread item, resident or full grid (_C._cuda_max_pool2d_vec_variant);
- cuda-vec-r{0,1,2}-pairs: the same, 16-bit values compared in pairs (values only);
- cuda-vec-r0[-pairs]-offsets: the default and the pairs with the window offsets (the
  training forward);
- cuda-tile-{32k,16k}[-pairs]: the input read through shared-memory tiles of up to 32 or
  16 KiB of input rows per block, each input byte once from L2;
- dtk-cuda, torch: the op and ATen's kernel on the same input;
- copy: an elementwise copy of as many bytes (read + write) as the stem forward
  moves, the yardstick of the bandwidth target;
- k2s2 dtk-cuda: the forward that meets the target (fp16 64x128x128x128), and its
  pairs candidate; the same in channels_last (0.86 of copy bandwidth on the H100), and
  its pairs candidate.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # dtkernels, built in place

# metric -> (column, scale applied to the base unit ncu prints with --print-units base)
METRICS = {
    "gpu__time_duration.sum": ("us", 1e-3),
    "dram__bytes_read.sum": ("DRAM read MB", 1e-6),
    "dram__bytes_write.sum": ("DRAM write MB", 1e-6),
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": ("DRAM % of peak", 1),
    "lts__t_bytes.sum": ("L2 MB", 1e-6),
    "lts__t_sector_hit_rate.pct": ("L2 hit %", 1),
    "lts__throughput.avg.pct_of_peak_sustained_elapsed": ("L2 % of peak", 1),
    "l1tex__t_bytes.sum": ("L1 MB", 1e-6),
    "l1tex__t_sector_hit_rate.pct": ("L1 hit %", 1),
    "sm__warps_active.avg.pct_of_peak_sustained_active": ("occupancy %", 1),
    "smsp__inst_executed.sum": ("warp instr M", 1e-6),
}
KERNELS = "regex:max_pool|vectorized_elementwise"  # ours, ATen's pooling, the copy


def child(order_path: str) -> None:
    """The launches ncu profiles, in the order written to order_path."""
    import torch
    import torch.nn.functional as F

    import dtkernels as dtk

    dev, f16 = "cuda", torch.float16
    x = torch.randn(32, 64, 112, 112, dtype=f16, device=dev)  # a distribution kernel: not matched
    stem_bytes = (x.numel() + x.numel() // 4) * x.element_size()
    src = torch.randn(stem_bytes // 2 // 2, dtype=f16, device=dev)
    dst = torch.empty_like(src)
    k2 = torch.randn(64, 128, 128, 128, dtype=f16, device=dev)
    k2cl = k2.contiguous(memory_format=torch.channels_last)
    variant = dtk._C._cuda_max_pool2d_vec_variant
    runs = []

    def vec(rows, full, pairs=False, offsets=False, tile_kib=0):
        return lambda: variant(x, [3, 3], [2, 2], [1, 1], [1, 1], False, rows, full, pairs, False, offsets,
                               tile_kib * 1024)

    for rows in (0, 1, 2):
        for full in (False, True):
            runs.append((f"cuda-vec-r{rows}" + ("-full" if full else ""), vec(rows, full)))
    runs += [(f"cuda-vec-r{rows}-pairs", vec(rows, False, True)) for rows in (0, 1, 2)]
    runs += [("cuda-vec-r0-offsets", vec(0, False, False, True)),
             ("cuda-vec-r0-pairs-offsets", vec(0, False, True, True))]
    runs += [("cuda-tile-32k", vec(0, False, tile_kib=32)), ("cuda-tile-16k", vec(0, False, tile_kib=16)),
             ("cuda-tile-32k-pairs", vec(0, False, True, tile_kib=32))]
    runs += [("dtk-cuda", lambda: dtk.max_pool2d(x, 3, 2, 1)),
             ("torch", lambda: F.max_pool2d(x, 3, 2, 1)),
             ("copy", lambda: torch.neg(src, out=dst)),  # a vectorized_elementwise_kernel
             ("k2s2 dtk-cuda", lambda: dtk.max_pool2d(k2, 2)),
             ("k2s2 cuda-vec-r0-pairs",
              lambda: variant(k2, [2, 2], [2, 2], [0, 0], [1, 1], False, 0, False, True, False, False)),
             ("k2s2-cl dtk-cuda", lambda: dtk.max_pool2d(k2cl, 2)),
             ("k2s2-cl cuda-nhwc-pairs",
              lambda: dtk._C._cuda_max_pool2d_nhwc_variant(k2cl, [2, 2], [2, 2], [0, 0], [1, 1], False, True)),
             ("k2s2-cl cuda-nhwc-offsets",
              lambda: dtk._C._cuda_max_pool2d_nhwc_variant(k2cl, [2, 2], [2, 2], [0, 0], [1, 1], False, False,
                                                           False, True)),
             ("k2s2-cl cuda-nhwc-pairs-offsets",
              lambda: dtk._C._cuda_max_pool2d_nhwc_variant(k2cl, [2, 2], [2, 2], [0, 0], [1, 1], False, True,
                                                           False, True))]
    torch.cuda.synchronize()
    for _, fn in runs:
        fn()
    torch.cuda.synchronize()
    with open(order_path, "w") as f:
        json.dump({"names": [n for n, _ in runs], "stem_bytes": stem_bytes}, f)


def parse(text: str) -> list[dict]:
    """ncu's raw CSV page (ncu's own "==PROF==" lines skipped), one dict per kernel,
    without the units row."""
    lines = [l for l in text.splitlines() if l.strip() and not l.startswith("==")]
    rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
    return [r for r in rows if (r.get("ID") or "").strip().isdigit()]


def number(v: str) -> float | None:
    try:
        return float(v.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def short_name(kernel: str) -> str:
    """void ns::(anonymous namespace)::f<A, B>(args) -> f<A, B> (long template
    arguments cut)."""
    base = kernel.removeprefix("void ").replace("(anonymous namespace)::", "")
    head, _, rest = base.partition("<")
    name = head.split("(")[0].split("::")[-1]
    if not rest or "(" in head:
        return name
    depth, end = 1, 0
    while end < len(rest) and depth:
        depth += {"<": 1, ">": -1}.get(rest[end], 0)
        end += 1
    tmpl = rest[:end - 1]
    return f"{name}<{tmpl if len(tmpl) <= 40 else tmpl[:37] + '...'}>"


def table(rows: list[dict], names: list[str]) -> str:
    """Markdown: one line per profiled kernel, named by launch order when the counts agree."""
    named = len(rows) == len(names)
    cols = [c for c, _ in METRICS.values()]
    out = ["| launch | kernel | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for i, r in enumerate(rows):
        vals = []
        for metric, (_, scale) in METRICS.items():
            v = number(r.get(metric, ""))
            vals.append("" if v is None else f"{v * scale:.3g}" if scale != 1 else f"{v:.1f}")
        kernel = short_name(r.get("Kernel Name") or "?")
        out.append(f"| {names[i] if named else '?'} | {kernel} | " + " | ".join(vals) + " |")
    if not named:
        out.append(f"\n{len(rows)} kernels profiled for {len(names)} launches ({', '.join(names)}): "
                   "the names could not be matched by order.")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--md", help="write the table here (and print it)")
    ap.add_argument("--child", metavar="ORDER_JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    ncu = shutil.which("ncu")
    if ncu is None:
        print("ncu_stem: ncu not found on PATH", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        order, log = os.path.join(tmp, "order.json"), os.path.join(tmp, "ncu.csv")
        cmd = [ncu, "--csv", "--page", "raw", "--print-units", "base", "--clock-control", "none",
               "--kernel-name", KERNELS, "--metrics", ",".join(METRICS), "--log-file", log,
               sys.executable, os.path.abspath(__file__), "--child", order]
        p = subprocess.run(cmd, capture_output=True, text=True)
        text = open(log).read() if os.path.exists(log) else ""
        if p.returncode != 0 or not os.path.exists(order):
            print(f"ncu_stem: ncu exited with {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}\n{text[-3000:]}",
                  file=sys.stderr)
            return 1
        info = json.load(open(order))
    md = (f"## ncu: the stem forward (fp16 32x64x112x112, k3s2p1) and its yardsticks\n\n"
          f"One launch each, caches flushed before each; copy moves {info['stem_bytes'] / 1e6:.1f} MB "
          "(read + write), as the stem forward does.\n\n" + table(parse(text), info["names"]) + "\n")
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
