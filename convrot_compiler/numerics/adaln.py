"""The adaLN normalization of DiT blocks: ``layer_norm(x) * (1 + scale) + shift``, one scale and shift per sample.

FLUX normalizes each block's input this way before its first quantized linears (norm1 / norm1_context in the double
blocks, the single blocks' norm over the text and image tokens together). The rotate+quantize after it can compute
it as it loads the row (``convrot::rotate_quantize_adaln``), so the normalized activations are never written.
"""

from __future__ import annotations

import torch


def adaln_reference(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """x [B, T, K] normalized over K (no affine), times (1 + scale) plus shift ([B, K] each, broadcast over the
    T tokens): in float32, rounded once to x's dtype, as Inductor computes the chain when it fuses it."""
    if x.dim() != 3 or scale.shape != (x.shape[0], x.shape[2]) or shift.shape != scale.shape:
        raise ValueError(f"adaLN takes x [B, T, K] with scale and shift [B, K]; got {tuple(x.shape)}, "
                         f"{tuple(scale.shape)} and {tuple(shift.shape)}")
    y = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (y * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(x.dtype)


def adaln_rows_reference(x: torch.Tensor, x2: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor,
                         eps: float) -> torch.Tensor:
    """``adaln_reference`` of cat([x, x2], 1) (x2 may be None) as rows [B * T, K]: each sample's tokens, x's first
    (FLUX's single blocks normalize the text and the image tokens together)."""
    tokens = x if x2 is None else torch.cat([x, x2], 1)
    return adaln_reference(tokens, scale, shift, eps).reshape(-1, x.shape[-1])
