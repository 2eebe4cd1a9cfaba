"""V cast to e4m3 by the GEMM that makes it (option ``fuse_value_cast``).

Before fp8 attention V is scaled by a bound proven from its projection's operands (value_bounds.linear_bound) and
cast to e4m3; Inductor runs that cast as a pass that reads V back (FLUX.1-dev's single blocks: 0.60 ms of a forward
in 38 calls on an H100). The bound is known before the GEMM runs, so where V is one linear's columns of a
quantized GEMM and reaches the attention through views only, the GEMM returns those columns in e4m3 as well
(ops.quantized_matmul_e4m3_cols; the sm_90 packed GEMM writes them from its epilogue) and the attention reads them.
The values are the cast's, bit for bit (numerics.fp8_attention.scale_to_e4m3 either way). A V joined from several
GEMMs (FLUX's double blocks concatenate the text and image streams') keeps the pass.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from ..ops import quantized_matmul, quantized_matmul_e4m3_cols
from .value_bounds import Bound, emit

_VIEW_METHODS = {"view", "reshape", "unflatten", "permute", "transpose"}
_VIEW_FUNCTIONS = {torch.permute, torch.transpose, torch.reshape, torch.unflatten}
CAST_IN_GEMM = "its GEMM's epilogue"


@dataclass(frozen=True)
class ValueColumns:
    """V as columns [col, col + width) of the quantized GEMM ``gemm`` (taken by ``narrow``, or all its columns when
    None), then ``views`` (in order) up to the attention's value."""

    gemm: fx.Node
    narrow: fx.Node | None
    col: int
    width: int
    views: tuple[fx.Node, ...]


def _is_view(node: object) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_method" and node.target in _VIEW_METHODS) or
        (node.op == "call_function" and node.target in _VIEW_FUNCTIONS))


def _only_user_is(node: fx.Node, user: fx.Node) -> bool:
    return list(node.users) == [user]


def match_value_columns(value: fx.Node, attention: fx.Node) -> ValueColumns | None:
    """V's columns of one quantized GEMM when ``value`` (the attention's) is made from them by views that nothing
    else reads, else None."""
    views, node, user = [], value, attention
    while _is_view(node) and _only_user_is(node, user):
        views.append(node)
        node, user = node.args[0], node
    if not isinstance(node, fx.Node) or not _only_user_is(node, user):
        return None
    narrow = None
    if node.op == "call_function" and node.target is torch.narrow:
        narrow, (node, dim, col, width) = node, node.args[:4]
        out = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
        if not (isinstance(col, int) and isinstance(width, int) and dim in (-1, None if out is None else out.dim() - 1)):
            return None
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is quantized_matmul):
        return None
    args = list(node.args) + [None] * 10
    out_features = node.kwargs.get("out_features", args[8])
    gelu_from = node.kwargs.get("gelu_from", args[9])
    if narrow is None:
        col, width = 0, out_features
    if not isinstance(out_features, int) or (gelu_from is not None and col + width > gelu_from):
        return None
    return ValueColumns(node, narrow, col, width, tuple(reversed(views)))


def cast_in_gemm(graph: fx.Graph, cols: ValueColumns, bound: Bound) -> tuple[fx.Node, fx.Node]:
    """Replace ``cols.gemm`` by ``quantized_matmul_e4m3_cols`` with V's ``bound`` emitted before it, and return the
    nodes of (e4m3 V through ``cols.views``, inserted at the graph's current insertion point; its descale). The
    16-bit V's views are left for the caller to erase once the attention no longer reads them."""
    gemm = cols.gemm
    with graph.inserting_before(gemm):
        amax = emit(graph, bound, {})
        call = graph.call_function(quantized_matmul_e4m3_cols, gemm.args,
                                   {**gemm.kwargs, "col": cols.col, "width": cols.width, "bound": amax})
        out, out8, descale = (graph.call_function(operator.getitem, (call, i)) for i in range(3))
    out.meta.update(gemm.meta)
    gemm.replace_all_uses_with(out)
    graph.erase_node(gemm)
    v8, first = out8, cols.views[0].args[0] if cols.views else None
    for view in cols.views:
        v8 = graph.node_copy(view, lambda n, before=first, after=v8: after if n is before else n)
        first = view
    return v8, descale


def erase_unread(graph: fx.Graph, cols: ValueColumns) -> None:
    """Erase the 16-bit V's views and narrow where nothing reads them any more."""
    for node in (*reversed(cols.views), cols.narrow):
        if node is not None and not node.users:
            graph.erase_node(node)
