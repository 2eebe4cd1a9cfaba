"""Emit the quantized ops for a graph's quantized linears: the one rewrite both graph forms share.

The ``convrot`` backend rewrites Dynamo's torch-level graph (``linear`` on [..., K] activations, prepared
weights as new placeholders); the Inductor post-grad pass rewrites the aten-level graph after freezing
(``mm`` / ``addmm`` on [M, K] activations, prepared weights as new constants). Both do the same thing:

    q, s = rotate+quantize(x)                       # once per (x, activation bits, channel order)
    y    = quantized GEMM(q, s, [w_1 .. w_n])        # one GEMM for the linears reading x, when fused
    y_i  = column block i of y                       # each linear's output

a weight-only (W4A16, W8A16) linear becomes one weight-only GEMM, and a DiRotQ linear (numerics/pca.py) its
GEMM on its input's rotate+split+quantize, shared by the linears of one input and one basis. ``GraphForm`` says how each form spells those nodes;
``emit`` does the grouping, the ordering and the replacement once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import fx

from ..numerics.quant import WEIGHT_ONLY

ACT_BITS = {"w4a4": 4, "w8a8": 8}
OUT_FEATURES = "convrot_out_features"  # node meta of a weight's values input: its linear's output width
ROW_BOUNDS = "convrot_row_bounds"      # node meta of a weight's values input: its row bounds' input, if the graph has one


@dataclass(eq=False)
class QuantizedUse:
    """One quantized linear, as the rewrite sees it."""

    node: fx.Node            # the linear (or GEMM) node it replaces
    x: fx.Node               # its input
    bias: fx.Node | None
    values: fx.Node          # its prepared weight, as graph nodes
    scale: fx.Node
    out_features: int
    scheme: str              # "w4a4", "w8a8", or weight-only "w4a16", "w8a16"
    act_order: str = "natural"
    gelu: fx.Node | None = None  # a GELU computed in its GEMM's epilogue (backend form only)
    basis: fx.Node | None = None  # DiRotQ: the input's PCA basis and the weight's 16-bit columns
    w_hi: fx.Node | None = None
    rank: int = 0
    share: str | None = None      # DiRotQ: uses of one input with one share key have one basis (calibration)

    @property
    def is_pca(self) -> bool:
        return self.basis is not None


class GraphForm(Protocol):
    """How one graph form spells the quantized ops. Each method inserts nodes at the graph's insertion point."""

    def quantize(self, x: fx.Node, bits: int, act_order: str) -> tuple[fx.Node, fx.Node, fx.Node]:
        """(q, s, like): the rotated, quantized rows of x and their scales, and the node whose shape and
        dtype the GEMM output takes (x, or what replaced it)."""

    def gemm(self, q: fx.Node, s: fx.Node, like: fx.Node, uses: list[QuantizedUse], biases: list,
             gelu_from: int | None) -> fx.Node:
        """One GEMM of the uses' weights on (q, s), their outputs side by side."""

    def column_block(self, out: fx.Node, start: int, length: int) -> fx.Node:
        """Columns [start, start + length) of a fused GEMM's output."""

    def weight_only(self, use: QuantizedUse, x: fx.Node, bias) -> fx.Node:
        """The W4A16 GEMM of one use."""

    def pca_quantize(self, x: fx.Node, use: QuantizedUse) -> fx.Node:
        """DiRotQ's rotate+split+quantize of x into use's basis: one node holding (z_hi, q, s)."""

    def pca_gemm(self, zqs: fx.Node, like: fx.Node, use: QuantizedUse, bias) -> fx.Node:
        """DiRotQ's GEMM of one use on ``pca_quantize``'s result, shaped like ``like``."""

    def replace(self, old: fx.Node, new: fx.Node) -> None:
        """Route old's users to new, keeping what later passes read of old (module provenance), and erase it."""


@dataclass
class Emitted:
    activation_quantizations: int = 0  # rotate+quantize nodes inserted
    shared: int = 0                    # uses that reuse another use's quantized activations
    fused_gemms: int = 0               # GEMMs computing two or more linears
    fused_linears: int = 0             # linears computed by those
    gelu_epilogues: int = 0            # GELUs computed in the epilogue of the GEMM before them
    replaced: dict = field(default_factory=dict)  # old node -> new node


