"""Rewrite matched linears into the quantized custom ops.

A W4A4 / W8A8 linear ``linear(x, w, b)`` becomes

    q, s = quantize_activation(x, h, G, bits)      # once per (x, bits)
    y = quantized_matmul(q, s, x, values, scale, b, ...)

and a W4A16 linear becomes ``quantized_linear(x, values, scale, None, b, "w4a16", ...)``.
Linears that read the same tensor at the same precision share one activation
quantization: in FLUX that is Q/K/V (and, in the single blocks, the MLP input),
where a rewrite per linear would rotate the same activations three or four
times. values, scale and h are *new graph inputs* (appended after the existing
placeholders; one h for the whole graph): the caller supplies the prepared weights
at every call (see weights.py), so the graph holds no weight constants.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from torch import fx

from ..ops import quantize_activation, quantized_linear, quantized_matmul
from .match import LinearMatch

ACT_BITS = {"w4a4": 4, "w8a8": 8}


@dataclass
class Rewrite:
    match: LinearMatch
    scheme: str
    group_size: int
    with_rotation: bool  # whether the shared rotation input h is passed to its activation quantization


@dataclass
class RewriteResult:
    uses_h: bool                 # whether a shared h input was added after the per-rewrite inputs
    activation_quantizations: int  # quantize_activation nodes inserted
    shared: int                  # linears that reuse another linear's quantized activations


def rewrite_linears(gm: fx.GraphModule, rewrites: list[Rewrite]) -> RewriteResult:
    """Rewrite gm in place. Extra inputs, in order: values, scale per rewrite, then h if any rewrite rotates."""
    graph = gm.graph
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    weights = []
    for i, _ in enumerate(rewrites):
        pair = []
        for name in ("values", "scale"):
            with graph.inserting_after(anchor):
                anchor = graph.placeholder(f"convrot_{i}_{name}")
            pair.append(anchor)
        weights.append(pair)
    h = None
    if any(rw.with_rotation for rw in rewrites):
        with graph.inserting_after(anchor):
            h = graph.placeholder("convrot_h")

    quantized: dict[tuple, fx.Node] = {}
    shared = 0
    for rw, (values, scale) in zip(rewrites, weights):
        node = rw.match.node
        args = list(node.args) + [None] * 3
        x = args[0]
        bias = node.kwargs.get("bias", args[2])
        with graph.inserting_before(node):
            if rw.scheme == "w4a16":
                new = graph.call_function(quantized_linear, (x, values, scale, None, bias, rw.scheme, rw.group_size,
                                                             rw.match.out_features))
            else:
                key = (x, ACT_BITS[rw.scheme], rw.group_size, rw.with_rotation)
                qs = quantized.get(key)
                if qs is None:
                    qs = graph.call_function(quantize_activation, (x, h if rw.with_rotation else None,
                                                                   rw.group_size, ACT_BITS[rw.scheme]))
                    quantized[key] = qs
                else:
                    shared += 1
                q = graph.call_function(operator.getitem, (qs, 0))
                s = graph.call_function(operator.getitem, (qs, 1))
                new = graph.call_function(quantized_matmul, (q, s, x, values, scale, bias, rw.scheme, rw.group_size,
                                                             rw.match.out_features))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
        new.meta["convrot"] = {"module": rw.match.name, "scheme": rw.scheme}
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return RewriteResult(h is not None, len(quantized), shared)

