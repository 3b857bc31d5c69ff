"""fuse(): dtkernels' fused ops in a model's traced graph (torch.fx), for the code in
a forward that convert() cannot reach.

    model = dtk.fx.fuse(model)      # a torch.fx.GraphModule sharing model's parameters

Rewrites, where the intermediate has no other use:

- ``torch.cat([F.interpolate(x, scale_factor=s, mode=m), skip], 1)`` (either order;
  ``nn.Upsample``, ``nn.UpsamplingNearest2d`` and ``nn.UpsamplingBilinear2d`` too;
  nearest or bilinear, integer s; or ``size=``, e.g. ``skip.shape[2:]``, used when it
  is a whole multiple of x's size) -> ``concat_skip``;
- ``relu(a + b)`` (``F.relu``, ``torch.relu``, ``.relu()``, ``nn.ReLU``; ``+``,
  ``torch.add``, ``.add()``; torchvision's ResNet blocks' ``out += identity``, which
  torch.fx traces as ``out + identity``) -> ``residual_add``;
- ``F.max_pool2d`` -> ``dtkernels.max_pool2d``; ``nn.MaxPool2d`` modules as convert().

Each fused call checks at run time what the trace could not (4-D tensors of one
float dtype and device, the sizes the op needs) and otherwise runs the original
ops, so a rewritten model accepts whatever the original did.
"""
from __future__ import annotations

import inspect
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import nn as dnn
from . import ops

