"""Find the chain that makes FLUX's Q or K in a Dynamo FX graph: per-head RMSNorm of one or two streams,
their concatenation along the sequence, RoPE on interleaved pairs, and the permute to [B, H, S, D] that the
attention reads. attention_rewrite runs such a chain as one kernel (``convrot::rms_rope_e4m3``) that writes
the e4m3 Q or K directly.

The chain is matched op by op as diffusers writes it (``torch.nn.RMSNorm``; ``apply_rotary_emb`` with real
cos and sin tables of [S, D], pairs on the last dimension, ``sequence_dim=1``; the native attention backend's
permute), so what the kernel computes is what the graph computed. Anything else (Qwen-Image's complex RoPE,
an RMSNorm written out, a third stream) is not matched and Inductor compiles it as before.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from .match import _example
from .value_bounds import rms_norm_call

MAX_STREAMS = 2


@dataclass(frozen=True)
class RmsRopeChain:
    """The streams [B, S_i, H, D] with their RMSNorm weights (None: no weight) and eps, in concatenation order,
    and RoPE's cos and sin, each a [1, S, 1, D] view of an [S, D] table."""

    sources: tuple[fx.Node, ...]
    weights: tuple[fx.Node | None, ...]
    eps: tuple[float, ...]
    cos: fx.Node
    sin: fx.Node
    seq: int
    head_dim: int


def _is(node: object, name: str, *functions) -> bool:
    """``node`` calls the method ``name`` or one of ``functions``."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method":
        return node.target == name
    return node.op == "call_function" and node.target in functions


def _arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _to_float(node: object) -> fx.Node | None:
    """x for ``x.float()`` or ``x.to(torch.float32)``."""
    if _is(node, "float") and len(node.args) == 1:
        return node.args[0]
    if _is(node, "to") and len(node.args) == 2 and node.args[1] is torch.float32 and not node.kwargs:
        return node.args[0]
    return None


def _unpermuted(node: object) -> fx.Node | None:
    """x for ``x.permute(0, 2, 1, 3)`` or ``x.transpose(1, 2)``: [B, S, H, D] seen as [B, H, S, D]."""
    if _is(node, "permute", torch.permute):
        dims = tuple(node.args[1:]) if len(node.args) > 2 else tuple(_arg(node, 1, "dims", ()))
        return node.args[0] if dims == (0, 2, 1, 3) else None
    if _is(node, "transpose", torch.transpose):
        return node.args[0] if len(node.args) == 3 and {node.args[1], node.args[2]} in ({1, 2}, {1, -2}) else None
    return None


def _rotated_pairs(node: object) -> fx.Node | None:
    """x for rot(x) = ``torch.stack([-imag, real], -1).flatten(3)`` with ``real, imag = x.reshape(..., -1, 2).unbind(-1)``."""
    if not (_is(node, "flatten", torch.flatten) and len(node.args) == 2 and node.args[1] in (3, -2)):
        return None
    stack = node.args[0]
    if not (_is(stack, "stack", torch.stack) and _arg(stack, 1, "dim") in (-1, 4)):
        return None
    parts = _arg(stack, 0, "tensors")
    if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and _is(parts[0], "neg", operator.neg, torch.neg)):
        return None
    imag, real = parts[0].args[0], parts[1]
    if not all(_is(p, "__getitem__", operator.getitem) for p in (imag, real)) or (imag.args[1], real.args[1]) != (1, 0):
        return None
    unbind = imag.args[0]
    if real.args[0] is not unbind or not (_is(unbind, "unbind", torch.unbind) and _arg(unbind, 1, "dim") in (-1, 4)):
        return None
    reshape = unbind.args[0]
    if not _is(reshape, "reshape", torch.reshape):
        return None
    x = reshape.args[0]
    shape = _example(reshape)
    example = _example(x)
    if example is None or shape is None or tuple(shape.shape) != (*example.shape[:-1], example.shape[-1] // 2, 2):
        return None
    return x


def _rope(node: object) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(x, cos, sin) for ``(x.float() * cos + rot(x).float() * sin).to(x.dtype)``."""
    if not (_is(node, "to") and len(node.args) == 2 and not node.kwargs):
        return None
    total = node.args[0]
    if not (_is(total, "add", operator.add, torch.add) and len(total.args) == 2 and not total.kwargs):
        return None
    products = []
    for p in total.args:
        if not (_is(p, "mul", operator.mul, torch.mul) and len(p.args) == 2):
            return None
        products.append(p.args)
    for (a, b) in (products, products[::-1]):
        for x_float, cos in (a, a[::-1]):
            x = _to_float(x_float)
            if x is None:
                continue
            for rot_float, sin in (b, b[::-1]):
                if _rotated_pairs(_to_float(rot_float)) is x:
                    example = _example(x)
                    if example is not None and node.args[1] == example.dtype:
                        return x, cos, sin
    return None


def _rms_norm(node: object) -> tuple[fx.Node, fx.Node | None, float] | None:
    """(x, weight, eps) for ``F.rms_norm(x, (D,), weight, eps)`` over the last dimension with a given eps."""
    call = rms_norm_call(node)
    if call is None:
        return None
    x, shape, weight, eps = call
    example = _example(x)
    if example is None or not isinstance(shape, (tuple, list)) or tuple(shape) != (example.shape[-1],) or \
            not isinstance(eps, float):
        return None
    return x, weight, eps


def _streams(node: object) -> list[tuple[fx.Node, fx.Node | None, float]] | None:
    """The RMSNorms whose outputs make ``node``: one, or several concatenated along dimension 1."""
    one = _rms_norm(node)
    if one is not None:
        return [one]
    if not _is(node, "cat", torch.cat, torch.concat) or _arg(node, 1, "dim", 0) not in (1, -3):
        return None
    parts = [_rms_norm(p) for p in _arg(node, 0, "tensors")]
    return None if not parts or None in parts else parts


def match_rms_rope(node: object) -> RmsRopeChain | None:
    """The chain that makes ``node``, an attention's [B, H, S, D] Q or K, or None when it is not FLUX's."""
    x = _unpermuted(node)
    rope = _rope(x) if x is not None else None
    if rope is None:
        return None
    y, cos, sin = rope
    streams = _streams(y)
    y_ex, cos_ex, sin_ex = (_example(n) for n in (y, cos, sin))
    if streams is None or len(streams) > MAX_STREAMS or None in (y_ex, cos_ex, sin_ex) or y_ex.dim() != 4:
        return None
    _, seq, _, d = y_ex.shape
    if d % 2 or any(tuple(t.shape) not in ((1, seq, 1, d), (seq, 1, d)) or not t.is_floating_point()
                    for t in (cos_ex, sin_ex)):
        return None
    for source, _, _ in streams:
        ex = _example(source)
        if ex is None or ex.dim() != 4 or ex.dtype != y_ex.dtype or \
                (ex.shape[0], ex.shape[2], ex.shape[3]) != (y_ex.shape[0], y_ex.shape[2], d):
            return None
    return RmsRopeChain(tuple(s[0] for s in streams), tuple(s[1] for s in streams), tuple(s[2] for s in streams),
                        cos, sin, seq, d)
