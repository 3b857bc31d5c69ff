"""Builds dtkernels._C: the C++ CPU kernels always, the CUDA kernels when torch has
CUDA and nvcc is found (or FORCE_CUDA=1). TORCH_CUDA_ARCH_LIST picks the GPU archs.

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
write_build_config(WITH_CUDA)

sources = ["csrc/dtkernels.cpp"] + rel("csrc/ops/*.cpp") + rel("csrc/cpu/*.cpp")
cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-Wno-c++20-extensions"]
macros = []
Extension = cpp_extension.CppExtension
extra = {"cxx": cxx_flags}
if WITH_CUDA:
    sources += rel("csrc/cuda/*.cu")
    Extension = cpp_extension.CUDAExtension
    macros.append(("DTK_WITH_CUDA", "1"))
    extra["nvcc"] = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-diag-suppress", "3306"]

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