__all__ = ["fuse"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _same_kind(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
            and a.dtype in _FLOATS and a.device == b.device)


def concat_upsampled(x, skip, upsample: str, scale_factor, align_corners: bool, skip_first: bool, size=None):
    """``cat([interpolate(x), skip], 1)`` (skip_first: ``cat([skip, interpolate(x)], 1)``)
    through concat_skip when it applies, else through those ops. interpolate's
    ``size`` (scale_factor None) applies when it is a whole multiple of x's, the same
    in both dimensions: ATen's results are then those of that scale, bit for bit."""
    s = scale_factor if size is None else _whole_multiple(x, size)
    if (s is not None and _same_kind(x, skip) and x.dim() == 4 and skip.dim() == 4
            and x.shape[0] == skip.shape[0] and skip.shape[2:] == (x.shape[2] * s, x.shape[3] * s)):
        return ops.concat_skip(x, skip, upsample=upsample, scale_factor=s, align_corners=align_corners,
                               skip_first=skip_first)
    kw = {"align_corners": align_corners} if upsample == "bilinear" else {}
    up = F.interpolate(x, size=size, scale_factor=scale_factor, mode=upsample, **kw)
    return torch.cat([skip, up] if skip_first else [up, skip], 1)


def _whole_multiple(x, size):
    """s when size is (s * H, s * W) for x's H, W and an integer s >= 1, else None."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return None
    ints = (int, torch.SymInt)  # SymInt: compiled with dynamic shapes
    h, w = (size, size) if isinstance(size, ints) else tuple(size) if len(size) == 2 else (None, None)
    if not (isinstance(h, ints) and isinstance(w, ints)) or x.shape[2] == 0 or x.shape[3] == 0:
        return None
    s = h // x.shape[2]
    return s if s >= 1 and h == s * x.shape[2] and w == s * x.shape[3] else None


def add_relu(a, b, alpha=1):
    """``relu(a + alpha * b)`` through residual_add when it applies (same shape, dtype
    and device), else through those ops."""
    if _same_kind(a, b) and a.shape == b.shape:
        return ops.residual_add(a, b, alpha=alpha)
    return torch.relu(torch.add(a, b, alpha=alpha))


def fuse(model: nn.Module, *, concat: bool = True, residual: bool = True, max_pool: bool = True) -> fx.GraphModule:
    """A GraphModule running ``model`` with the rewrites above (``model`` may already
    be one; it is traced with ``torch.fx.symbolic_trace`` otherwise, so its forward
    must be traceable). The result shares ``model``'s parameters and buffers; the
    modules that change (nn.MaxPool2d) are replaced in the result only."""
    gm = model if isinstance(model, fx.GraphModule) else _trace(model)
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if concat and _is_call(node, torch.cat, torch.concat, torch.concatenate):
            _fuse_concat(gm, node, modules)
        elif residual and _relu_input(node, modules) is not None:
            _fuse_residual(gm, node, modules)
        elif max_pool and _is_call(node, F.max_pool2d):
            node.target = ops.max_pool2d
    if max_pool:
        for name, m in list(gm.named_children()):
            new = dnn.convert(m, max_pool=True, dense_blocks=False)
            if new is not m:
                setattr(gm, name, new)
    gm.graph.lint()
    gm.recompile()
    return gm


class _Tracer(fx.Tracer):
    """symbolic_trace, with dtkernels' own modules and public functions kept whole
    (a model may already use some)."""

    def __init__(self):
        import dtkernels

        super().__init__(autowrap_modules=(math, dtkernels),  # math: Tracer's own default
                         autowrap_functions=(ops.residual_add, ops.concat_skip, ops.max_pool2d))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__ == dnn.__name__ or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _is_call(node: fx.Node, *targets) -> bool:
    return node.op == "call_function" and any(node.target is t for t in targets)


def _bind(fn, node: fx.Node):
    try:
        b = inspect.signature(fn).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    b.apply_defaults()
    return b.arguments


def _int_scale(s):
    if isinstance(s, (tuple, list)):
        if len(s) != 2 or s[0] != s[1]:
            return None
        s = s[0]
    if isinstance(s, bool) or not isinstance(s, (int, float)) or s < 1 or int(s) != s:
        return None
    return int(s)


def _upsample_of(node: fx.Node, modules):
    """(x, mode, scale, align_corners, size) when node upsamples one tensor as
    concat_skip can: by an integer scale (size None), or to a size (scale None) that
    concat_upsampled checks per call."""
    if node.op == "call_module" and type(modules.get(node.target)) in (
            nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d):
        m = modules[node.target]
        if len(node.args) != 1 or node.kwargs:
            return None
        a = {"input": node.args[0], "size": m.size, "scale_factor": m.scale_factor, "mode": m.mode,
             "align_corners": m.align_corners, "recompute_scale_factor": m.recompute_scale_factor,
             "antialias": False}
    elif _is_call(node, F.interpolate, F.upsample):
        a = _bind(F.interpolate, node)
        if a is None:
            return None
    else:
        return None
    s = _int_scale(a["scale_factor"])
    if ((s is None) == (a["size"] is None) or a["mode"] not in ("nearest", "bilinear") or a["antialias"]
            or a["recompute_scale_factor"] or not isinstance(a["input"], fx.Node)):
        return None
    ac = a["align_corners"]
    if a["mode"] == "nearest" and ac is not None:
        return None
    return a["input"], a["mode"], s, bool(ac), a["size"]


def _fuse_concat(gm: fx.GraphModule, cat: fx.Node, modules) -> None:
    args, kw = list(cat.args), dict(cat.kwargs)
    parts = args[0] if args else kw.pop("tensors", None)
    dim = args[1] if len(args) > 1 else kw.pop("dim", kw.pop("axis", 0))
    if (kw or len(args) > 2 or not isinstance(parts, (list, tuple)) or len(parts) != 2 or parts[0] is parts[1]
            or dim not in (1, -3)):
        return
    for i, part in enumerate(parts):
        up = _upsample_of(part, modules) if isinstance(part, fx.Node) and len(part.users) == 1 else None
        if up is None or not isinstance(parts[1 - i], fx.Node):
            continue
        x, mode, s, ac, size = up
        with gm.graph.inserting_before(cat):
            new = gm.graph.call_function(concat_upsampled, (x, parts[1 - i], mode, s, ac, i == 1),
                                         {"size": size} if size is not None else {})
        cat.replace_all_uses_with(new)
        gm.graph.erase_node(cat)
        gm.graph.erase_node(part)
        return


def _relu_input(node: fx.Node, modules):
    """The value a relu reads, when node is one."""
    if _is_call(node, F.relu, torch.relu, torch.relu_):
        a = _bind(F.relu, node)
        return a["input"] if a else None
    if (node.op == "call_method" and node.target in ("relu", "relu_")) or (
            node.op == "call_module" and type(modules.get(node.target)) is nn.ReLU):
        return node.args[0] if len(node.args) == 1 and not node.kwargs else None
    return None


def _add_operands(node: fx.Node):
    """(a, b, alpha) when node adds two graph values."""
    if _is_call(node, operator.add, torch.add) or (node.op == "call_method" and node.target == "add"):
        args = list(node.args) + [None] * 2
        a, b = args[0], node.kwargs.get("other", args[1])
        alpha = node.kwargs.get("alpha", args[2] if len(node.args) > 2 else 1)
        if set(node.kwargs) - {"other", "alpha"}:
            return None
    else:
        return None
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or isinstance(alpha, (fx.Node, bool)):
        return None
    return a, b, alpha


def _fuse_residual(gm: fx.GraphModule, relu: fx.Node, modules) -> None:
    add = _relu_input(relu, modules)
    if not isinstance(add, fx.Node) or len(add.users) != 1:
        return
    operands = _add_operands(add)
    if operands is None:
        return
    a, b, alpha = operands
    with gm.graph.inserting_before(relu):
        new = gm.graph.call_function(add_relu, (a, b, alpha))
    relu.replace_all_uses_with(new)
    gm.graph.erase_node(relu)
    gm.graph.erase_node(add)
