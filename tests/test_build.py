"""Build checks: the CUDA sources compile (no GPU needed), and the wheel's CPU code
needs no ISA beyond x86-64 outside its runtime-dispatched clones."""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
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


def _gpu_check_scripts() -> list[str]:
    """The Python scripts scripts/gpu_check.sh runs ($PY benchmarks/<name>.py)."""
    text = (ROOT / "scripts" / "gpu_check.sh").read_text()
    return sorted(set(re.findall(r"\$PY (benchmarks/\w+\.py)", text)))


def test_gpu_check_runs_some_scripts():
    assert {"benchmarks/demo.py", "benchmarks/host_overhead.py"} <= set(_gpu_check_scripts())


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="host code")
@pytest.mark.parametrize("script", _gpu_check_scripts())
def test_gpu_check_scripts_find_the_build_in_place(script, tmp_path):
    """The GPU check builds in place (no install) and runs `$PY benchmarks/x.py` from
    the repository root, where Python puts only benchmarks/ on sys.path: each script
    must find this checkout's dtkernels itself. Loaded here (not run) from another
    directory and without PYTHONPATH, so only the script's own path setup can find it."""
    probe = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='gpu_check_probe'); "
             "import dtkernels; print(dtkernels.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", probe, str(ROOT / script)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert Path(p.stdout.strip().splitlines()[-1]).resolve().is_relative_to(ROOT), p.stdout


def _sass_loops(sass: str, mangled: str) -> list[list[str]]:
    """The loop bodies (instructions from a backward branch's target to the branch) of
    the SASS function whose mangled name contains `mangled`, innermost first."""
    funcs = re.split(r"\n\s*Function : ", sass)[1:]
    body = [f for f in funcs if mangled in f.split("\n", 1)[0]]
    assert len(body) == 1, (mangled, len(body))
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", body[0])]
    loops = []
    for at, text in ins:
        b = re.search(r"\bBRA (?:!?U?P\w+, )?0x([0-9a-f]+)", text)
        if b and int(b.group(1), 16) < at:
            loops.append([t for a, t in ins if int(b.group(1), 16) <= a <= at])
    return sorted(loops, key=len)


def test_cuda_pairs_kernels_sass():
    """The max_pool2d forward's 16-bit pairs candidates (cuda-pairs-20261127.md), compiled
    for sm_90 and read with the cuobjdump that Triton ships: their row or tap loops
    compare pairs (HSET2) with no float conversion, are a fraction of the default's
    length (the claim the candidates rest on), and touch no local memory."""
    if _nvcc() is None:
        if REQUIRE_NVCC:
            pytest.fail("nvcc not found but DTK_REQUIRE_NVCC=1")
        pytest.skip("nvcc not found")
    triton = pytest.importorskip("triton")
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip("no cuobjdump in Triton's wheel")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import check_cuda_compile as c
    finally:
        sys.path.pop(0)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "max_pool2d.cubin"
        p = subprocess.run([c.find_nvcc(), *c.compile_flags("sm_90", c.make_shim(tmp)), "-cubin",
                            str(ROOT / "csrc" / "cuda" / "max_pool2d.cu"), "-o", str(cubin)],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
        sass = subprocess.run([str(tool), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    def opcodes(body):
        return {(i.split()[1] if i.startswith("@") else i.split()[0]) for i in body}

    converts = ("HADD2.F32", "F2F", "FSETP")  # 16-bit values taken to float and compared there
    for t in ("4Half", "8BFloat16"):
        stem = f"max_pool2d_vec_kernelIN3c10{t}ELi3ELi2ELi1ELi0ELi"  # k3s2p1, one output row per item
        default, values, taps = (_sass_loops(sass, f"{stem}{mode}E") for mode in (0, 1, 2))
        row = default[0]  # the default's window row
        assert len(row) > 150 and any(o.startswith(converts) for o in opcodes(row)), len(row)
        for loops, most in ((values, len(row) // 2.5), (taps, len(row) // 2)):
            inner = [body for body in loops if any(o.startswith("HSET2") for o in opcodes(body))]
            assert inner and len(inner[0]) <= most, [len(b) for b in loops]
            assert not any(o.startswith(converts) for o in opcodes(inner[0])), opcodes(inner[0])
            assert not any(o.startswith(("STL", "LDL")) for body in loops[:-1] for o in opcodes(body))
        # channels_last, a pack of 8 channels with int8 offsets: the scan's tap loop, and pairs
        default, values, taps = (_sass_loops(sass, f"max_pool2d_kernelIN3c10{t}EaLi8ELb1ELi{mode}E")
                                 for mode in (0, 1, 2))
        tap = default[0]
        assert len(tap) > 40 and any(o.startswith(converts) for o in opcodes(tap)), len(tap)
        for loops, most in ((values, len(tap) // 2), (taps, len(tap) // 1.6)):
            assert any(o.startswith("HSET2") for o in opcodes(loops[0])) and len(loops[0]) <= most, \
                [len(b) for b in loops]
            assert not any(o.startswith(converts) for o in opcodes(loops[0])), opcodes(loops[0])
            assert not any(o.startswith(("STL", "LDL")) for body in loops for o in opcodes(body))
