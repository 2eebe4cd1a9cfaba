"""fp8 attention's output read in e4m3 by the quantized linears after it (option ``fuse_attention_output``).

attention_rewrite leaves each fp8 attention's output as ``o = dequantize_e4m3(o8, dv, dtype)``; FLUX's blocks
then only move it (permute, flatten, split, slice, contiguous) before to_out's, to_add_out's or, concatenated
with the MLP's GELU, proj_out's rotate+quantize. Left so, Inductor writes o in 16 bits for the quantization to
read back. Here each such quantization reads ``o8`` through the same moves instead, with ``dv``
(``quantize_e4m3_activation``): its kernel widens the values as it loads them, by dequantize_e4m3's numerics,
so its result is the same bit for bit.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..numerics.fp8_attention import dequantize_e4m3
from ..ops import quantize_activation, quantize_cat_activation, quantize_e4m3_activation, quantized_matmul

_MOVE_METHODS = {"permute", "flatten", "reshape", "view", "contiguous", "transpose", "split", "split_with_sizes",
                 "chunk", "unflatten"}
_MOVE_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.split, torch.chunk}
_QUANTIZATIONS = (quantize_activation, quantize_cat_activation)


def _plain_index(index) -> bool:
    """An index of ints, slices, None and Ellipsis (a view), or a tuple of them; not a tensor index."""
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items)


def _moves(node: fx.Node, dtype: torch.dtype) -> bool:
    """Whether ``node`` only moves its first argument's values (or casts them to ``dtype``, which they have)."""
    if node.op == "call_method":
        if node.target == "to":
            return node.args[1:] == (dtype,) and not node.kwargs
        return node.target in _MOVE_METHODS
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return _plain_index(node.args[1])
    return node.target in _MOVE_FUNCTIONS


def _moved_from_dequantize(x: object) -> tuple[fx.Node, list[fx.Node]] | None:
    """(the dequantize_e4m3 node, the moves from it to x in order) when x is its output moved, else None."""
    chain = []
    while isinstance(x, fx.Node) and x.target is not dequantize_e4m3:
        chain.append(x)
        if not x.args or not isinstance(x.args[0], fx.Node):
            return None
        x = x.args[0]
    if not isinstance(x, fx.Node):
        return None
    dtype = x.args[2]
    if not all(_moves(n, dtype) for n in chain):
        return None
    return x, chain[::-1]


def _gemms_read_shape_of(quantization: fx.Node, x8: fx.Node, dtype: torch.dtype) -> None:
    """The GEMMs on ``quantization``'s values take their output's shape from x8 and its dtype as ``dtype`` (not
    from the 16-bit x, which then has no users left)."""
    x = quantization.args[0]
    for part in list(quantization.users):
        for gemm in list(part.users):
            if gemm.target is quantized_matmul and gemm.args[2] is x:
                gemm.args = (*gemm.args[:2], x8, *gemm.args[3:])
                gemm.kwargs = {**gemm.kwargs, "dtype": dtype}


def _erase_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    for n in reversed(nodes):
        if not n.users:
            graph.erase_node(n)


def read_attention_outputs_in_e4m3(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Rewrite each quantization of a moved dequantize_e4m3 output to read the e4m3 tensor; returns, for each
    dequantize node, how many quantizations now read its e4m3 input."""
    graph, done = gm.graph, {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _QUANTIZATIONS or node.args[0] is None:
            continue
        found = _moved_from_dequantize(node.args[0])
        if found is None:
            continue
        dequantize, chain = found
        o8, dv, dtype = dequantize.args
        if node.target is quantize_activation:
            x2, (h, group_size, bits, order) = None, node.args[1:5]
        else:
            x2, h, group_size, bits, order = node.args[1:6]
        with graph.inserting_before(node):
            moved = {dequantize: o8}
            for n in chain:
                if n.op == "call_method" and n.target == "to":
                    moved[n] = moved[n.args[0]]
                    continue
                moved[n] = graph.node_copy(n, lambda a: moved.get(a, a))
                for key in ("example_value", "val"):  # the 16-bit values' metadata does not hold for e4m3
                    moved[n].meta.pop(key, None)
            x8 = moved[chain[-1]] if chain else o8
            new = graph.call_function(quantize_e4m3_activation, (x8, dv, x2, h, group_size, bits, order, dtype))
        new.meta.update(node.meta)
        _gemms_read_shape_of(node, x8, dtype)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        _erase_unused(graph, [dequantize, *chain])
        done[dequantize] = done.get(dequantize, 0) + 1
    if done:
        graph.lint()
        gm.recompile()
    return done
