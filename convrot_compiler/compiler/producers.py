"""Producers of a quantized linear's input that its activation quantization can absorb.

FLUX's single blocks concatenate the attention output and the GELU of the MLP up-projection
and feed that to proj_out. Unfused, Inductor writes the concatenation to memory only for
rotate+quantize to read it back: at 1024x1024 that is 141 MB each way per block.
``convrot::rotate_quantize_cat`` reads both parts of the concatenation as it loads. The GELU
runs in the up-projection's GEMM epilogue (rewrite.py, ``gelu_epilogue``). A block's first
quantized linears read its adaLN normalization, ``layer_norm(x) * (1 + scale) + shift``, which
``convrot::rotate_quantize_adaln`` computes as it loads x (``fuse_norms``). This module
recognises the patterns in the Dynamo graph; rewrite.py inserts the ops.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

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


def _two_part_cat(x: fx.Node) -> tuple[fx.Node, fx.Node, int] | None:
    """(a, b, dim) when x is cat([a, b], dim) of two graph nodes whose values (and x's) are known, dim made
    non-negative; else None."""
    if not _is_call(x, torch.cat):
        return None
    tensors = x.args[0] if x.args else x.kwargs.get("tensors")
    dim = x.kwargs.get("dim", x.args[1] if len(x.args) > 1 else 0)
    out = _value(x)
    if out is None or not isinstance(tensors, (list, tuple)) or len(tensors) != 2:
        return None
    a, b = tensors
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or _value(a) is None or _value(b) is None:
        return None
    return a, b, dim % out.dim()


def match_cat_producer(x: fx.Node, group_size: int) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) when x is cat([a, b], -1) with a's width a multiple of group_size (possibly behind an
    inference dropout), else None."""
    if _is_inference_dropout(x):
        x = x.args[0]
    parts = _two_part_cat(x)
    if parts is None or parts[2] != _value(x).dim() - 1:
        return None
    a, b, _ = parts
    va, vb = _value(a), _value(b)
    if va.dtype != vb.dtype or va.shape[:-1] != vb.shape[:-1] or va.shape[-1] % group_size:
        return None
    return a, b


def _per_sample(n) -> fx.Node | None:
    """v when n is v[:, None] or v.unsqueeze(1) of a [B, K] tensor v: one vector per sample, over its tokens."""
    if _is_call(n, operator.getitem) and n.args[1] == (slice(None, None, None), None):
        v = n.args[0]
    elif (isinstance(n, fx.Node) and n.op == "call_method" and n.target == "unsqueeze"
          and tuple(n.args[1:]) in ((1,), (-2,))):
        v = n.args[0]
    else:
        return None
    val = _value(v) if isinstance(v, fx.Node) else None
    return v if val is not None and val.dim() == 2 else None


def _operands(n, *targets) -> tuple | None:
    return tuple(n.args[:2]) if _is_call(n, *targets) and len(n.args) == 2 and not n.kwargs else None


def _layer_norm_eps(ln: fx.Node) -> float | None:
    """eps when ln is ``layer_norm`` over the last dim of a [B, T, K] input without weight or bias, else None."""
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    args = dict(zip(names, ln.args)) | dict(ln.kwargs)
    inp = _value(args["input"]) if isinstance(args.get("input"), fx.Node) else None
    if inp is None or inp.dim() != 3 or args.get("weight") is not None or args.get("bias") is not None:
        return None
    if tuple(args.get("normalized_shape", ())) != (inp.shape[-1],):
        return None
    return float(args.get("eps", 1e-5))


def _token_parts(x: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """(a, b) when x is cat([a, b], 1) of [B, T, K] tensors of one dtype (FLUX's single blocks: the text tokens,
    then the image tokens), else (x, None)."""
    parts = _two_part_cat(x)
    if parts is None or parts[2] != 1:
        return x, None
    a, b, _ = parts
    va, vb = _value(a), _value(b)
    if va.dim() != 3 or va.dtype != vb.dtype or (va.shape[0], va.shape[2]) != (vb.shape[0], vb.shape[2]):
        return x, None
    return a, b


@dataclass(frozen=True)
class AdaLNProducer:
    """A DiT block's adaLN normalization ``layer_norm(tokens) * (1 + scale[:, None]) + shift[:, None]``."""

    tokens: fx.Node          # the normalized [B, T, K] input
    x: fx.Node               # its rows: tokens itself, or the first part of tokens = cat([x, x2], 1)
    x2: fx.Node | None
    scale: fx.Node           # [B, K]
    shift: fx.Node           # [B, K]
    eps: float


def match_adaln_producer(x: fx.Node) -> AdaLNProducer | None:
    """The adaLN normalization x is (``convrot::rotate_quantize_adaln`` computes it as it loads the rows), or
    None. Its output must have no user but quantized linears: the caller checks."""
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
            scale = next((_per_sample(t) for t, c in (terms, terms[::-1]) if isinstance(c, (int, float)) and c == 1),
                         None)
            eps = _layer_norm_eps(ln)
            if scale is None or eps is None:
                continue
            tokens = ln.args[0] if ln.args else ln.kwargs["input"]
            b, _, k = _value(tokens).shape
            if _value(scale).shape == _value(shift).shape == (b, k):
                return AdaLNProducer(tokens, *_token_parts(tokens), scale, shift, eps)
    return None
