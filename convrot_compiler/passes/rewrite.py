"""Rewrite matched linears into the quantized custom ops.

A W4A4 / W8A8 linear ``linear(x, w, b)`` becomes

    q, s = quantize_activation(x, h, G, bits)      # once per (x, bits)
    y = quantized_matmul(q, s, x, values, scale, b, ...)

and a W4A16 linear becomes ``quantized_linear(x, values, scale, None, b, "w4a16", ...)``.
Linears that read the same tensor at the same precision share one activation
quantization: in FLUX that is Q/K/V (and, in the single blocks, the MLP input),
where a rewrite per linear would rotate the same activations three or four
times. With ``fuse`` they also share one GEMM: ``quantized_matmul`` takes their
weights as lists and computes the outputs side by side, and each linear's output
becomes a ``narrow`` of it. Three 3072->3072 GEMMs fill an H100 worse than one
3072->9216, and the weights stay separate tensors, so no
memory is duplicated. With ``gelu_epilogue`` a GELU (tanh form) that is a linear's only user runs in
its GEMM's epilogue (the linear goes last in a fused GEMM, and the GEMM applies the GELU from its
first column): FLUX's MLP up-projections. values, scale and h are *new graph inputs* (appended after
the existing placeholders; one h for the whole graph): the caller supplies the
prepared weights at every call (see weights.py), so the graph holds no weight constants.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from ..ops import (quantize_activation, quantize_cat_activation, quantize_norm_activation, quantized_linear,
                   quantized_matmul)
from .match import LinearMatch
from .producers import is_gelu_tanh, match_cat_producer, match_norm_producer

ACT_BITS = {"w4a4": 4, "w8a8": 8}


@dataclass
class Rewrite:
    match: LinearMatch
    scheme: str
    group_size: int
    with_rotation: bool  # whether the shared rotation input h is passed to its activation quantization
    act_order: str = "natural"  # the channel order its weight was prepared in, which its activations must share


@dataclass
class RewriteResult:
    uses_h: bool                 # whether a shared h input was added after the per-rewrite inputs
    activation_quantizations: int  # quantize_activation nodes inserted
    shared: int                  # linears that reuse another linear's quantized activations
    fused_gemms: int = 0         # GEMMs computing two or more linears
    fused_linears: int = 0       # linears computed by those
    fused_producers: int = 0     # activation quantizations that read a concatenation (and apply a GELU) as they load
    gelu_epilogues: int = 0      # GELUs computed in the epilogue of the GEMM before them
    fused_norms: int = 0         # activation quantizations that compute the adaLN normalization feeding them


class _Replaced(dict):
    """Nodes the rewrite replaced, old -> new. The matches were taken before any rewrite, so an input that
    is itself a rewritten linear's output (a linear feeding a linear, or a GELU moved into an epilogue)
    must be looked up here before it is used."""

    def live(self, node):
        while node in self:
            node = self[node]
        return node


def _replace_linear(graph: fx.Graph, rw: Rewrite, new: fx.Node, replaced: _Replaced) -> None:
    """Route the linear's users to ``new`` (keeping its module provenance) and drop the linear."""
    old = rw.match.node
    replaced[old] = new
    new.meta.update({k: v for k, v in old.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
    new.meta["convrot"] = {"module": rw.match.name, "scheme": rw.scheme}
    for key in ("example_value", "val"):  # its shape and dtype, which later pattern matches read
        if key in old.meta:
            new.meta[key] = old.meta[key]
    old.replace_all_uses_with(new)
    graph.erase_node(old)


def _erase_unused_chain(graph: fx.Graph, node: fx.Node) -> None:
    """Erase node if nothing uses it any more, then its node inputs that this leaves unused."""
    todo = [node]
    while todo:
        n = todo.pop()
        if n.users or n.op != "call_function":
            continue
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        todo.extend(inputs)


def _sole_gelu_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and is_gelu_tanh(users[0]) and users[0].args[0] is node else None


def _drop_gelu(graph: fx.Graph, gelu: fx.Node, replacement: fx.Node, replaced: _Replaced) -> None:
    replaced[gelu] = replacement
    gelu.replace_all_uses_with(replacement)
    graph.erase_node(gelu)


def rewrite_linears(gm: fx.GraphModule, rewrites: list[Rewrite], fuse: bool = True,
                    gemm: str = "kernel", fuse_producers: bool | str = False,
                    gelu_epilogue: bool = False, fuse_norms: bool = False) -> RewriteResult:
    """Rewrite gm in place. Extra inputs, in order: values, scale per rewrite, then h if any rewrite rotates.
    ``gemm``: how each quantized_matmul computes (see ops.quantized_matmul). ``fuse_producers``: a
    concatenation producing a quantized input is read inside its quantization; ``"gelu"``: a GELU
    producing it (or its concatenation's second part) is applied there too (producers.py).
    ``gelu_epilogue`` (gemm="kernel" only, as backend.validate_options checks): a GELU after a quantized
    linear runs in its GEMM's epilogue. ``fuse_norms``: FLUX's adaLN normalization producing a quantized
    input, when only quantized linears read it, is computed inside its quantization (producers.py)."""
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

    order = {n: i for i, n in enumerate(graph.nodes)}
    groups: dict[tuple, list[int]] = {}
    for i, rw in enumerate(rewrites):
        if rw.scheme != "w4a16":
            groups.setdefault((rw.match.x, ACT_BITS[rw.scheme], rw.group_size, rw.with_rotation, rw.act_order),
                              []).append(i)

    quantized_nodes = {rewrites[i].match.node for m in groups.values() for i in m}
    fused_gemms = fused_linears = fused_producers = gelu_epilogues = fused_norms = 0
    dropped: list[fx.Node] = []
    replaced = _Replaced()
    for (x, bits, group_size, with_rotation, act_order), members in groups.items():
        x = replaced.live(x)
        first = min((rewrites[i].match.node for i in members), key=order.__getitem__)
        producer = match_cat_producer(x, group_size, gelu=fuse_producers == "gelu") if fuse_producers else None
        norm = (match_norm_producer(x, group_size) if fuse_norms and producer is None and x.users.keys() <= quantized_nodes
                else None)
        shape_of = x  # what the GEMMs read for the output's shape and dtype (not its values)
        gelus = {i: g for i in members if gelu_epilogue and (g := _sole_gelu_user(rewrites[i].match.node))}
        members = sorted(members, key=lambda i: i in gelus)  # GELU outputs last: one gelu_from column
        with graph.inserting_before(first):
            if producer is not None:
                a, b, gelu = producer
                qs = graph.call_function(quantize_cat_activation, (a, b, h if with_rotation else None,
                                                                  group_size, bits, gelu, act_order))
                shape_of = b  # same leading dims and dtype as x: the GELU and cat can go
                fused_producers += 1
                dropped.append(x)
            elif norm is not None:
                inp, mod_scale, mod_shift, eps = norm
                qs = graph.call_function(quantize_norm_activation, (inp, mod_scale, mod_shift, eps,
                                                                   h if with_rotation else None, group_size, bits,
                                                                   act_order))
                shape_of = inp  # same leading dims and dtype as x: the normalization can go
                fused_norms += 1
                dropped.append(x)
            else:
                qs = graph.call_function(quantize_activation, (x, h if with_rotation else None, group_size, bits,
                                                               act_order))
            q = graph.call_function(operator.getitem, (qs, 0))
            s = graph.call_function(operator.getitem, (qs, 1))
        # one GEMM for the group when every bias is computed before the group's first linear
        biases = [replaced.live(rewrites[i].match.bias) for i in members]
        fusable = fuse and len(members) > 1 and all(
            not isinstance(b, fx.Node) or order.get(b, len(order)) < order[first] for b in biases)
        if fusable:
            scheme = rewrites[members[0]].scheme
            total = sum(rewrites[i].match.out_features for i in members)
            gelu_from = sum(rewrites[i].match.out_features for i in members if i not in gelus) if gelus else None
            with graph.inserting_before(first):
                out = graph.call_function(quantized_matmul, (
                    q, s, shape_of, [weights[i][0] for i in members], [weights[i][1] for i in members],
                    biases, scheme, group_size, total, gemm, gelu_from))
                out.meta["convrot"] = {"modules": [rewrites[i].match.name for i in members], "scheme": scheme}
                start, parts = 0, []
                for i in members:
                    parts.append(graph.call_function(torch.narrow, (out, -1, start, rewrites[i].match.out_features)))
                    start += rewrites[i].match.out_features
            for i, part in zip(members, parts):
                _replace_linear(graph, rewrites[i], part, replaced)
                if i in gelus:
                    _drop_gelu(graph, gelus[i], part, replaced)
            gelu_epilogues += len(gelus)
            fused_gemms += 1
            fused_linears += len(members)
            continue
        for i in members:
            rw = rewrites[i]
            with graph.inserting_before(rw.match.node):
                new = graph.call_function(quantized_matmul, (q, s, shape_of, weights[i][0], weights[i][1],
                                                             replaced.live(rw.match.bias), rw.scheme, rw.group_size,
                                                             rw.match.out_features, gemm, 0 if i in gelus else None))
            _replace_linear(graph, rw, new, replaced)
            if i in gelus:
                _drop_gelu(graph, gelus[i], new, replaced)
                gelu_epilogues += 1

    for i, rw in enumerate(rewrites):
        if rw.scheme == "w4a16":
            with graph.inserting_before(rw.match.node):
                new = graph.call_function(quantized_linear, (replaced.live(rw.match.x), weights[i][0], weights[i][1],
                                                             None, replaced.live(rw.match.bias), rw.scheme,
                                                             rw.group_size, rw.match.out_features))
            _replace_linear(graph, rw, new, replaced)
    for node in dict.fromkeys(dropped):  # a GELU / concatenation / normalization that only fed quantizations
        _erase_unused_chain(graph, node)
    graph.lint()
    gm.recompile()
    n_quantized = sum(len(m) for m in groups.values())
    return RewriteResult(h is not None, len(groups), n_quantized - len(groups), fused_gemms, fused_linears,
                         fused_producers, gelu_epilogues, fused_norms)
