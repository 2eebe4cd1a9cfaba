"""Find the scaled-dot-product attentions of a Dynamo FX graph and rewrite them to fp8 (option ``attention``).

Each eligible ``F.scaled_dot_product_attention(q, k, v)`` becomes the fp8 form that
``ops.fp8_scaled_dot_product_attention`` defines (eager models run it too):

    q8, dq = quantize_e4m3(q, bq); k8, dk = quantize_e4m3(k, bk)
    o8, dv = fp8_attention_e4m3_output(q8, dq, k8, dk, v, scale)   # V by its absmax, convrot::fp8_attention
    o = dequantize_e4m3(o8, dv, v.dtype)

``bq``, ``bk``: bounds on |Q| and |K| proven from the graph (value_bounds: FLUX's Q and K come out of an RMSNorm,
then RoPE), computed from the norm weights at every call; without one (option ``attention_scales="absmax"``,
or no proof) a tensor is scaled by its absmax, a reduction over the whole tensor before its cast.
The quantizations and the dequantization are plain torch ops, so Inductor, tracing through the call,
fuses them into the kernels around them (FLUX's RMSNorm + RoPE before, the reshape after); only the
attention itself is opaque. Where Q or K is scaled by its bound and made by FLUX's chain (qk_prologue:
RMSNorm of each stream, concatenation, RoPE on pairs), the chain and the cast run as one kernel instead,
``convrot::rms_rope_e4m3`` (option ``fuse_attention_prologue``). Where ``o`` feeds quantized linears, they read
``o8`` instead (attention_output.py, option ``fuse_attention_output``).
An attention that cannot run in fp8 keeps its op, and its decision says why. An attention kept in 16 bits
(``attention="keep"``, or not eligible) still takes its Q and K from one kernel where FLUX's chain makes them,
``convrot::rms_rope`` (the same option): Inductor runs that chain as a reduction and pointwise passes around the
concatenation, at a third of copy speed.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import fx

from ..config import check_attention_mode, check_attention_scales
from ..numerics.fp8_attention import default_softmax_scale, dequantize_e4m3, quantize_e4m3
from ..ops import fp8_attention_e4m3_output, rms_rope_16bit, rms_rope_quantize_e4m3
from ..ops.dispatch import fp8_attention_unsupported, rms_rope_unsupported
from .match import LINEAR_TARGETS, _example, module_name
from .qk_prologue import RmsRopeChain, match_rms_rope
from .value_bounds import Bound, abs_bound, emit, joined_tensors, keeps_bound

ATTENTION_TARGETS = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


@dataclass
class AttentionDecision:
    name: str                    # the module the attention was traced in, and the graph node
    shape: tuple | None          # [B, H, S, D] of the query
    precision: str               # "fp8" or "keep" (the model's dtype)
    reason: str = ""
    scales: str = ""             # fp8: how Q, K and V are scaled to e4m3
    prologue: str = ""           # what makes Q and K from their RMSNorm on (fp8: and casts them): a kernel, or Inductor
    output: str = ""             # fp8: who reads the e4m3 output (the next linears' rotate+quantize, or a dequantize)


# a graph input bounds Q or K by its absmax at every call only when it is this much smaller than they are
_RUNTIME_BOUND_SHARE = 4


def _arguments(node: fx.Node) -> dict:
    bound = dict(_SDPA_DEFAULTS)
    bound.update(zip(_SDPA_PARAMS, node.args))
    bound.update(node.kwargs)
    return bound


def _ineligible(args: dict, device_check) -> str | None:
    if args["attn_mask"] is not None:
        return "has an attention mask (fp8 attention here takes none)"
    if args["is_causal"] is not False:
        return "is causal (fp8 attention here is not)"
    if args["enable_gqa"] is not False:
        return "uses grouped-query heads"
    if isinstance(args["dropout_p"], fx.Node) or args["dropout_p"] != 0:
        return f"has dropout_p={args['dropout_p']} (inference only)"
    if isinstance(args["scale"], fx.Node):
        return "its softmax scale is computed in the graph"
    q, k, v = (_example(args[n]) for n in ("query", "key", "value"))
    if q is None or k is None or v is None:
        return "query, key or value has no traced tensor value"
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        return (f"query, key, value shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} are not one "
                "[B, H, S, D] shape")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} (bf16 or fp16 inputs only)"
    if q.shape[-1] % 16:
        return f"head dim {q.shape[-1]} is not a multiple of 16"
    if q.is_cuda:
        return device_check(tuple(q.shape), default_softmax_scale(q.shape[-1], args["scale"]), q.device)
    return None


def tensor_bounds(args: dict, scales: str) -> dict[str, Bound | None]:
    """The proven bound on |Q|, |K| and |V| for an fp8 attention (None: scaled by its absmax), by ``scales``: Q and
    K by the rules of value_bounds ("bound", "qk-bound"); V by its projections' operands ("bound": Q and K's rules
    would bound a V with an RMSNorm, which FLUX's has not, and nothing else)."""
    bounds = {}
    for name in ("query", "key", "value"):
        example = _example(args[name])
        wanted = scales == "bound" or (scales == "qk-bound" and name != "value")
        bound = abs_bound(args[name], example.numel() // _RUNTIME_BOUND_SHARE, linears=name == "value") \
            if wanted and example is not None else None
        bounds[name] = bound if name != "value" or (bound is not None and "linear" in bound.kinds) else None
    return bounds


def _scales_label(bounds: dict[str, Bound | None]) -> str:
    bounded = [n[0].upper() for n in ("query", "key") if bounds[n] is not None]
    absmax = [n[0].upper() for n in ("query", "key", "value") if bounds.get(n) is None]
    parts = [f"{' and '.join(bounded)} by RMSNorm bound"] if bounded else []
    if bounds.get("value") is not None:
        parts.append("V by its projection's operands")
    if absmax:
        parts.append(f"{', '.join(absmax)} by absmax")
    return "; ".join(parts)


def value_projections(gm: fx.GraphModule) -> set[fx.Node]:
    """The linear nodes whose outputs reach a scaled-dot-product attention's value through ops that keep a bound
    (views, casts, concatenation): the linears whose weights' row bounds the rewrite passes to the graph, so that V
    is scaled by its projections' operands (``tensor_bounds``)."""
    found, stack, seen = set(), [], set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in ATTENTION_TARGETS:
            stack.append(_arguments(node)["value"])
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target in LINEAR_TARGETS:
            found.add(n)
        elif joined_tensors(n) is not None:
            stack.extend(joined_tensors(n))
        elif keeps_bound(n) and n.args:
            stack.append(n.args[0])
    return found


class PlannedAttention(NamedTuple):
    node: fx.Node
    decision: AttentionDecision
    bounds: dict[str, Bound | None]  # fp8: the bounds Q and K are scaled by (None: their absmax)
    chains: dict[str, RmsRopeChain | None] = {}  # Q's, K's chain that runs as one kernel (None: Inductor's)


PROLOGUE_KERNEL = "RMSNorm+RoPE kernel"
PROLOGUE_KERNEL_E4M3 = "RMSNorm+RoPE+e4m3 kernel"


def fused_chains(args: dict, bounds: dict[str, Bound | None] | None, fuse: bool) -> tuple[dict, str]:
    """Q's and K's chain where one kernel runs it (FLUX's chain, a kernel for it on the device, and for fp8
    attention, ``bounds`` not None, scaled by a bound), and the label saying so."""
    chains, why = {}, {}
    for name in ("query", "key"):
        wanted = fuse and (bounds is None or bounds.get(name) is not None)
        chain = match_rms_rope(args[name]) if wanted else None
        example = _example(args[name])
        if chain is not None and example.is_cuda:
            reason = rms_rope_unsupported(example.dtype, chain.head_dim, len(chain.sources))
            if reason:
                chain, why[name] = None, reason
        chains[name] = chain
    fused = [n[0].upper() for n in ("query", "key") if chains[n] is not None]
    kernel = PROLOGUE_KERNEL if bounds is None else PROLOGUE_KERNEL_E4M3
    label = "Inductor" if not fused else kernel if len(fused) == 2 else f"{fused[0]}: {kernel}"
    if why:
        label += "; " + "; ".join(f"{n[0].upper()} by Inductor: {r}" for n, r in why.items())
    return chains, label


def decide_attention(gm: fx.GraphModule, mode: str, scales: str = "bound", fuse_prologue: bool = True,
                     fuse_16bit_prologue: bool = True) -> list[PlannedAttention]:
    """Every SDPA node of the graph with what ``mode`` does to it, for fp8 how ``scales`` scales Q and K, and
    whether their RMSNorm, RoPE (and for fp8 the cast) run as one kernel (``fuse_prologue``; for an attention kept
    in 16 bits, ``fuse_16bit_prologue``)."""
    check_attention_mode(mode)
    check_attention_scales(scales)
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in ATTENTION_TARGETS:
            continue
        args = _arguments(node)
        q = _example(args["query"])
        name = f"{module_name(node) or '<graph>'}:{node.name}"
        shape = tuple(q.shape) if q is not None else None
        why = "option attention='keep'" if mode == "keep" else _ineligible(args, fp8_attention_unsupported)
        if why:
            chains, prologue = fused_chains(args, None, fuse_16bit_prologue)
            found.append(PlannedAttention(node, AttentionDecision(name, shape, "keep", why, prologue=prologue), {},
                                          chains))
        else:
            bounds = tensor_bounds(args, scales)
            chains, prologue = fused_chains(args, bounds, fuse_prologue)
            found.append(PlannedAttention(node, AttentionDecision(name, shape, "fp8", "", _scales_label(bounds),
                                                                  prologue), bounds, chains))
    return found


def _chain_call(graph: fx.Graph, chain: RmsRopeChain, op, *extra) -> fx.Node:
    """A node calling ``op`` (rms_rope_16bit or rms_rope_quantize_e4m3) on ``chain``'s streams, weights, eps and
    [S, D] tables, and ``extra``."""
    cos, sin = (graph.call_method("reshape", (t, chain.seq, chain.head_dim)) for t in (chain.cos, chain.sin))
    return graph.call_function(op, (list(chain.sources), list(chain.weights), list(chain.eps), cos, sin, *extra))


def _as_bhsd(graph: fx.Graph, x: fx.Node) -> fx.Node:
    """[B, S, H, D] seen as the attention's [B, H, S, D], as the model's own permute gave it."""
    return graph.call_method("permute", (x, 0, 2, 1, 3))


def _quantized(graph: fx.Graph, x: fx.Node, bound, chain: RmsRopeChain | None) -> tuple[fx.Node, fx.Node]:
    """Nodes of (e4m3 [B, H, S, D], descale) for ``x``: its chain as one kernel, or ``quantize_e4m3``."""
    if chain is None:
        out = graph.call_function(quantize_e4m3, (x, bound))
        return graph.call_function(operator.getitem, (out, 0)), graph.call_function(operator.getitem, (out, 1))
    out = _chain_call(graph, chain, rms_rope_quantize_e4m3, bound)
    x8 = _as_bhsd(graph, graph.call_function(operator.getitem, (out, 0)))
    return x8, graph.call_function(operator.getitem, (out, 1))


def _fuse_16bit_chains(graph: fx.Graph, node: fx.Node, chains: dict[str, RmsRopeChain | None]) -> bool:
    """Give the 16-bit attention ``node`` its Q and K from ``chains``' kernel; whether any chain was fused."""
    args = _arguments(node)
    fused = False
    for name, chain in chains.items():
        if chain is None:
            continue
        with graph.inserting_before(node):
            made = _as_bhsd(graph, _chain_call(graph, chain, rms_rope_16bit))
        node.replace_input_with(args[name], made)
        _erase_unused_chain(graph, args[name], chain)
        fused = True
    return fused


def _erase_unused_chain(graph: fx.Graph, end: fx.Node, chain: RmsRopeChain) -> None:
    """Erase the nodes from ``chain``'s streams, weights and tables to ``end`` that nothing reads any more (the
    kernel computes them); the chain's ops are all pure."""
    leaves = {*chain.sources, *chain.weights, chain.cos, chain.sin}
    interior, stack = [], [end]
    while stack:
        n = stack.pop()
        if isinstance(n, fx.Node) and n not in leaves and n not in interior and n.op != "placeholder":
            interior.append(n)
            stack.extend(n.all_input_nodes)
    position = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(interior, key=position.__getitem__, reverse=True):  # a node's users are erased before it
        if not n.users:
            graph.erase_node(n)


def rewrite_attention(gm: fx.GraphModule, planned: list[PlannedAttention]) -> dict[fx.Node, AttentionDecision]:
    """Rewrite the attentions planned as fp8, Q and K scaled by their planned bounds and cast by their planned
    kernels, and give those kept in 16 bits their Q and K from their planned kernels; returns each fp8 one's
    dequantize node (``o`` of the module docstring) with its decision."""
    graph, done, absmax = gm.graph, {}, {}
    changed = False
    for node, decision, bounds, chains in planned:
        if decision.precision != "fp8":
            changed |= _fuse_16bit_chains(graph, node, chains)
            continue
        args = _arguments(node)
        with graph.inserting_before(node):
            quantized = []
            for name in ("query", "key"):
                bound = bounds.get(name)
                bound = emit(graph, bound, absmax) if bound is not None else None
                quantized.extend(_quantized(graph, args[name], bound, chains.get(name)))
            value_bound = bounds.get("value")
            value_bound = emit(graph, value_bound, absmax) if value_bound is not None else None
            o8dv = graph.call_function(fp8_attention_e4m3_output, (*quantized, args["value"]),
                                       {"scale": args["scale"], "value_bound": value_bound})
            o8, dv = (graph.call_function(operator.getitem, (o8dv, i)) for i in (0, 1))
            out = graph.call_function(dequantize_e4m3, (o8, dv, _example(args["value"]).dtype))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        for name, chain in chains.items():
            if chain is not None:
                _erase_unused_chain(graph, args[name], chain)
        done[out] = decision
    if done or changed:
        graph.lint()
        gm.recompile()
    return done
