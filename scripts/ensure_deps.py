#!/usr/bin/env python3
"""Install what dtkernels' build, tests and benchmarks need, and nothing that is there.

    python scripts/ensure_deps.py [--bench] [--wheel]

- torch: an existing install is reused (a user's CUDA build included); only when
  none is importable is the CPU wheel torch==2.13.0 installed (on machines of the
  project's kind it lies on disk; an unpinned torch would pull a multi-GB CUDA build).
- triton==3.6.0 when triton is missing (the Triton tests run under its interpreter).
- numpy==2.1.3 when numpy is missing or >= 2.4: triton 3.6's interpreter breaks there.
- pytest, pytest-benchmark, ninja; matplotlib with --bench; wheel with --wheel.
- with --test, also onnxscript and onnxruntime (tests/test_export.py exports a model
  to ONNX and runs it). They are optional: if they cannot be installed (no package
  index), this says so and that one test skips.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys


def have(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def numpy_ok() -> bool:
    if not have("numpy"):
        return False
    out = subprocess.run([sys.executable, "-c", "import numpy; print(numpy.__version__)"],
                         capture_output=True, text=True).stdout.strip()
    try:
        major, minor = (int(p) for p in out.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) < (2, 4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--wheel", action="store_true")
    ap.add_argument("--test", action="store_true")
    a = ap.parse_args(argv)
    rc = required(a)
    if rc == 0 and a.test:
        optional_test_deps()
    return rc


def optional_test_deps() -> None:
    want = [pkg for mod, pkg in [("onnxscript", "onnxscript"), ("onnxruntime", "onnxruntime")] if not have(mod)]
    if not want:
        return
    print("ensure_deps: installing " + " ".join(want) + " (optional: the ONNX export test)", flush=True)
    # numpy pinned in the same call, so the resolver cannot move it past triton's limit
    rc = subprocess.call([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *want,
                          "numpy<2.4"])
    if rc != 0:
        print("ensure_deps: WARNING: could not install " + " ".join(want) + "; tests/test_export.py's ONNX "
              "round trip will skip", flush=True)


def required(a) -> int:
    want = []
    if not have("torch"):
        want.append("torch==2.13.0")
    if not have("triton"):
        want.append("triton==3.6.0")
    if not numpy_ok():
        want.append("numpy==2.1.3")
    for mod, pkg in [("pytest", "pytest"), ("pytest_benchmark", "pytest-benchmark"), ("ninja", "ninja"),
                     ("setuptools", "setuptools>=64")]:
        if not have(mod):
            want.append(pkg)
    if a.bench and not have("matplotlib"):
        want.append("matplotlib")
    if a.wheel and not have("wheel"):
        want.append("wheel")
    if not want:
        print("ensure_deps: everything is installed")
        return 0
    print("ensure_deps: installing " + " ".join(want), flush=True)
    return subprocess.call([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *want])


if __name__ == "__main__":
    sys.exit(main())
