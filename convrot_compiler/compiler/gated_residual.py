"""A quantized linear's gated residual, which its GEMM's epilogue can absorb (option ``residual_epilogue``).

DiT blocks end each branch with ``x = x + gate * linear(h)`` (FLUX: proj_out in the single blocks, to_out,
to_add_out and both feed-forward down-projections in the double blocks), gate one row per sample. Unfused, the GEMM
writes ``linear(h)`` and an Inductor kernel reads it back beside x to write the sum: at 1024x1024 about 85 MB of
traffic per call, 1.5 ms of a FLUX.1-dev forward on an H100 in kernels of their own. The GEMM's epilogue reads x's
tile instead and writes the sum (quant.gated_residual: float32, one rounding, as Inductor's kernel computes it).
This module recognises the pattern in the Dynamo graph; emit.py inserts the op.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from .match import _example
from .producers import is_inference_dropout

_MUL = (operator.mul, torch.mul)
_ADD = (operator.add, torch.add)


@dataclass(frozen=True)
class GatedResidual:
    add: fx.Node                  # residual + gate * y: what the GEMM's output replaces
    residual: fx.Node             # [B, S, N], y's shape and dtype
    gate: fx.Node                 # [B, 1, N], or the [B, N] it unsqueezes (Dynamo traces the unsqueeze late)
    between: tuple[fx.Node, ...]  # the nodes from y to the add (an inference dropout, the product), erased with it


def _sole_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _other(node: fx.Node, operand: fx.Node, targets) -> fx.Node | None:
    """The other operand of a binary ``targets`` call ``node`` with ``operand`` as one of two tensor operands."""
    if node.op != "call_function" or node.target not in targets or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    other = b if a is operand else a if b is operand else None
    return other if isinstance(other, fx.Node) and other is not operand else None


def _unsqueezed(node: fx.Node) -> fx.Node | None:
    """x when node is x.unsqueeze(1) (or torch.unsqueeze(x, 1)) of a 2-dimensional x, else None."""
    if not (node.op == "call_method" and node.target == "unsqueeze") and not (
            node.op == "call_function" and node.target is torch.unsqueeze):
        return None
    x = node.args[0] if node.args else None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    xv = _example(x)
    return x if isinstance(xv, torch.Tensor) and xv.dim() == 2 and dim in (1, -2) else None


def match_gated_residual(y: fx.Node) -> GatedResidual | None:
    """The gated residual ``y`` (a linear's output [B, S, N]) is the only input of, possibly behind an inference
    dropout: residual + gate * y (either operand order) with gate [B, 1, N] and the residual y's shape, all of y's
    floating dtype; else None."""
    yv = _example(y)
    if not isinstance(yv, torch.Tensor) or yv.dim() != 3 or not yv.is_floating_point():
        return None
    between = []
    node = y
    user = _sole_user(node)
    if user is not None and is_inference_dropout(user) and user.args[0] is node:
        between.append(user)
        node, user = user, _sole_user(user)
    if user is None:
        return None
    gate = _other(user, node, _MUL)
    add = _sole_user(user) if gate is not None else None
    residual = _other(add, user, _ADD) if add is not None else None
    if residual is None:
        return None
    gv, rv, av = _example(gate), _example(residual), _example(add)
    b, _, n = yv.shape
    if not all(isinstance(v, torch.Tensor) and v.dtype == yv.dtype for v in (gv, rv, av)):
        return None
    if tuple(gv.shape) != (b, 1, n) or rv.shape != yv.shape or av.shape != yv.shape:
        return None
    return GatedResidual(add, residual, _unsqueezed(gate) or gate, (*between, user))
