"""Producers of a quantized linear's input that its activation quantization can absorb.

FLUX's single blocks concatenate the attention output and the GELU of the MLP up-projection
and feed that to proj_out; the double blocks feed the GELU of the up-projection to ff down.
Unfused, Inductor writes the concatenation (and the GELU) to memory only for rotate+quantize
to read it back: at 1024x1024 that is 141 MB (113 MB) each way per block.
``convrot::rotate_quantize_cat`` reads both parts of the concatenation as it loads, and can
apply the GELU there too (``fuse_producers="gelu"``; measured slower on an H100: the two-pass
kernel computes each GELU twice, measured on an H100; with the hardware tanh and
every GEMM warp-specialized still 104.8 vs 103.4 ms). By default the
GELU runs in the up-projection's GEMM epilogue (rewrite.py, ``gelu_epilogue``) or, with the
Inductor template GEMM, in the template's, and only the concatenation is left for
rotate+quantize. Every quantized input of FLUX's blocks but those two is the adaLN
normalization layer_norm(x) * (1 + scale) + shift, which Inductor otherwise writes in bf16 for
rotate+quantize to read back; ``convrot::rotate_quantize_norm`` normalizes and modulates as it
loads (``fuse_norms``). This module recognises the patterns in the Dynamo graph; rewrite.py
inserts the ops.
"""

from __future__ import annotations

import operator

import torch
from torch import fx


def _is_call(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def is_gelu_tanh(n) -> bool:
    return (_is_call(n, torch._C._nn.gelu)
            and n.kwargs.get("approximate", n.args[1] if len(n.args) > 1 else "none") == "tanh")


def _is_inference_dropout(n) -> bool:
    """F.dropout(x, p, training=False, ...) or p = 0: the identity."""
    if not _is_call(n, torch.nn.functional.dropout):
        return False
    p = n.kwargs.get("p", n.args[1] if len(n.args) > 1 else 0.5)
    training = n.kwargs.get("training", n.args[2] if len(n.args) > 2 else True)
    return p == 0 or training is False


def _value(n: fx.Node):
    return n.meta.get("example_value", n.meta.get("val"))


def match_cat_producer(x: fx.Node, group_size: int, gelu: bool = False) -> tuple[fx.Node | None, fx.Node, bool] | None:
    """(a, b, False) when x is cat([a, b], -1) with a's width a multiple of group_size (possibly behind
    an inference dropout). With ``gelu``, GELUs (tanh form) are taken in as well: (a, b, True) when x is
    cat([a, gelu_tanh(b)], -1), (None, b, True) when x is gelu_tanh(b). Else None."""
    if _is_inference_dropout(x):
        x = x.args[0]
    if gelu and is_gelu_tanh(x):
        return None, x.args[0], True
    if not _is_call(x, torch.cat):
        return None
    tensors = x.args[0] if x.args else x.kwargs.get("tensors")
    dim = x.kwargs.get("dim", x.args[1] if len(x.args) > 1 else 0)
    out = _value(x)
    if out is None or not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or dim not in (-1, out.dim() - 1):
        return None
    a, b = tensors
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    va, vb = _value(a), _value(b)  # a GELU keeps its input's shape and dtype (its input may be a new node)
    if va is None or vb is None or va.dtype != vb.dtype or va.shape[:-1] != vb.shape[:-1] or va.shape[-1] % group_size:
        return None
    return (a, b.args[0], True) if gelu and is_gelu_tanh(b) else (a, b, False)


def _per_sample(n) -> fx.Node | None:
    """v when n is v[:, None] or v.unsqueeze(1) of a [B, K] tensor v: a per-sample vector over tokens."""
    if _is_call(n, operator.getitem) and n.args[1] == (slice(None, None, None), None):
        v = n.args[0]
    elif isinstance(n, fx.Node) and n.op == "call_method" and n.target == "unsqueeze" and tuple(n.args[1:]) == (1,):
        v = n.args[0]
    else:
        return None
    val = _value(v) if isinstance(v, fx.Node) else None
    return v if val is not None and val.dim() == 2 else None


def _operands(n, *targets) -> tuple | None:
    return tuple(n.args[:2]) if _is_call(n, *targets) and len(n.args) == 2 and not n.kwargs else None


def match_norm_producer(x: fx.Node, group_size: int) -> tuple[fx.Node, fx.Node, fx.Node, float] | None:
    """(inp, scale, shift, eps) when x is FLUX's adaLN normalization
    ``layer_norm(inp, (K,), None, None, eps) * (1 + scale[:, None]) + shift[:, None]`` with inp [B, T, K],
    scale and shift [B, K] and K a multiple of group_size (what ``rotate_quantize_norm`` computes); else None."""
    added = _operands(x, operator.add, torch.add)
    if added is None:
        return None
    for mul, shift3 in (added, added[::-1]):
        factors = _operands(mul, operator.mul, torch.mul)
        shift = _per_sample(shift3)
        if factors is None or shift is None:
            continue
        for ln, one_plus in (factors, factors[::-1]):
            terms = _operands(one_plus, operator.add, torch.add)
            if not (_is_call(ln, torch.nn.functional.layer_norm) and terms is not None):
                continue
            scale = next((_per_sample(t) for t, c in (terms, terms[::-1]) if c == 1), None)
            normalized = _layer_norm_without_affine(ln, group_size)
            if scale is None or normalized is None:
                continue
            inp, eps = normalized
            batch, k = _value(inp).shape[0], _value(inp).shape[-1]
            if _value(scale).shape == _value(shift).shape == (batch, k):
                return inp, scale, shift, eps
    return None


def _layer_norm_without_affine(ln: fx.Node, group_size: int) -> tuple[fx.Node, float] | None:
    """(input, eps) when ln is layer_norm over the last dim of a [B, T, K] input without weight or bias,
    K a multiple of group_size."""
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    args = dict(zip(names, ln.args)) | dict(ln.kwargs)
    inp = _value(args["input"]) if isinstance(args.get("input"), fx.Node) else None
    if inp is None or inp.dim() != 3 or args.get("weight") is not None or args.get("bias") is not None:
        return None
    if tuple(args.get("normalized_shape", ())) != (inp.shape[-1],) or inp.shape[-1] % group_size:
        return None
    return args["input"], float(args.get("eps", 1e-5))