class _Replaced(dict):
    """Nodes the rewrite replaced, old -> new. The uses were found before any rewrite, so an input that is
    itself a rewritten linear's output (a linear feeding a linear, a GELU moved into an epilogue) is looked
    up here before it is used."""

    def live(self, node):
        while node in self:
            node = self[node]
        return node


def activation_key(use: QuantizedUse) -> tuple:
    """Uses with one key read the same activations at the same precision: they share one rotate+quantize."""
    return use.x, ACT_BITS[use.scheme], use.act_order


def emit(graph: fx.Graph, uses: list[QuantizedUse], form: GraphForm, fuse: bool) -> Emitted:
    """Rewrite ``graph`` in place: each group of uses sharing an activation key gets one rotate+quantize
    before its first use and, with ``fuse``, one GEMM whose column blocks replace the uses (when every
    bias exists by then), else one GEMM per use; each W4A16 use gets its weight-only GEMM. A use with a
    ``gelu`` goes last in its GEMM, whose epilogue applies the GELU from its first column."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    replaced = _Replaced()
    done = Emitted(replaced=replaced)
    groups: dict[tuple, list[QuantizedUse]] = {}
    pca_groups: dict[tuple, list[QuantizedUse]] = {}
    for use in uses:
        if use.is_pca:
            pca_groups.setdefault((use.x, use.share), []).append(use)
        elif use.scheme not in WEIGHT_ONLY:
            groups.setdefault(activation_key(use), []).append(use)
    for (x, _), members in pca_groups.items():
        first = min(members, key=lambda u: order[u.node])
        with graph.inserting_before(first.node):
            zqs = form.pca_quantize(replaced.live(x), first)
        done.activation_quantizations += 1
        done.shared += len(members) - 1
        for u in members:
            with graph.inserting_before(u.node):
                new = form.pca_gemm(zqs, replaced.live(x), u, replaced.live(u.bias))
            _replace(form, u.node, new, replaced)
    for (x, bits, act_order), members in groups.items():
        first = min((u.node for u in members), key=order.__getitem__)
        with graph.inserting_before(first):
            q, s, like = form.quantize(replaced.live(x), bits, act_order)
        done.activation_quantizations += 1
        done.shared += len(members) - 1
        members = sorted(members, key=lambda u: u.gelu is not None)  # GELU outputs last: one gelu_from column
        biases = {u: replaced.live(u.bias) for u in members}
        fusable = fuse and len(members) > 1 and all(
            not isinstance(b, fx.Node) or order.get(b, len(order)) < order[first] for b in biases.values())
        for part in [members] if fusable else [[u] for u in members]:
            plain = [u for u in part if u.gelu is None]
            gelu_from = sum(u.out_features for u in plain) if len(plain) < len(part) else None
            with graph.inserting_before(first if fusable else part[0].node):
                out = form.gemm(q, s, like, part, [biases[u] for u in part], gelu_from)
                outs, start = [], 0
                for u in part:
                    outs.append(out if len(part) == 1 else form.column_block(out, start, u.out_features))
                    start += u.out_features
            if len(part) > 1:
                done.fused_gemms += 1
                done.fused_linears += len(part)
            for u, new in zip(part, outs):
                _replace(form, u.node, new, replaced)
                if u.gelu is not None:  # the GEMM computed it: its users read the GEMM's output
                    replaced[u.gelu] = new
                    u.gelu.replace_all_uses_with(new)
                    graph.erase_node(u.gelu)
                    done.gelu_epilogues += 1
    for use in uses:
        if use.scheme in WEIGHT_ONLY:
            with graph.inserting_before(use.node):
                new = form.weight_only(use, replaced.live(use.x), replaced.live(use.bias))
            _replace(form, use.node, new, replaced)
    return done


def _replace(form: GraphForm, old: fx.Node, new: fx.Node, replaced: _Replaced) -> None:
    replaced[old] = new
    form.replace(old, new)
