"""A bound on |x| for a tensor of a Dynamo FX graph, proven from the ops that made it: FLUX's Q and K are scaled to
e4m3 by it, without a pass over them (attention_rewrite). A 16-bit value rounded past it saturates at 448
(numerics.fp8_attention.quantize_e4m3).

An RMSNorm over D channels with weight w gives |y| <= sqrt(D) max|w|: |x_i| <= sqrt(sum_j x_j^2) = sqrt(D mean(x^2)),
and the eps only shrinks y; torch's ``rms_norm`` and the same written out (x * rsqrt(mean(x^2, -1) + eps), then
times w: Qwen-Image's) both count. From there the bound follows views, casts, negation, concatenation (the larger
bound), sums and products (RoPE's x cos + rot(x) sin), and complex RoPE (pairs seen as complex numbers, at most
sqrt(2) times the bound in modulus, times complex frequencies; each part of a product is at most its modulus).
cos and sin computed in the graph are bounded by 1; a small graph input (RoPE's cos, sin or complex frequencies
when a block is compiled alone) by its own absmax (modulus), taken at every call. A tensor reached
any other way has no bound here, and its attention keeps the per-call absmax.

For V, whose FLUX projection has no RMSNorm after it, a quantized linear's output is bounded by its GEMM's operands
(``linears``): |y| <= max token scale x qmax x max over rows (channel scale x sum of |w|) + max |bias|
(quant.quantized_linear_bound; on synthetic FLUX-like data about 80 times V's absmax, which e4m3's range absorbs:
the values keep their 3-bit mantissa down to 1/360 of the absmax). That replaces two passes over V with reductions
over the token scales and the weight's bytes.

The bound is an expression of graph inputs (weights, cos, sin, token scales), computed in the graph at every call:
it stays right when they change.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

from ..numerics.quant import quantized_linear_bound
from ..ops import quantized_matmul
from .emit import ACT_BITS, OUT_FEATURES, ROW_BOUNDS
from .match import _example

RMS_NORMS = (torch.rms_norm, torch.nn.functional.rms_norm)
_SAME = {"view", "reshape", "unflatten", "flatten", "permute", "transpose", "contiguous", "to", "float", "bfloat16",
         "half", "type_as", "clone", "unbind", "chunk", "split", "expand", "repeat", "repeat_interleave", "squeeze",
         "unsqueeze", "neg", "getitem", "__getitem__"}  # ops whose largest |value| is at most their input's
_SAME_FUNCTIONS = {operator.getitem, operator.neg, torch.neg, torch.flatten, torch.reshape, torch.permute,
                   torch.transpose, torch.unbind, torch.chunk, torch.split, torch.squeeze, torch.unsqueeze,
                   torch.repeat_interleave}
_UNIT = {"cos", "sin"}
_MAX_DEPTH = 48


@dataclass(frozen=True)
class Bound:
    """``op`` "const" (``value``), "amax" (of ``node``, at run time), "linear" (quant.quantized_linear_bound of
    ``linear``'s nodes and arguments, at run time) or "max", "sum", "prod" of ``parts``."""

    op: str
    value: float = 0.0
    node: fx.Node | None = None
    parts: tuple["Bound", ...] = ()
    linear: tuple = ()

    @property
    def constant(self) -> float | None:
        if self.op == "const":
            return self.value
        values = [p.constant for p in self.parts]
        if self.op in ("amax", "linear") or any(v is None for v in values):
            return None
        return {"max": max, "sum": sum, "prod": math.prod}[self.op](values)

    def runtime_inputs(self) -> list[fx.Node]:
        """The graph nodes the bound reads at run time."""
        if self.op == "amax":
            return [self.node]
        if self.op == "linear":
            return [self.linear[0]]
        return [n for p in self.parts for n in p.runtime_inputs()]

    @property
    def kinds(self) -> set[str]:
        """The ops of the bound's leaves that read the graph at run time ("amax", "linear")."""
        if self.op in ("amax", "linear"):
            return {self.op}
        return set().union(*(p.kinds for p in self.parts)) if self.parts else set()


def const(value: float) -> Bound:
    return Bound("const", value=float(value))


def abs_bound(node: object, max_runtime_numel: int, depth: int = 0, linears: bool = False) -> Bound | None:
    """A bound on |node| by the rules of the module docstring, or None. A graph input bounds by its absmax only
    when it has at most ``max_runtime_numel`` elements (that reduction runs at every call). With ``linears``, a
    quantized linear's output is bounded by its operands too (``linear_bound``)."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return const(abs(node))
    if not isinstance(node, fx.Node) or depth > _MAX_DEPTH:
        return None

    def sub(x):
        return abs_bound(x, max_runtime_numel, depth + 1, linears)

    target, args = node.target, node.args
    name = target if isinstance(target, str) else getattr(target, "__name__", None)
    if node.op == "placeholder":
        example = _example(node)
        if example is not None and (example.is_floating_point() or example.is_complex()) and \
                example.numel() <= max_runtime_numel:
            return Bound("amax", node=node)
        return None
    if node.op not in ("call_function", "call_method"):
        return None
    if target in RMS_NORMS:
        return _rms_norm_bound(node, sub)
    if linears and target is quantized_matmul:
        return linear_bound(node)
    if linears and target is torch.narrow and args and _called_matmul(args[0]):
        dim, start, length = (list(args[1:4]) + [None] * 3)[:3]
        out = _example(args[0])  # a fused GEMM's node has none: its column blocks replaced the linears
        if dim == -1 or (out is not None and dim == out.dim() - 1):
            return linear_bound(args[0], start, length)
        return None
    if name in _UNIT:
        return const(1.0)
    joined = joined_tensors(node)
    if joined is not None:
        parts = [sub(p) for p in joined]
        return None if not parts or None in parts else Bound("max", parts=tuple(parts))
    if target in (operator.add, torch.add, operator.sub, torch.sub) and node.kwargs.get("alpha", 1) == 1:
        parts = [sub(x) for x in args[:2]]
        return None if len(parts) < 2 or None in parts else Bound("sum", parts=tuple(parts))
    if target in (operator.mul, torch.mul):
        if _is_rms_normalized(node):
            return const(math.sqrt(_example(node).shape[-1]))
        parts = [sub(x) for x in args[:2]]
        return None if len(parts) < 2 or None in parts else Bound("prod", parts=tuple(parts))
    if target is torch.view_as_complex:  # a pair (a, b) with |a|, |b| <= B: |a + ib| <= sqrt(2) B
        inner = sub(args[0]) if args else None
        return None if inner is None else Bound("prod", parts=(const(math.sqrt(2.0)), inner))
    if target is torch.view_as_real:
        return sub(args[0]) if args else None
    if keeps_bound(node):
        return sub(args[0]) if args else None
    return None


def joined_tensors(node: fx.Node) -> list | None:
    """The tensors a concatenation or stack node joins (its largest |value| is theirs), or None for another node."""
    if node.op != "call_function" or node.target not in (torch.cat, torch.stack, torch.concat):
        return None
    return list((node.args[0] if node.args else node.kwargs.get("tensors")) or ())


def keeps_bound(node: fx.Node) -> bool:
    """Whether node's largest |value| is at most its first input's (a view, a cast, a negation, a split)."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", None)
    return (node.op == "call_method" and name in _SAME) or (node.op == "call_function" and node.target in
                                                             _SAME_FUNCTIONS)


