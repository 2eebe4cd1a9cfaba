"""Producers of a quantized linear's input that its activation quantization can absorb.

After FLUX's MLP up-projection comes a GELU (tanh form). In the double blocks its output
feeds ff down; in the single blocks it is concatenated after the attention output and
feeds proj_out. Unfused, Inductor writes the GELU output (and the concatenation) to memory
only for rotate+quantize to read it back: at 1024x1024 that is 113 MB (141 MB) each way per
block. ``convrot::rotate_quantize_gelu`` applies the GELU as it loads instead. This module
recognises the pattern in the Dynamo graph; rewrite.py inserts the op.
"""

from __future__ import annotations

import torch
from torch import fx


def _is_gelu_tanh(n) -> bool:
    return (isinstance(n, fx.Node) and n.op == "call_function" and n.target is torch._C._nn.gelu
            and n.kwargs.get("approximate", n.args[1] if len(n.args) > 1 else "none") == "tanh")


def _is_inference_dropout(n) -> bool:
    """F.dropout(x, p, training=False, ...) or p = 0: the identity."""
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target is torch.nn.functional.dropout):
        return False
    p = n.kwargs.get("p", n.args[1] if len(n.args) > 1 else 0.5)
    training = n.kwargs.get("training", n.args[2] if len(n.args) > 2 else True)
    return p == 0 or training is False


def _value(n: fx.Node):
    return n.meta.get("example_value", n.meta.get("val"))


def match_gelu_producer(x: fx.Node, group_size: int) -> tuple[fx.Node | None, fx.Node] | None:
    """(a, b) when x is cat([a, gelu_tanh(b)], -1) with a's width a multiple of group_size,
    (None, b) when x is gelu_tanh(b) (either behind an inference dropout); else None."""
    if _is_inference_dropout(x):
        x = x.args[0]
    if _is_gelu_tanh(x):
        return None, x.args[0]
    if not (isinstance(x, fx.Node) and x.op == "call_function" and x.target is torch.cat):
        return None
    tensors = x.args[0] if x.args else x.kwargs.get("tensors")
    dim = x.kwargs.get("dim", x.args[1] if len(x.args) > 1 else 0)
    out = _value(x)
    if out is None or not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or dim not in (-1, out.dim() - 1):
        return None
    a, g = tensors
    if not (isinstance(a, fx.Node) and _is_gelu_tanh(g)):
        return None
    va, vb = _value(a), _value(g)  # the GELU keeps its input's shape and dtype (its input may be a new node)
    if va is None or vb is None or va.dtype != vb.dtype or va.shape[:-1] != vb.shape[:-1] or va.shape[-1] % group_size:
        return None
    return a, g.args[0]
