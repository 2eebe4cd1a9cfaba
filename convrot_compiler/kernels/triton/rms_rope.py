"""FLUX's Q or K before attention in one pass: per-head RMSNorm of one or two sources (text and image
streams, concatenated along the sequence), RoPE on pairs, written in the sources' dtype
(numerics.rope.rms_rope_reference) or, for fp8 attention, cast to e4m3 scaled by a bound
(numerics.fp8_attention.rms_rope_e4m3_reference).

Why a kernel: Inductor splits this chain into a row reduction and pointwise passes around the concatenation,
and the single blocks' fused kernel ran at a third of copy speed (88 us for 85 MB on an H100). Here each
program owns HEADS_BLOCK heads of one token (rows of D channels), reads them and the token's cos and sin once,
and writes the rows contiguously: 3 bytes moved per element in e4m3, 4 in 16 bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...numerics.fp8_attention import E4M3, E4M3_MAX
from .common import autotune_configs, check_device, interpreting, round_to_float_grid

MAX_SOURCES = 2
E4M3_LIMIT: tl.constexpr = tl.constexpr(E4M3_MAX)


@triton.jit
def _rounded(y, dtype: tl.constexpr, EMULATE_CASTS: tl.constexpr):
    """float32 ``y`` rounded to ``dtype`` (bf16 or fp16) and back, as the model's casts between its steps do."""
    if EMULATE_CASTS:
        if dtype == tl.bfloat16:
            y = round_to_float_grid(y, 2.0 ** -7, 2.0 ** -133)
        else:
            y = round_to_float_grid(y, 2.0 ** -10, 2.0 ** -24)
    return y.to(dtype).to(tl.float32)


@triton.autotune(
    configs=autotune_configs(
        [triton.Config({"HEADS_BLOCK": hb}, num_warps=w) for hb, w in ((8, 1), (8, 2), (16, 2), (16, 4), (32, 4),
                                                                        (32, 8))],
        interpreter=triton.Config({"HEADS_BLOCK": 2}, num_warps=1)),
    key=["D", "TWO", "E4M3_OUT"])
