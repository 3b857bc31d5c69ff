"""Builds dtkernels._C: the C++ CPU kernels always, the CUDA kernels when torch has
CUDA and nvcc is found (or FORCE_CUDA=1; DTKERNELS_NO_CUDA=1: never). TORCH_CUDA_ARCH_LIST
picks the GPU archs; unset, the visible GPUs' (cpp_extension), or with none visible the
archs torch itself was built for.

Build against the torch you will run with:  pip install --no-build-isolation .
(an isolated build would download a separate torch, a CUDA build of several GB).
"""
import datetime
import glob
import os
import platform
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - explained to the user
    sys.exit("dtkernels: building needs torch installed first "
             "(pip install torch, then pip install --no-build-isolation .)")

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def want_cuda():
    if os.environ.get("DTKERNELS_NO_CUDA", "0") == "1":
        return False
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    if force and torch.version.cuda is None:
        sys.exit("dtkernels: FORCE_CUDA=1 needs a CUDA build of torch; this one is " + torch.__version__)
    return force or (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None)


def default_cuda_arch_list():
    """TORCH_CUDA_ARCH_LIST for a CUDA build on a machine with no GPU to look at (a
    Docker or CI build), where cpp_extension would fail with an IndexError: the archs
    torch itself was built for (e.g. "7.5;8.0;8.6;9.0;10.0;12.0+PTX"), PTX for the newest."""
    import re

    archs = []
    for flag in torch._C._cuda_getArchFlags().split():  # "sm_75 sm_80 ... sm_120", compile-time facts
        m = re.fullmatch(r"sm_(\d+)", flag)
        if m:
            archs.append(f"{int(m.group(1)) // 10}.{int(m.group(1)) % 10}")
    if not archs:
        sys.exit("dtkernels: no GPU is visible to choose the CUDA archs for; set TORCH_CUDA_ARCH_LIST "
                 "(e.g. 9.0 for H100) or DTKERNELS_NO_CUDA=1 for the CPU kernels alone")
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def cuda_arch_flags():
    try:
        return cpp_extension._get_cuda_arch_flags()  # what cpp_extension will pass to nvcc
    except Exception as e:  # pragma: no cover
        return [f"unknown ({e})"]


def write_build_config(with_cuda):
    cfg = {
        "version": VERSION,
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda": with_cuda,
        "cuda_home": cpp_extension.CUDA_HOME if with_cuda else None,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "cuda_arch_flags": cuda_arch_flags() if with_cuda else [],
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    with open(os.path.join(ROOT, "dtkernels", "_build_config.py"), "w") as f:
        f.write("# Written by setup.py: how this copy of dtkernels was built.\n")
        f.write(f"BUILD_CONFIG = {cfg!r}\n")


def project_version():
    # pyproject.toml holds the metadata; read the version from there (no tomllib on 3.10).
    import re
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        return re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M).group(1)


VERSION = project_version()
WITH_CUDA = want_cuda()
if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
    os.environ["TORCH_CUDA_ARCH_LIST"] = default_cuda_arch_list()
    print(f"dtkernels: no GPU visible; building for torch's archs {os.environ['TORCH_CUDA_ARCH_LIST']}")
write_build_config(WITH_CUDA)

sources = ["csrc/dtkernels.cpp"] + rel("csrc/ops/*.cpp") + rel("csrc/cpu/*.cpp")
# No -std: BuildExtension adds torch's own standard (C++17 up to torch 2.11, C++20 from
# 2.12; 2.14's headers need C++20, so forcing C++17 broke installs on newer torch).
cxx_flags = ["-O3", "-fopenmp", "-Wno-c++20-extensions"]
macros = []
# DTK_NO_CLONES=1: the CPU kernels for baseline x86-64 only, a quicker build for the GPU
# check. Not for use: without FMA, float32 residual_add with alpha rounds twice where
# ATen rounds once (the CPU test of its decomposition fails in such a build).
if os.environ.get("DTK_NO_CLONES") == "1":
    macros.append(("DTK_NO_CLONES", "1"))
Extension = cpp_extension.CppExtension
extra = {"cxx": cxx_flags}
if WITH_CUDA:
    sources += rel("csrc/cuda/*.cu")
    Extension = cpp_extension.CUDAExtension
    macros.append(("DTK_WITH_CUDA", "1"))
    extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-diag-suppress", "3306"]

setup(
    ext_modules=[
        Extension(
            "dtkernels._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
