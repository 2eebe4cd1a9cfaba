"""Find the scaled-dot-product attentions of a Dynamo FX graph and rewrite them to fp8 (option ``attention``).

Each eligible ``F.scaled_dot_product_attention(q, k, v)`` becomes a call of
``attention.fp8_scaled_dot_product_attention(q, k, v, scale=scale)``, the one definition of the fp8 form
(eager models run it too):

    q8, dq = quantize_e4m3(q, bq); k8, dk = quantize_e4m3(k, bk); v8, dv = quantize_e4m3(v)
    o8 = convrot::fp8_attention(q8, k8, v8, dq, dk, dv, 1 / dv, scale)
    o  = dequantize_e4m3(o8, dv, q.dtype)

``bq``, ``bk``: bounds on |Q| and |K| proven from the graph (value_bounds: FLUX's Q and K come out of an RMSNorm,
then RoPE), computed from the norm weights at every call; without one (option ``attention_scales="absmax"``,
or no proof) a tensor is scaled by its absmax, a reduction over the whole tensor before its cast.
The quantizations and the dequantization are plain torch ops, so Inductor, tracing through the call,
fuses them into the kernels around them (FLUX's RMSNorm + RoPE before, the reshape after); only the
attention itself is opaque.
An attention that cannot run in fp8 keeps its op, and its decision says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import fx

from ..config import check_attention_mode, check_attention_scales
from ..numerics.fp8_attention import default_softmax_scale
from ..ops import fp8_scaled_dot_product_attention
from ..ops.dispatch import fp8_attention_unsupported
from .match import _example, module_name
from .value_bounds import Bound, abs_bound, emit

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
    """The proven bound on |Q| and |K| for an fp8 attention (None: scaled by its absmax), by ``scales``."""
    bounds = {}
    for name in ("query", "key"):
        example = _example(args[name])
        if scales == "bound" and example is not None:
            bounds[name] = abs_bound(args[name], example.numel() // _RUNTIME_BOUND_SHARE)
        else:
            bounds[name] = None
    return bounds


def _scales_label(bounds: dict[str, Bound | None]) -> str:
    bounded = [n[0].upper() for n in ("query", "key") if bounds[n] is not None]
    absmax = [n[0].upper() for n in ("query", "key") if bounds[n] is None] + ["V"]
    label = f"{', '.join(absmax)} by absmax"
    return f"{' and '.join(bounded)} by RMSNorm bound; {label}" if bounded else label


class PlannedAttention(NamedTuple):
    node: fx.Node
    decision: AttentionDecision
    bounds: dict[str, Bound | None]  # fp8: the bounds Q and K are scaled by (None: their absmax)


def decide_attention(gm: fx.GraphModule, mode: str, scales: str = "bound") -> list[PlannedAttention]:
    """Every SDPA node of the graph with what ``mode`` does to it, and for fp8 how ``scales`` scales Q and K."""
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
        if mode == "keep":
            found.append(PlannedAttention(node, AttentionDecision(name, shape, "keep", "option attention='keep'"), {}))
            continue
        why = _ineligible(args, fp8_attention_unsupported)
        if why:
            found.append(PlannedAttention(node, AttentionDecision(name, shape, "keep", why), {}))
        else:
            bounds = tensor_bounds(args, scales)
            found.append(PlannedAttention(node, AttentionDecision(name, shape, "fp8", "", _scales_label(bounds)),
                                          bounds))
    return found


def rewrite_attention(gm: fx.GraphModule, planned: list[PlannedAttention]) -> int:
    """Rewrite the attentions planned as fp8, Q and K scaled by their planned bounds; returns how many."""
    graph, done, absmax = gm.graph, 0, {}
    for node, decision, bounds in planned:
        if decision.precision != "fp8":
            continue
        args = _arguments(node)
        with graph.inserting_before(node):
            kwargs = {"scale": args["scale"]}
            for name, bound in bounds.items():
                if bound is not None:
                    kwargs[f"{name}_bound"] = emit(graph, bound, absmax)
            out = graph.call_function(fp8_scaled_dot_product_attention,
                                      (args["query"], args["key"], args["value"]), kwargs)
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        done += 1
    if done:
        graph.lint()
        gm.recompile()
    return done
