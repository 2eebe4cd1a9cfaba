"""fp8 attention numerics: per-tensor e4m3 Q, K, V and output, in plain torch.

Attention is the one large part of a FLUX forward that ConvRot leaves in bf16, and it grows with the
square of the token count (at 2048x2048, 16896 tokens, it is most of a w4a4 forward). Hopper runs
e4m3 matmuls at twice the bf16 rate. The scheme is the one cuDNN's fp8 flash attention implements:

- Q, K, V scaled per tensor so that their absmax maps to 448 (e4m3's largest finite value) and rounded
  to e4m3; the descales (absmax / 448) go with them;
- the softmax numerators exp(s - max) (in [0, 1]) scaled by 448 and rounded to e4m3 before the P @ V
  product, the row sums taken in float;
- the output in e4m3 with V's scale: every output row is a convex combination of V's rows, so
  |O| <= absmax(V) and V's descale is the output's too.

``fp8_attention_reference`` is that computation with the whole key range as one tile; the kernel's
online softmax rescales numerators tile by tile, so the two agree to e4m3 rounding, not bit for bit.
"""

from __future__ import annotations

import math

import torch

from .rope import rms_rope_reference

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def quantize_e4m3(x: torch.Tensor, bound: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor e4m3: (x * 448 / absmax(x) in e4m3, same shape and strides; the descale absmax / 448 as a
    float32 tensor of one element). An all-zero x gets descale 0 and zeros; a non-finite absmax gives NaN
    values (e4m3fn has no infinity), so a broken input is not hidden.

    ``bound``: a proven bound on |x| (compiler.value_bounds) used instead of its absmax, which then needs no pass
    over x. Values beyond it (a bound that no longer holds) saturate at +-448 instead of turning NaN."""
    if bound is None:
        amax = x.detach().abs().amax().float()
    else:
        amax = torch.as_tensor(bound, dtype=torch.float32, device=x.device)
    scale = torch.where(amax == 0, torch.zeros_like(amax), E4M3_MAX / amax)
    scaled = x.float() * scale
    if bound is not None:
        scaled = scaled.clamp(-E4M3_MAX, E4M3_MAX)
    return scaled.to(E4M3), (amax / E4M3_MAX).reshape(1)


def inverse_descale(descale: torch.Tensor) -> torch.Tensor:
    """1 / descale, 0 for 0 (an all-zero tensor), NaN for NaN."""
    return torch.where(descale == 0, torch.zeros_like(descale), 1.0 / descale)


def dequantize_e4m3(x8: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (x8.float() * descale).to(dtype)


def fp8_attention_reference(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                            descale_k: torch.Tensor, descale_v: torch.Tensor, scale_o: torch.Tensor,
                            softmax_scale: float) -> torch.Tensor:
    """softmax(Q K^T * softmax_scale) V on e4m3 [B, H, S, D] inputs with per-tensor descales; e4m3 output
    scaled by ``scale_o``, in the layout of q8's memory (see the module docstring for the rounding)."""
    q, k, v = (t.float() * d for t, d in ((q8, descale_q), (k8, descale_k), (v8, descale_v)))
    s = (q @ k.transpose(-1, -2)) * softmax_scale
    num = torch.exp(s - s.amax(-1, keepdim=True))
    rows = num.sum(-1, keepdim=True)
    p8 = (num * E4M3_MAX).to(E4M3).float() / E4M3_MAX
    o = (p8 @ v) / rows
    out = output_like(q8)
    out.copy_((o * scale_o).to(E4M3))
    return out


def output_like(q8: torch.Tensor) -> torch.Tensor:
    """The fp8 attention output for ``q8``: empty, in q8's layout when its last dimension is dense
    (FLUX's Q is a [B, S, H, D] tensor seen as [B, H, S, D]: O then reads as [B, S, H * D] for free),
    else contiguous. Reference, kernel and fake all allocate it here, so their strides agree."""
    if q8.stride(-1) == 1:
        return torch.empty_like(q8)
    return torch.empty(q8.shape, dtype=q8.dtype, device=q8.device)


def default_softmax_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def rms_rope_e4m3_reference(sources: list[torch.Tensor], weights: list[torch.Tensor | None], eps: list[float],
                            cos: torch.Tensor, sin: torch.Tensor,
                            bound: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's Q or K from its projections to e4m3, as the model computes it and fp8 attention scales it: each
    source [B, S_i, H, D] RMS-normalized over D with its weight and eps, the sources concatenated along the
    sequence, RoPE on pairs (``rope.rms_rope_reference``), then ``quantize_e4m3`` by ``bound``. Returns the
    contiguous e4m3 [B, S, H, D] tensor and its descale."""
    return quantize_e4m3(rms_rope_reference(sources, weights, eps, cos, sin), bound)
