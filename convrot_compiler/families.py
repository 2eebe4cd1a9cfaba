"""Example inputs of one denoising forward for the diffusers transformer families the compiler knows, built
from a model's config: batch 1, 64 image tokens, 16 text tokens, on any device (the role probe runs them on
the meta device, where nothing is computed). A family missing here is compiled by module names alone."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

IMAGE_TOKENS, TEXT_TOKENS = 64, 16  # an 8 x 8 latent grid; per-token linears see 16 or more rows per sample


def _grid_ids(channels: int, side: int) -> torch.Tensor:
    ids = torch.zeros(side * side, channels)
    ids[:, -2] = torch.arange(side * side) // side
    ids[:, -1] = torch.arange(side * side) % side
    return ids


def _flux(cfg, device, dtype) -> dict:
    return dict(hidden_states=torch.zeros(1, IMAGE_TOKENS, cfg.in_channels, device=device, dtype=dtype),
                encoder_hidden_states=torch.zeros(1, TEXT_TOKENS, cfg.joint_attention_dim, device=device, dtype=dtype),
                pooled_projections=torch.zeros(1, cfg.pooled_projection_dim, device=device, dtype=dtype),
                timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                img_ids=_grid_ids(3, 8).to(device), txt_ids=torch.zeros(TEXT_TOKENS, 3, device=device),
                guidance=torch.full((1,), 3.5, device=device, dtype=dtype) if cfg.guidance_embeds else None)


def _flux2(cfg, device, dtype) -> dict:
    return dict(hidden_states=torch.zeros(1, IMAGE_TOKENS, cfg.in_channels, device=device, dtype=dtype),
                encoder_hidden_states=torch.zeros(1, TEXT_TOKENS, cfg.joint_attention_dim, device=device, dtype=dtype),
                timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                img_ids=_grid_ids(4, 8).to(device), txt_ids=torch.zeros(TEXT_TOKENS, 4, device=device),
                guidance=torch.full((1,), 3.5, device=device, dtype=dtype))


def _qwen_image(cfg, device, dtype) -> dict:
    return dict(hidden_states=torch.zeros(1, IMAGE_TOKENS, cfg.in_channels, device=device, dtype=dtype),
                encoder_hidden_states=torch.zeros(1, TEXT_TOKENS, cfg.joint_attention_dim, device=device, dtype=dtype),
                encoder_hidden_states_mask=torch.ones(1, TEXT_TOKENS, dtype=torch.long, device=device),
                timestep=torch.full((1,), 0.5, device=device, dtype=dtype), img_shapes=[(1, 8, 8)])


def _sd3(cfg, device, dtype) -> dict:
    side = 8 * cfg.patch_size
    return dict(hidden_states=torch.zeros(1, cfg.in_channels, side, side, device=device, dtype=dtype),
                encoder_hidden_states=torch.zeros(1, TEXT_TOKENS, cfg.joint_attention_dim, device=device, dtype=dtype),
                pooled_projections=torch.zeros(1, cfg.pooled_projection_dim, device=device, dtype=dtype),
                timestep=torch.full((1,), 500.0, device=device, dtype=dtype))


def _wan(cfg, device, dtype) -> dict:
    pt, ph, pw = cfg.patch_size
    return dict(hidden_states=torch.zeros(1, cfg.in_channels, pt, 8 * ph, 8 * pw, device=device, dtype=dtype),
                timestep=torch.full((1,), 500, device=device),
                encoder_hidden_states=torch.zeros(1, TEXT_TOKENS, cfg.text_dim, device=device, dtype=dtype))


FAMILIES: dict[str, Callable] = {
    "FluxTransformer2DModel": _flux,
    "Flux2Transformer2DModel": _flux2,
    "QwenImageTransformer2DModel": _qwen_image,
    "SD3Transformer2DModel": _sd3,
    "WanTransformer3DModel": _wan,
}


def example_inputs(model: nn.Module, device: torch.device | str = "meta",
                   dtype: torch.dtype | None = None) -> dict | None:
    """Keyword arguments of one forward of ``model`` (a known diffusers family), or None for another class."""
    build = FAMILIES.get(type(model).__name__)
    if build is None:
        return None
    dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.bfloat16)
    return {**build(model.config, device, dtype), "return_dict": False}