def _called_matmul(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is quantized_matmul


def linear_bound(gemm: fx.Node, start: object = None, length: object = None) -> Bound | None:
    """The bound on columns [start, start + length) of a quantized GEMM node (ops.quantized_matmul; all of them when
    start is None) where they are one W4A4 or W8A8 linear's output, no GELU in the epilogue, and
    the graph takes that weight's row bounds (rewrite.py, ``row_bounds``): quant.quantized_linear_bound of its token
    scales, row bounds and bias, at run time."""
    args = list(gemm.args) + [None] * 10
    _, s, _, values, _, biases, scheme, _, _, gelu_from = args[:10]
    gelu_from = gemm.kwargs.get("gelu_from", gelu_from)
    if scheme not in ACT_BITS:
        return None
    values, biases = (list(t) if isinstance(t, (list, tuple)) else [t] for t in (values, biases))
    begin = 0
    for v, b in zip(values, biases):
        width = v.meta.get(OUT_FEATURES) if isinstance(v, fx.Node) else None
        if width is None:
            return None
        if (start is None and len(values) == 1) or (start == begin and length == width):
            rows = v.meta.get(ROW_BOUNDS)
            if rows is None or (gelu_from is not None and begin + width > gelu_from):
                return None
            return Bound("linear", linear=(s, rows, b, ACT_BITS[scheme]))
        begin += width
    return None


_CASTS = {"to", "float", "type_as", "bfloat16", "half"}


def _uncast(node: object) -> object:
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in _CASTS and node.args:
        node = node.args[0]
    return node


def _called(node: object, name: str) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_method" and node.target == name) or
        (node.op == "call_function" and getattr(node.target, "__name__", None) == name))


