#!/usr/bin/env python3
"""Compile every csrc/cuda/*.cu to an object file with nvcc against torch's headers.

Also compiles the C++ files whose code differs in a CUDA build (DTK_WITH_CUDA:
csrc/dtkernels.cpp and the public ops' routing in csrc/ops/*.cpp), through nvcc
so that the CUDA runtime's headers are found.

Runs without a GPU and with a CPU-only torch, so CUDA code cannot rot unseen:
    python scripts/check_cuda_compile.py [--arch sm_90] [files...]

--torch-root compiles against another torch's headers instead of the installed
one's, e.g. the GPU machine's torch 2.11 (its C++ API differs: autograd nodes are
std::shared_ptr there, c10::intrusive_ptr in 2.13):
    pip download torch==2.11.0 --no-deps -d /tmp/t && unzip -q /tmp/t/torch-*.whl 'torch/include/*' 'torch/version.py' -d /tmp/t
    python scripts/check_cuda_compile.py --torch-root /tmp/t/torch
Exit status is non-zero when any file fails; nvcc's diagnostics are printed.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cxx_standard(version: str) -> str:
    """The standard torch's BuildExtension gives the real build (setup.py passes none):
    C++17 up to torch 2.11, C++20 from 2.12."""
    major, minor = (int(v) for v in version.split(".")[:2])
    return "c++20" if (major, minor) >= (2, 12) else "c++17"


def torch_headers(torch_root: Path | None) -> tuple[list[str], str, int]:
    """Include dirs, version and C++ ABI of the installed torch, or of the torch
    package at torch_root (an unpacked wheel: include/ and version.py)."""
    if torch_root is None:
        import torch
        from torch.utils import cpp_extension

        return cpp_extension.include_paths(), torch.__version__, int(torch.compiled_with_cxx11_abi())
    text = (torch_root / "version.py").read_text()
    version = text.split("__version__ = ")[1].split()[0].strip("'\"")
    inc = [str(torch_root / "include"), str(torch_root / "include" / "torch" / "csrc" / "api" / "include")]
    return inc, version, 1  # wheels since torch 2.7 use the C++11 ABI


def compile_flags(arch: str, shim_dir: str, torch_root: Path | None = None) -> list[str]:
    paths, version, abi = torch_headers(torch_root)
    inc = [f"-I{p}" for p in paths]
    return [
        f"-std={cxx_standard(version)}", f"-arch={arch}", "-O2", "--expt-relaxed-constexpr",
        # Same macros setup.py gives the real build (torch.utils.cpp_extension adds them there).
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        # a C++20 bit-field initialiser in torch's headers: harmless under C++17 (torch 2.11).
        "-diag-suppress", "3306", "-Xcompiler", "-Wno-c++20-extensions", "-Xcompiler", "-fPIC", f"-I{ROOT / 'csrc'}", f"-I{sysconfig.get_paths()['include']}",
        *inc, f"-I{shim_dir}",
    ]


def make_shim(tmp: str, torch_root: Path | None = None) -> str:
    """CPU wheels lack c10/cuda/impl/cuda_cmake_macros.h (generated in CUDA builds)."""
    have = any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in torch_headers(torch_root)[0])
    d = Path(tmp) / "shim"
    if not have:
        (d / "c10/cuda/impl").mkdir(parents=True)
        (d / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return str(d)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--torch-root", type=Path, help="a torch package directory whose headers to use")
    ap.add_argument("files", nargs="*")
    args = ap.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("check_cuda_compile: nvcc not found (set CUDA_HOME or put nvcc on PATH)", file=sys.stderr)
        return 2
    files = [Path(f) for f in args.files] or (sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
                                               + [ROOT / "csrc" / "dtkernels.cpp"]
                                               + sorted((ROOT / "csrc" / "ops").glob("*.cpp")))
    if not files:
        print("check_cuda_compile: no .cu files", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        flags = compile_flags(args.arch, make_shim(tmp, args.torch_root), args.torch_root)

        def one(f: Path) -> tuple[Path, int, str, float]:
            t = time.time()
            cmd = [nvcc, *flags, "-DDTK_WITH_CUDA=1", "-c", str(f), "-o", str(Path(tmp) / (f.stem + f.suffix + ".o"))]
            p = subprocess.run(cmd, capture_output=True, text=True)
            return f, p.returncode, p.stdout + p.stderr, time.time() - t

        failed = 0
        with cf.ThreadPoolExecutor(max_workers=args.jobs) as ex:
            for f, rc, log, dt in ex.map(one, files):
                rel = f.relative_to(ROOT) if f.is_absolute() and ROOT in f.parents else f
                print(f"{'ok  ' if rc == 0 else 'FAIL'} {rel} ({dt:.0f} s)")
                ours = [l for l in log.splitlines() if "warning" in l and str(ROOT / "csrc") in l]
                if rc != 0 or ours:
                    print(log)
                failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
