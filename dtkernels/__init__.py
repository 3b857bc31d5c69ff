"""dtkernels: hand-written C++, CUDA C++ and Triton kernels for the building blocks
of encoder-decoder and segmentation networks, as PyTorch operators.

    import dtkernels as dtk
    y = dtk.residual_add(x, fx)                 # relu(x + fx), one pass
    with dtk.use_backend("triton"): ...
"""
import torch  # noqa: F401  (loads libtorch before the native library)

try:
    from . import _C  # registers torch.ops.dtkernels.* (schemas, CPU and CUDA kernels)
except ImportError as e:  # pragma: no cover - a message for an unbuilt checkout
    raise ImportError(
        "dtkernels: the native library dtkernels._C is not built or does not match this torch "
        f"({e}). Build it with `make build` (or `pip install --no-build-isolation .`)."
    ) from e

from . import ops  # noqa: E402  (registers every public op)
from .backends import available_backends, get_backend, use_backend  # noqa: E402
from .info import build_info  # noqa: E402
from .ops import residual_add  # noqa: E402
from .ops import concat_skip  # noqa: E402
from .ops import max_pool2d  # noqa: E402
from .ops import decompositions  # noqa: E402
from . import nn, reference, testing  # noqa: E402
from . import fx  # noqa: E402  (after nn: fuse() uses convert)

from .info import VERSION as __version__  # noqa: E402

__all__ = [
    "residual_add",
    "concat_skip",
    "max_pool2d",
    "decompositions",
    "use_backend",
    "get_backend",
    "available_backends",
    "build_info",
    "nn",
    "fx",
    "reference",
]
