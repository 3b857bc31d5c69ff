#!/usr/bin/env python3
"""Turn a saved pytest-benchmark run into a speed-up table and a PNG chart.

    python benchmarks/report.py results.json [--md table.md] [--png chart.png]

Within each benchmark group (op, case, shape, dtype) every impl's median is
compared with the "torch" baseline of the same run: speed-up = torch / impl.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def load(path: str) -> tuple[dict, dict[str, dict[str, dict]]]:
    data = json.loads(Path(path).read_text())
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in data["benchmarks"]:
        impl = b.get("extra_info", {}).get("impl") or b["param"]
        groups[b["group"]][impl] = {**b["stats"], **b.get("extra_info", {})}
    return data.get("machine_info", {}), groups


def table(groups) -> str:
    lines = ["| group | impl | median ms | IQR ms | × torch | target |", "|---|---|---|---|---|---|"]
    for g, impls in groups.items():
        base = impls.get("torch", {}).get("median")
        for impl, s in impls.items():
            sp = f"{base / s['median']:.2f}" if base else ""
            tgt = f"≥{s['target']}" if s.get("target") and impl.startswith("dtk-") else ""
            lines.append(f"| {g} | {impl} | {s['median'] * 1e3:.3f} | {s['iqr'] * 1e3:.3f} | {sp} | {tgt} |")
    return "\n".join(lines)


def chart(groups, png: str) -> None:
    """Horizontal bars, one row per group, log-scaled speed-up (1 = eager PyTorch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, impl_names = list(groups), sorted({i for g in groups.values() for i in g if i != "torch"})
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(labels) * max(1, len(impl_names)) + 1.5))
    height = 0.8 / max(1, len(impl_names))
    for k, impl in enumerate(impl_names):
        vals = [(g["torch"]["median"] / g[impl]["median"]) if impl in g and "torch" in g else 0
                for g in groups.values()]
        ax.barh([i + k * height for i in range(len(labels))], vals, height, label=impl)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(labels))], labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over eager PyTorch (median; log scale)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("--md")
    ap.add_argument("--png")
    a = ap.parse_args(argv)
    machine, groups = load(a.json)
    t = table(groups)
    print(t)
    if a.md:
        cpu = machine.get("cpu", {}).get("brand_raw", machine.get("machine", ""))
        Path(a.md).write_text(f"# Benchmarks: {Path(a.json).name}\n\nMachine: {cpu}\n\n{t}\n")
    if a.png:
        chart(groups, a.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
