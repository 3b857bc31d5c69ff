"""Public operators. Importing a module here registers its op's kernels, fake
(meta) implementation and autograd formula with torch.library."""
from .residual_add import residual_add
from .concat_skip import concat_skip
from . import dense_block  # noqa: F401  (dtkernels.nn.DenseBlock's ops)
from .max_pool2d import max_pool2d

from ._common import DECOMPOSITIONS


def decompositions() -> dict:
    """torch.export decompositions of every dtkernels op into ATen ops, for
    ``ExportedProgram.run_decompositions`` (lowering a model to ATen alone: ONNX,
    runtimes without this library). Forward ops and the backward ops with an ATen
    reference; dense_block_backward has none. Merge with torch's own table to
    decompose both::

        table = torch.export.default_decompositions()
        table.update(dtkernels.decompositions())
        ep = torch.export.export(model, (x,)).run_decompositions(table)
    """
    return dict(DECOMPOSITIONS)


__all__ = ["residual_add", "concat_skip", "max_pool2d", "decompositions"]
