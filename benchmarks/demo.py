#!/usr/bin/env python3
"""make demo: check every op against the reference, then time it against PyTorch.

    python benchmarks/demo.py [--device cpu|cuda] [--ops residual_add,...] [--rounds N]
                              [--json out.json] [--md out.md]

On a GPU both the Triton and the CUDA C++ kernels are timed. Each number is the
median of interleaved rounds; "× torch" is the eager baseline's median over ours.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # an in-place build

import torch  # noqa: E402

import dtkernels as dtk  # noqa: E402
from common import check_case, gpu_backends, load_cases, markdown, rows_for, time_case  # noqa: E402


def machine(device: torch.device) -> dict:
    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    try:
        info["commit"] = os.environ.get("DTK_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        info["commit"] = "unknown"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def _figures_md(figures: dict[str, dict]) -> str:
    return "".join(f"- {g}: " + ", ".join(f"{k} {v}" for k, v in f.items()) + "\n" for g, f in figures.items())


def write(args, info: dict, device: torch.device, rows: list[dict], figures: dict) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows, "figures": figures}, indent=1))
    if args.md:
        head = "\n".join(f"- {k}: {v}" for k, v in info.items())
        more = f"\n{_figures_md(figures)}" if figures else ""
        Path(args.md).write_text(f"# dtkernels benchmark ({device.type})\n\n{head}\n\n{markdown(rows)}\n{more}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("DTK_DEMO_ROUNDS", 11)))
    ap.add_argument("--quick", action="store_true", help="only the cases with a target (and GPU-only ones)")
    ap.add_argument("--first", default="", help="comma-separated op names to run before the others (a time "
                    "limit then cuts the least wanted)")
    ap.add_argument("--backends", default="", help="comma-separated GPU backends to time (default: all built)")
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    backends = ["cpu"] if device.type == "cpu" else gpu_backends(args.backends)
    cases = [c for c in load_cases() if device.type in c.devices]
    if args.ops:
        cases = [c for c in cases if c.op in args.ops.split(",")]
    if args.first:
        first = args.first.split(",")
        cases.sort(key=lambda c: first.index(c.op) if c.op in first else len(first))  # stable: file order within
    if args.quick:  # the cases with a target, and those that exist only for the GPU check
        cases = [c for c in cases if c.target is not None or (device.type == "cuda" and c.devices == ("cuda",))]
    info = machine(device)
    print(f"dtkernels {dtk.__version__} on {info.get('gpu', info['cpu'])}, torch {info['torch']}, "
          f"{info['threads']} threads, backends {backends}\n")

    print("Correctness against dtkernels.reference (random inputs of each case):")
    failed = 0
    for op in dict.fromkeys(c.op for c in cases):
        try:
            for c in cases:
                if c.op == op:
                    check_case(c, device, backends)
            print(f"  {op:16s} ok")
        except AssertionError as e:
            failed += 1
            print(f"  {op:16s} MISMATCH\n{e}")
        except Exception as e:  # a case that cannot run must not stop the others' checks and timings
            failed += 1
            print(f"  {op:16s} FAILED: {type(e).__name__}: {e}")

    print("\nSpeed (median of interleaved rounds; × torch > 1 means faster than eager PyTorch):")
    rows: list[dict] = []
    figures: dict[str, dict] = {}
    for c in cases:
        try:
            stats = time_case(c, device, backends, rounds=args.rounds)
        except Exception as e:  # one broken case must not hide the others' numbers
            failed += 1
            print(f"  {c.group:48s} FAILED: {type(e).__name__}: {e}", flush=True)
            continue
        new = rows_for(c, device, stats)
        rows += new
        best = max((r for r in new if r["impl"].startswith("dtk-")), key=lambda r: r["speedup_vs_torch"])
        print(f"  {c.group:48s} {best['impl']:11s} {best['speedup_vs_torch']:5.2f}x torch"
              + (f"  (target {c.target}x)" if c.target else ""), flush=True)
        if c.info is not None:
            figures[c.group] = c.info(c.make(device))
        write(args, info, device, rows, figures)  # after every case: a timeout keeps what was measured
    print("\n" + markdown(rows))
    if figures:
        print("\nOther figures:\n" + _figures_md(figures), end="")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
