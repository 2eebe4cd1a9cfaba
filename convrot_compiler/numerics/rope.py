"""FLUX's Q and K before attention, in plain torch: per-head RMSNorm of each stream, the streams concatenated along
the sequence, RoPE on interleaved pairs. The reference of ``convrot::rms_rope`` (16-bit) and, cast to e4m3, of
``convrot::rms_rope_e4m3`` (fp8_attention.rms_rope_e4m3_reference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs as diffusers applies it to FLUX's [B, S, H, D] Q and K (``apply_rotary_emb``,
    real tables, pairs on the last dimension): x cos + rot(x) sin with rot(x)_2i = -x_2i+1, rot(x)_2i+1 = x_2i and
    cos, sin [S, D], in float32, rounded to x's dtype."""
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos[:, None] + rotated.float() * sin[:, None]).to(x.dtype)


def rms_rope_reference(sources: list[torch.Tensor], weights: list[torch.Tensor | None], eps: list[float],
                       cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX's Q or K from its projections, as the model computes it: each source [B, S_i, H, D] RMS-normalized
    over D with its weight and eps, the sources concatenated along the sequence, RoPE on pairs
    (``rope_pairs``). Returns the contiguous [B, S, H, D] tensor in the sources' dtype."""
    normed = [F.rms_norm(x, (x.shape[-1],), w, e) for x, w, e in zip(sources, weights, eps)]
    y = normed[0] if len(normed) == 1 else torch.cat(normed, dim=1)
    return rope_pairs(y, cos, sin).contiguous()
