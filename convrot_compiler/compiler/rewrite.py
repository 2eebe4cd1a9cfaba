"""Rewrite the quantized linears of a Dynamo graph into the convrot ops (the backend's graph form).

A W4A4 / W8A8 linear ``linear(x, w, b)`` becomes

    q, s = quantize_activation(x, h, G, bits, order)     # once per (x, bits, order)
    y = quantized_matmul(q, s, x, [values], [scale], [b], ...)

and a weight-only linear ``quantized_linear(x, values, scale, None, b, "w4a16" or "w8a16", ...)``; emit.py
groups them.
Linears reading one tensor at one precision share its rotate+quantize (FLUX's Q/K/V, and in the single
blocks the MLP input too) and, with ``fuse``, one GEMM whose output each takes a ``narrow`` of: three
3072->3072 GEMMs fill an H100 worse than one 3072->9216, and the weights stay separate tensors, so no
memory is duplicated. With ``gelu_epilogue`` a GELU (tanh form) that is a linear's only user runs in its
GEMM's epilogue (FLUX's MLP up-projections); with ``fuse_producers`` a concatenation feeding a quantized
linear is read in place by its rotate+quantize, and with ``fuse_norms`` so is the adaLN normalization feeding a
block's first quantized linears (producers.py). values, scale and h are *new graph inputs*
(appended after the existing placeholders; one h for the whole graph): the caller passes the prepared
weights at every call (weights.py), so the graph holds no weight constants.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass

import torch
from torch import fx

from ..numerics.quant import WEIGHT_ONLY
from ..ops import (
    pca_matmul_like,
    pca_quantize_activation,
    quantize_activation,
    quantize_adaln_activation,
    quantize_cat_activation,
    quantized_linear,
    quantized_matmul,
)
from ..ops.dispatch import adaln_fusion_unsupported
from .emit import OUT_FEATURES, ROW_BOUNDS, Emitted, QuantizedUse, emit
from .match import LinearMatch
from .producers import AdaLNProducer, is_gelu_tanh, match_adaln_producer, match_cat_producer


@dataclass
class Rewrite:
    match: LinearMatch
    scheme: str
    act_order: str = "natural"  # the channel order its weight was prepared in, which its activations must share
    pca_rank: int | None = None  # DiRotQ: the 16-bit subspace's size (its weight has four tensors, not two)
    share: str | None = None     # DiRotQ: the calibration's name of the input it reads (one basis per input)
    row_bounds: bool = False     # the graph also takes its weight's row bounds (a bound on its output: fp8 V)

    @property
    def input_names(self) -> tuple[str, ...]:
        """Its prepared weight's tensors, as graph inputs, in the order weights.graph_tensors gives them, then its
        row bounds (QuantizedWeight.row_bounds) where the graph takes them."""
        if self.pca_rank is not None:
            return ("basis", "w_hi", "values", "scale")
        return ("values", "scale", "row_bounds") if self.row_bounds else ("values", "scale")


@dataclass
class RewriteResult(Emitted):
    uses_h: bool = False         # whether a shared h input was added after the per-rewrite inputs
    fused_producers: int = 0     # activation quantizations that read a concatenation as they load
    fused_norms: int = 0         # activation quantizations that compute the adaLN normalization feeding them


class _DynamoForm:
    """emit.GraphForm for Dynamo's torch-level graph."""

    def __init__(self, graph: fx.Graph, h: fx.Node | None, group_size: int, fuse_producers: bool,
                 fuse_norms: bool = False, quantized: frozenset = frozenset()):
        self.graph, self.h, self.group_size, self.fuse_producers = graph, h, group_size, fuse_producers
        self.fuse_norms, self.quantized = fuse_norms, quantized
        self.fused_producers = self.fused_norms = 0
        self.absorbed: list[fx.Node] = []  # concatenations and normalizations now computed inside a quantization
        self.norms_kept: dict[str, int] = {}  # why fusable normalizations stay with Inductor: how many each

    def _adaln(self, x: fx.Node) -> AdaLNProducer | None:
        """x's adaLN normalization, when only the rewritten quantized linears read x, its rows are the graph's
        inputs (a block's, compiled regionally) and the kernel that would compute it runs where the graph does
        (dispatch.adaln_fusion_unsupported; else the reason is counted in ``norms_kept``). Rows the graph computes (FLUX's norm2 after the gated residual, or every
        block's input when the whole forward is one graph) have their normalization in the kernel that writes
        them: fusing it would save that kernel's second output alone, for a costlier rotate+quantize."""
        if not self.fuse_norms or not x.users.keys() <= self.quantized:
            return None
        producer = match_adaln_producer(x)
        value = x.meta.get("example_value", x.meta.get("val"))
        if producer is None or value is None:
            return None
        if any(p.op != "placeholder" for p in (producer.x, producer.x2) if p is not None):
            return None
        why = adaln_fusion_unsupported(value.device, value.dtype, value.shape[-1])
        if why is not None:
            self.norms_kept[why] = self.norms_kept.get(why, 0) + 1
            return None
        return producer

    def quantize(self, x, bits, act_order):
        call = self.graph.call_function
        producer = match_cat_producer(x, self.group_size) if self.fuse_producers else None
        adaln = self._adaln(x) if producer is None else None
        if adaln is not None:
            qs = call(quantize_adaln_activation, (adaln.x, adaln.x2, adaln.scale, adaln.shift, adaln.eps, self.h,
                                                  self.group_size, bits, act_order))
            self.fused_norms += 1
            self.absorbed.append(x)
            like = adaln.tokens  # x's shape and dtype: the normalization can go
        elif producer is not None:
            a, b = producer
            qs = call(quantize_cat_activation, (a, b, self.h, self.group_size, bits, act_order))
            self.fused_producers += 1
            self.absorbed.append(x)
            like = b  # same leading dims and dtype as x: the concatenation can go
        else:
            qs = call(quantize_activation, (x, self.h, self.group_size, bits, act_order))
            like = x
        return call(operator.getitem, (qs, 0)), call(operator.getitem, (qs, 1)), like

    def gemm(self, q, s, like, uses, biases, gelu_from):
        total = sum(u.out_features for u in uses)
        return self.graph.call_function(quantized_matmul, (
            q, s, like, [u.values for u in uses], [u.scale for u in uses], biases, uses[0].scheme, self.group_size,
            total, gelu_from))

    def column_block(self, out, start, length):
        return self.graph.call_function(torch.narrow, (out, -1, start, length))

    def pca_quantize(self, x, use):
        return self.graph.call_function(pca_quantize_activation, (x, use.basis, self.h, use.rank, self.group_size))

    def pca_gemm(self, zqs, like, use, bias):
        return self.graph.call_function(pca_matmul_like, (zqs, like, use.w_hi, use.values, use.scale, bias,
                                                          self.group_size, use.out_features))

    def weight_only(self, use, x, bias):
        return self.graph.call_function(quantized_linear, (x, use.values, use.scale, None, bias, use.scheme,
                                                           self.group_size, use.out_features))

    def replace(self, old, new):
        new.meta.update({k: v for k, v in old.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
        for key in ("example_value", "val"):  # its shape and dtype, which later pattern matches read
            if key in old.meta:
                new.meta[key] = old.meta[key]
        old.replace_all_uses_with(new)
        self.graph.erase_node(old)


def _sole_gelu_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and is_gelu_tanh(users[0]) and users[0].args[0] is node else None


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


def _new_inputs(graph: fx.Graph, rewrites: list[Rewrite],
                rotated: bool) -> tuple[list[dict[str, fx.Node]], fx.Node | None]:
    """Placeholders after the existing ones: each rewrite's weight tensors (``Rewrite.input_names``), then h if
    any rewrite rotates."""
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    weights = []
    for i, rw in enumerate(rewrites):
        nodes = {}
        for name in rw.input_names:
            with graph.inserting_after(anchor):
                anchor = graph.placeholder(f"convrot_{i}_{name}")
            nodes[name] = anchor
        nodes["values"].meta[OUT_FEATURES] = rw.match.out_features  # the widths of a fused GEMM's column blocks
        if "row_bounds" in nodes:
            nodes["values"].meta[ROW_BOUNDS] = nodes["row_bounds"]
        weights.append(nodes)
    h = None
    if rotated and any(rw.scheme not in WEIGHT_ONLY for rw in rewrites):
        with graph.inserting_after(anchor):
            h = graph.placeholder("convrot_h")
    return weights, h


def rewrite_linears(gm: fx.GraphModule, rewrites: list[Rewrite], group_size: int, rotated: bool, fuse: bool = True,
                    fuse_producers: bool = False, gelu_epilogue: bool = False,
                    fuse_norms: bool = False) -> RewriteResult:
    """Rewrite gm in place. Extra inputs, in order: each rewrite's weight tensors (values, scale; for DiRotQ
    basis, w_hi, values, scale), then h if any rewrite quantizes activations with a rotation (``rotated``)."""
    graph = gm.graph
    weights, h = _new_inputs(graph, rewrites, rotated)
    uses = [QuantizedUse(rw.match.node, rw.match.x, rw.match.bias, w["values"], w["scale"], rw.match.out_features,
                         rw.scheme, rw.act_order,
                         _sole_gelu_user(rw.match.node) if gelu_epilogue and rw.scheme not in WEIGHT_ONLY and
                         rw.pca_rank is None else None,
                         basis=w.get("basis"), w_hi=w.get("w_hi"), rank=rw.pca_rank or 0, share=rw.share)
            for rw, w in zip(rewrites, weights)]
    quantized = frozenset(u.node for u in uses if u.scheme not in WEIGHT_ONLY and not u.is_pca)
    form = _DynamoForm(graph, h, group_size, fuse_producers, fuse_norms, quantized)
    done = emit(graph, uses, form, fuse)
    for node in dict.fromkeys(form.absorbed):  # a concatenation or normalization that only fed quantizations
        _erase_unused_chain(graph, node)
    for why, count in form.norms_kept.items():
        warnings.warn(f"fuse_norms: {count} adaLN normalization(s) stay with Inductor here: {why}")
    graph.lint()
    gm.recompile()
    return RewriteResult(**vars(done), uses_h=h is not None, fused_producers=form.fused_producers,
                         fused_norms=form.fused_norms)
