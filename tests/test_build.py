"""Build checks: the CUDA sources compile (no GPU needed), and the wheel's CPU code
needs no ISA beyond x86-64 outside its runtime-dispatched clones."""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dtkernels

ROOT = Path(__file__).resolve().parents[1]
REQUIRE_NVCC = os.environ.get("DTK_REQUIRE_NVCC") == "1"  # set by .ci/run: CI must not skip this


def _nvcc():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from check_cuda_compile import find_nvcc
    finally:
        sys.path.pop(0)
    return find_nvcc()


# The .cu files, and the C++ files whose code differs in a CUDA build.
CUDA_BUILD_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu")) + \
    ["csrc/dtkernels.cpp"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "ops").glob("*.cpp"))


@pytest.mark.parametrize("cu", CUDA_BUILD_SOURCES)
def test_cuda_source_compiles(cu):
    if _nvcc() is None:
        if REQUIRE_NVCC:
            pytest.fail("nvcc not found but DTK_REQUIRE_NVCC=1")
        pytest.skip("nvcc not found")
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_cuda_compile.py"), str(ROOT / cu)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None,
                    reason="x86-64 with objdump only")
def test_wide_vector_code_only_in_dispatched_clones():
    """AVX/AVX-512 instructions may appear only in the x86-64-v3/v4 target_clones,
    which the loader picks only on CPUs that have them, and in the F16C kernels
    (names ending in _f16c), which run only where cpu_has_f16c() says so."""
    so = Path(dtkernels._C.__file__)
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so)], capture_output=True, text=True).stdout
    offenders, clones, fn = set(), set(), None
    for line in asm.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            fn = m.group(1)
            if ".arch_x86_64_v" in fn:
                clones.add(fn)
            continue
        if fn and re.search(r"%[yz]mm\d", line) and ".arch_x86_64_v" not in fn and "_f16c" not in fn:
            offenders.add(fn)
    assert clones, "no target_clones found: the CPU kernels are not vectorised per ISA"
    assert not offenders, f"AVX code outside the dispatched clones: {sorted(offenders)[:5]}"
