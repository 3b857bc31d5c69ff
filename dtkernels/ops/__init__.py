"""Public operators. Importing a module here registers its op's kernels, fake
(meta) implementation and autograd formula with torch.library."""
from .residual_add import residual_add
from .max_pool2d import max_pool2d

__all__ = ["residual_add", "max_pool2d"]
