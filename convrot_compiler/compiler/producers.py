"""Producers of a quantized linear's input that its activation quantization can absorb.

FLUX's single blocks concatenate the attention output and the GELU of the MLP up-projection
and feed that to proj_out. Unfused, Inductor writes the concatenation to memory only for
rotate+quantize to read it back: at 1024x1024 that is 141 MB each way per block.
``convrot::rotate_quantize_cat`` reads both parts of the concatenation as it loads. The GELU
runs in the up-projection's GEMM epilogue (rewrite.py, ``gelu_epilogue``). This module
recognises the patterns in the Dynamo graph; rewrite.py inserts the ops.
"""

from __future__ import annotations

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


def match_cat_producer(x: fx.Node, group_size: int) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) when x is cat([a, b], -1) with a's width a multiple of group_size (possibly behind an
    inference dropout), else None."""
    if _is_inference_dropout(x):
        x = x.args[0]
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
    va, vb = _value(a), _value(b)
    if va is None or vb is None or va.dtype != vb.dtype or va.shape[:-1] != vb.shape[:-1] or va.shape[-1] % group_size:
        return None
    return a, b