def _is_rms_normalized(node: fx.Node) -> bool:
    """Whether ``node`` is x * rsqrt(mean(x^2, -1, keepdim=True) + eps) (either factor first; x^2 of a cast of x):
    |x_i| <= sqrt(D) * rms(x) then bounds it by sqrt(D)."""
    if len(node.args) != 2 or _example(node) is None:
        return False
    for x, r in (node.args, node.args[::-1]):
        if not _called(r, "rsqrt") or not r.args:
            continue
        total = r.args[0]
        if not (_called(total, "add") and len(total.args) == 2):
            continue
        mean, eps = total.args if isinstance(total.args[0], fx.Node) else total.args[::-1]
        if not (isinstance(eps, (int, float)) and eps >= 0 and _called(mean, "mean") and mean.args):
            continue
        dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
        example = _example(x)
        last = example.dim() - 1 if example is not None else None
        if dims not in (-1, last, (-1,), [-1], (last,), [last]) or not mean.kwargs.get("keepdim", False):
            continue
        square = mean.args[0]
        if _called(square, "pow") and len(square.args) == 2 and square.args[1] == 2 and \
                _uncast(square.args[0]) is _uncast(x):
            return True
    return False


def rms_norm_call(node: object) -> tuple | None:
    """(input, normalized_shape, weight, eps) of a ``rms_norm`` call node, an int shape as a tuple; None for
    another node."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in RMS_NORMS):
        return None
    args = list(node.args) + [None] * 4
    x, shape, weight, eps = (node.kwargs.get(name, args[i])
                             for i, name in enumerate(("input", "normalized_shape", "weight", "eps")))
    return x, (shape,) if isinstance(shape, int) else shape, weight, eps


def _rms_norm_bound(node: fx.Node, sub) -> Bound | None:
    _, shape, weight, _ = rms_norm_call(node)
    if not isinstance(shape, (tuple, list)) or not all(isinstance(d, int) for d in shape):
        return None
    root_d = const(math.sqrt(math.prod(shape)))
    if weight is None:
        return root_d
    w = sub(weight)
    return None if w is None else Bound("prod", parts=(root_d, w))


def emit(graph: fx.Graph, bound: Bound, absmax: dict[fx.Node, fx.Node] | None = None) -> fx.Node | float:
    """``bound`` as a float (a constant) or as nodes computing a float32 scalar tensor, inserted at the graph's
    current insertion point. ``absmax``: the absmax nodes emitted before, by input, reused (pass one dict for a
    graph, emitting in graph order)."""
    absmax = {} if absmax is None else absmax
    value = bound.constant
    if value is not None:
        return value
    if bound.op == "linear":
        return graph.call_function(quantized_linear_bound, bound.linear)
    if bound.op == "amax":
        if bound.node not in absmax:  # abs first: a complex input's modulus
            absmax[bound.node] = graph.call_method(
                "amax", (graph.call_method("float", (graph.call_method("abs", (bound.node,)),)),))
        return absmax[bound.node]
    parts = [emit(graph, p, absmax) for p in bound.parts]
    folded = [p for p in parts if not isinstance(p, float)]
    constants = [p for p in parts if isinstance(p, float)]
    if bound.op == "max":
        fn = torch.maximum
        if constants:
            folded.append(graph.call_function(torch.full, ((), max(constants)), {"dtype": torch.float32,
                                                                                 "device": _device(bound)}))
    else:
        fn = operator.add if bound.op == "sum" else operator.mul
        if constants:
            folded.append({"sum": sum, "prod": math.prod}[bound.op](constants))
    out = folded[0]
    for p in folded[1:]:
        out = graph.call_function(fn, (out, p))
    return out


def _device(bound: Bound) -> torch.device | None:
    example = _example(bound.runtime_inputs()[0])
    return example.device if example is not None else None