@triton.jit
def _rms_rope_kernel(x0_ptr, x1_ptr, w0_ptr, w1_ptr, cos_ptr, sin_ptr, bound_ptr, out_ptr,
                     seq, heads, seq0,
                     x0_sb, x0_ss, x0_sh, x1_sb, x1_ss, x1_sh, cos_ss, sin_ss, eps0, eps1,
                     D: tl.constexpr, TWO: tl.constexpr, HAS_W0: tl.constexpr, HAS_W1: tl.constexpr,
                     E4M3_OUT: tl.constexpr, EMULATE_CASTS: tl.constexpr, HEADS_BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq
    s = token % seq
    h = tl.program_id(1) * HEADS_BLOCK + tl.arange(0, HEADS_BLOCK)
    live = (h < heads)[:, None]
    d = tl.arange(0, D)[None, :]
    row = x0_ptr + b * x0_sb + s * x0_ss + h[:, None] * x0_sh
    eps = eps0
    if TWO:
        if s >= seq0:
            row = x1_ptr + b * x1_sb + (s - seq0) * x1_ss + h[:, None] * x1_sh
            eps = eps1
    x = tl.load(row + d, mask=live, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=1) / D + eps)
    y = x * rstd[:, None]
    if HAS_W0:
        w = tl.load(w0_ptr + d).to(tl.float32)
    else:
        w = tl.full((1, D), 1.0, tl.float32)
    if TWO:
        if HAS_W1:
            w1 = tl.load(w1_ptr + d).to(tl.float32)
        else:
            w1 = tl.full((1, D), 1.0, tl.float32)
        w = tl.where(s < seq0, w, w1)
    y = _rounded(y * w, x0_ptr.dtype.element_ty, EMULATE_CASTS)
    c = tl.load(cos_ptr + s * cos_ss + d).to(tl.float32)
    sn = tl.load(sin_ptr + s * sin_ss + d).to(tl.float32)
    even, odd = tl.split(tl.reshape(y, (HEADS_BLOCK, D // 2, 2)))
    rotated = tl.reshape(tl.join(-odd, even), (HEADS_BLOCK, D))
    o = _rounded(y * c + rotated * sn, x0_ptr.dtype.element_ty, EMULATE_CASTS)
    if E4M3_OUT:
        bound = tl.load(bound_ptr)
        scale = tl.where(bound == 0, 0.0, E4M3_LIMIT / tl.where(bound == 0, 1.0, bound))
        o = tl.minimum(tl.maximum(o * scale, -E4M3_LIMIT, propagate_nan=tl.PropagateNan.ALL), E4M3_LIMIT,
                       propagate_nan=tl.PropagateNan.ALL)
        if EMULATE_CASTS:
            o = round_to_float_grid(o, 0.125, 2.0 ** -9)
    tl.store(out_ptr + (token * heads + h[:, None]) * D + d, o.to(out_ptr.dtype.element_ty), mask=live)


def unsupported_reason(dtype: torch.dtype, head_dim: int, streams: int) -> str | None:
    """Why the kernel cannot take ``streams`` sources of ``dtype`` with heads of ``head_dim``, or None."""
    if not 1 <= streams <= MAX_SOURCES:
        return f"takes 1 to {MAX_SOURCES} streams, got {streams}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {dtype} (bf16 or fp16 only)"
    if head_dim < 2 or head_dim & (head_dim - 1):
        return f"head dim {head_dim} is not a power of two"
    return None


def _check(sources: list[torch.Tensor], weights: list, eps: list, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if not sources or len(weights) != len(sources) or len(eps) != len(sources):
        raise ValueError(f"rms_rope: one weight (or None) and one eps per source, got {len(sources)} sources, "
                         f"{len(weights)} weights, {len(eps)} eps")
    x0 = sources[0]
    why = unsupported_reason(x0.dtype, x0.shape[-1], len(sources))
    if why is None and any(x.dim() != 4 or x.shape[0] != x0.shape[0] or x.shape[2:] != x0.shape[2:] or
                           x.dtype != x0.dtype for x in sources):
        why = f"sources {[tuple(t.shape) for t in sources]} are not [B, S_i, H, D] of one B, H, D and dtype"
    seq = sum(x.shape[1] for x in sources)
    if why is None and (tuple(cos.shape) != (seq, x0.shape[-1]) or cos.shape != sin.shape):
        why = f"cos, sin are {tuple(cos.shape)}, {tuple(sin.shape)}, not [S, D] = [{seq}, {x0.shape[-1]}]"
    if why:
        raise ValueError(f"rms_rope: {why}")


def rms_rope(sources: list[torch.Tensor], weights: list[torch.Tensor | None], eps: list[float],
             cos: torch.Tensor, sin: torch.Tensor, bound: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel: [B, S, H, D] contiguous (S the sources' total) from 1 or 2 sources [B, S_i, H, D], their
    RMSNorm weights [D] (or None) and eps, cos and sin [S, D]; in the sources' dtype, or with ``bound`` (float32,
    one element, on |RoPE's output|) in e4m3 scaled by 448 / bound."""
    _check(sources, weights, eps, cos, sin)
    check_device(*sources, cos, sin, bound)
    sources = [x if x.stride(-1) == 1 else x.contiguous() for x in sources]
    weights = [w if w is None else w.reshape(-1).contiguous() for w in weights]
    if any(w is not None and w.numel() != sources[0].shape[-1] for w in weights):
        raise ValueError(f"rms_rope: weights {[None if w is None else tuple(w.shape) for w in weights]} are "
                         f"not [D] = [{sources[0].shape[-1]}]")
    two = len(sources) == 2
    x0, x1 = sources[0], sources[-1]
    w0, w1 = weights[0], weights[-1]
    b, _, heads, d = x0.shape
    seq = cos.shape[0]
    e4m3 = bound is not None
    out = torch.empty(b, seq, heads, d, dtype=E4M3 if e4m3 else x0.dtype, device=x0.device)
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    grid = lambda meta: (b * seq, triton.cdiv(heads, meta["HEADS_BLOCK"]))  # noqa: E731
    bound = bound.float().reshape(1) if e4m3 else out  # read only with E4M3_OUT
    _rms_rope_kernel[grid](
        x0, x1, w0 if w0 is not None else x0, w1 if w1 is not None else x0, cos, sin, bound,
        out, seq, heads, x0.shape[1] if two else seq,
        x0.stride(0), x0.stride(1), x0.stride(2), x1.stride(0), x1.stride(1), x1.stride(2),
        cos.stride(0), sin.stride(0), float(eps[0]), float(eps[-1]),
        D=d, TWO=two, HAS_W0=w0 is not None, HAS_W1=two and w1 is not None, E4M3_OUT=e4m3,
        EMULATE_CASTS=interpreting())
    return out
