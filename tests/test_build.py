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


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="host code")
def test_ncu_stem_reads_ncus_raw_csv():
    """benchmarks/ncu_stem.py runs only on a GPU machine with ncu: its reading of ncu's
    raw CSV page (quoted fields, a units row, "==PROF==" lines, thousands separators)
    and its kernel names are checked here on an example of that page."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import ncu_stem as n
    finally:
        sys.path.pop(0)
    metrics = list(n.METRICS)
    head = ["ID", "Process ID", "Kernel Name", *metrics]
    units = ["", "", "", "nsecond", "byte", "byte", "%", "byte", "%", "%", "byte", "%", "%", "inst"]
    vec = ["0", "7", "void dtkernels::cuda::(anonymous namespace)::max_pool2d_vec_kernel<c10::Half, 3, 2, 1, 0>"
           "(const T1 *, T1 *, long *, signed char *, dtkernels::PoolDims, bool)",
           "30,123", "51380224", "12845056", "71.2", "1.5e8", "55.5", "60.1", "2e8", "40.2", "62.5", "3500000"]
    copy = ["1", "7", "void at::native::vectorized_elementwise_kernel<4, at::native::neg_kernel_cuda(at::Tensor"
            "IteratorBase &)::[lambda() (instance 1)], std::array<char *, 2UL>>(int, T2, T3)", *["1"] * len(metrics)]
    text = "==PROF== Connected to process 7\n" + "\n".join(
        ",".join(f'"{v}"' for v in row) for row in (head, units, vec, copy)) + "\n==PROF== Disconnected\n"
    rows = n.parse(text)
    assert [r["ID"] for r in rows] == ["0", "1"]
    md = n.table(rows, ["cuda-vec-r0", "copy"]).splitlines()
    assert md[2].startswith("| cuda-vec-r0 | max_pool2d_vec_kernel<c10::Half, 3, 2, 1, 0> | 30.1 | 51.4 | 12.8 | "
                            "71.2 | 150 | 55.5 |"), md[2]
    assert md[3].startswith("| copy | vectorized_elementwise_kernel<4, at::native::neg_kernel_cuda(at::Te...> |")
    assert "could not be matched" in n.table(rows, ["one launch"])  # counts differ: no names guessed
