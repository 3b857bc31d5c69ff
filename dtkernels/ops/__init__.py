"""Public operators. Importing a module here registers its op's kernels, fake
(meta) implementation and autograd formula with torch.library."""
from .residual_add import residual_add
from .concat_skip import concat_skip
from . import dense_block  # noqa: F401  (dtkernels.nn.DenseBlock's ops)
from .max_pool2d import max_pool2d

__all__ = ["residual_add", "concat_skip", "max_pool2d"]
