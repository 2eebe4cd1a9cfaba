"""Rewrite matched linears into the quantized custom ops.

Each quantized linear ``linear(x, w, b)`` becomes ``quantized_linear(x, values,
scale, h, b, ...)`` where values, scale and h are *new graph inputs* (appended
after the existing placeholders): the caller supplies the prepared weights at
every call (see weights.py), so the graph holds no weight constants.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ..ops import quantized_linear
from .match import LinearMatch


@dataclass
class Rewrite:
    match: LinearMatch
    scheme: str
    group_size: int
    with_rotation: bool  # whether an h input is added


def rewrite_linears(gm: fx.GraphModule, rewrites: list[Rewrite]) -> fx.GraphModule:
    """Rewrite in place and return gm. Extra inputs, in order, per rewrite: values, scale[, h]."""
    graph = gm.graph
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for i, rw in enumerate(rewrites):
        names = ["values", "scale"] + (["h"] if rw.with_rotation else [])
        new_inputs = []
        for name in names:
            with graph.inserting_after(anchor):
                anchor = graph.placeholder(f"convrot_{i}_{name}")
            new_inputs.append(anchor)
        node = rw.match.node
        args = list(node.args) + [None] * 3
        x = args[0]
        bias = node.kwargs.get("bias", args[2])
        h = new_inputs[2] if rw.with_rotation else None
        with graph.inserting_before(node):
            new = graph.call_function(quantized_linear, (x, new_inputs[0], new_inputs[1], h, bias, rw.scheme,
                                                         rw.group_size, rw.match.out_features))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
        new.meta["convrot"] = {"module": rw.match.name, "scheme": rw.scheme}
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm
