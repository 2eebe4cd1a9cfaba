"""The diffusers transformer families the compiler knows by more than names: their published configs (and
tiny ones of the same structure, for CPU), and example inputs of one denoising forward built from a model's
config, on any device (the role probe runs them on the meta device, where nothing is computed). A family
missing here is compiled by module names alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

TEXT_TOKENS = 16  # the probe's; per-token linears then see 16 or more rows per sample

_WAN_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)

# name -> (diffusers class, config): the published transformer configs, and tiny ones of the same structure
# (hidden 256, two blocks of each kind) that compile on a CPU in seconds.
CONFIGS: dict[str, tuple[str, dict]] = {
    "flux2-dev": ("Flux2Transformer2DModel", dict(
        patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
        num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32))),
    "flux2-tiny": ("Flux2Transformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=2, joint_attention_dim=256, timestep_guidance_channels=256, mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32))),
    "qwen-image": ("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))),
    "qwen-image-tiny": ("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=128, num_attention_heads=2,
        joint_attention_dim=256, axes_dims_rope=(16, 56, 56))),
    "sd3.5-large": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
        joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192, qk_norm="rms_norm")),
    "sd3-tiny": ("SD3Transformer2DModel", dict(
        sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=128, num_attention_heads=2,
        joint_attention_dim=256, caption_projection_dim=256, pooled_projection_dim=256, out_channels=16,
        pos_embed_max_size=32)),
    "wan2.1-14b": ("WanTransformer3DModel", _WAN_14B),
    "wan-tiny": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=4, out_channels=4,
        text_dim=256, freq_dim=256, ffn_dim=512, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32)),
    # Wan 2.2 A14B: two experts of this config (high noise, then low noise), one transformer each
    "wan2.2-a14b": ("WanTransformer3DModel", _WAN_14B),
    # Wan 2.2 TI2V 5B: latents of its own VAE (48 channels, 16x16 pixels each), one token per 32 x 32 pixels
    "wan2.2-ti2v-5b": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
        text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)),
    # HunyuanVideo 1.5 (text to video): diffusers' defaults; 65 input channels are the 32 of its VAE's latent
    # (16x16 pixels each, patch 1), 32 of a conditioning latent and a mask
    "hunyuanvideo-1.5": ("HunyuanVideo15Transformer3DModel", dict(
        in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
        num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm", text_embed_dim=3584,
        text_embed_2_dim=1472, image_embed_dim=1152, rope_theta=256.0, rope_axes_dim=(16, 56, 56), target_size=480,
        task_type="t2v")),
    "hunyuanvideo-1.5-tiny": ("HunyuanVideo15Transformer3DModel", dict(
        in_channels=65, out_channels=32, num_attention_heads=2, attention_head_dim=128, num_layers=2,
        num_refiner_layers=1, text_embed_dim=256, text_embed_2_dim=256, image_embed_dim=256,
        rope_axes_dim=(16, 56, 56), target_size=480, task_type="t2v")),
    "z-image": ("ZImageTransformer2DModel", dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
        n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512])),
    "z-image-tiny": ("ZImageTransformer2DModel", dict(
        in_channels=16, dim=256, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=256,
        axes_dims=[32, 48, 48], axes_lens=[64, 32, 32])),
}


def _grid_ids(channels: int, rows: int, cols: int) -> torch.Tensor:
    ids = torch.zeros(rows * cols, channels)
    ids[:, -2] = torch.arange(rows * cols) // cols
    ids[:, -1] = torch.arange(rows * cols) % cols
    return ids


def _randn(shape, device, dtype, gen) -> torch.Tensor:
    if gen is None:  # the meta device: shapes only
        return torch.empty(*shape, device=device, dtype=dtype)
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


# Each takes the model's config, the batch and the latent grid (rows, cols of 16-pixel tokens; frames of a
# video) and gives the forward's keyword arguments.
def _flux(cfg, b, rows, cols, frames, text, device, dtype, gen) -> dict:
    return dict(hidden_states=_randn((b, rows * cols, cfg.in_channels), device, dtype, gen),
                encoder_hidden_states=_randn((b, text, cfg.joint_attention_dim), device, dtype, gen),
                pooled_projections=_randn((b, cfg.pooled_projection_dim), device, dtype, gen),
                timestep=torch.full((b,), 0.5, device=device, dtype=dtype),
                img_ids=_grid_ids(3, rows, cols).to(device), txt_ids=torch.zeros(text, 3, device=device),
                guidance=torch.full((b,), 3.5, device=device, dtype=dtype) if cfg.guidance_embeds else None)


def _flux2(cfg, b, rows, cols, frames, text, device, dtype, gen) -> dict:
    return dict(hidden_states=_randn((b, rows * cols, cfg.in_channels), device, dtype, gen),
                encoder_hidden_states=_randn((b, text, cfg.joint_attention_dim), device, dtype, gen),
                timestep=torch.full((b,), 0.5, device=device, dtype=dtype),
                img_ids=_grid_ids(4, rows, cols).to(device), txt_ids=torch.zeros(text, 4, device=device),
                guidance=torch.full((b,), 3.5, device=device, dtype=dtype))


def _qwen_image(cfg, b, rows, cols, frames, text, device, dtype, gen) -> dict:
    return dict(hidden_states=_randn((b, rows * cols, cfg.in_channels), device, dtype, gen),
                encoder_hidden_states=_randn((b, text, cfg.joint_attention_dim), device, dtype, gen),
                timestep=torch.full((b,), 0.5, device=device, dtype=dtype), img_shapes=[(1, rows, cols)] * b)


def _sd3(cfg, b, rows, cols, frames, text, device, dtype, gen) -> dict:
    return dict(hidden_states=_randn((b, cfg.in_channels, rows * 2, cols * 2), device, dtype, gen),
                encoder_hidden_states=_randn((b, text, cfg.joint_attention_dim), device, dtype, gen),
                pooled_projections=_randn((b, cfg.pooled_projection_dim), device, dtype, gen),
                timestep=torch.full((b,), 500.0, device=device, dtype=dtype))


def _latent_frames(frames: int) -> int:
    return (frames - 1) // 4 + 1  # the video VAEs' 4x temporal compression, the first frame alone


def _wan(cfg, b, rows, cols, frames, text, device, dtype, gen) -> dict:
    side = 1 if _wan22_vae(cfg) else 2  # latent pixels per 16 image pixels
    return dict(hidden_states=_randn((b, cfg.in_channels, _latent_frames(frames), rows * side, cols * side), device,
                                     dtype, gen),
                timestep=torch.full((b,), 500, device=device),
                encoder_hidden_states=_randn((b, text, cfg.text_dim), device, dtype, gen))


def _wan22_vae(cfg) -> bool:
    """Whether a Wan transformer reads the latents of Wan 2.2's VAE (48 channels, 16x16 pixels each)."""
    return cfg.in_channels == 48


SIGLIP_TOKENS = 729  # the image embeddings HunyuanVideo 1.5 takes (SigLIP, 27 x 27); zeros for text to video


def _hunyuan_video15(cfg, b, rows, cols, frames, text, device, dtype, gen) -> dict:
    ones = torch.ones(b, text, device=device)
    inputs = dict(hidden_states=_randn((b, cfg.in_channels, _latent_frames(frames), rows, cols), device, dtype, gen),
                  timestep=torch.full((b,), 500.0, device=device, dtype=dtype),
                  encoder_hidden_states=_randn((b, text, cfg.text_embed_dim), device, dtype, gen),
                  encoder_attention_mask=ones,
                  encoder_hidden_states_2=_randn((b, text, cfg.text_embed_2_dim), device, dtype, gen),
                  encoder_attention_mask_2=ones,
                  image_embeds=torch.zeros(b, SIGLIP_TOKENS, cfg.image_embed_dim, device=device, dtype=dtype))
    if cfg.use_meanflow:
        inputs["timestep_r"] = torch.full((b,), 250.0, device=device, dtype=dtype)
    return inputs


def _z_image(cfg, b, rows, cols, frames, text, device, dtype, gen) -> dict:
    # one latent [C, frames, H, W] and one caption [tokens, features] per sample, as lists
    return dict(x=[_randn((cfg.in_channels, 1, rows * 2, cols * 2), device, dtype, gen) for _ in range(b)],
                t=torch.full((b,), 0.5, device=device, dtype=dtype),
                cap_feats=[_randn((text, cfg.cap_feat_dim), device, dtype, gen) for _ in range(b)])


FAMILIES: dict[str, Callable] = {
    "FluxTransformer2DModel": _flux,
    "Flux2Transformer2DModel": _flux2,
    "QwenImageTransformer2DModel": _qwen_image,
    "SD3Transformer2DModel": _sd3,
    "WanTransformer3DModel": _wan,
    "ZImageTransformer2DModel": _z_image,
    "HunyuanVideo15Transformer3DModel": _hunyuan_video15,
}
VIDEO = ("WanTransformer3DModel", "HunyuanVideo15Transformer3DModel")

# Families whose forward the meta device cannot run (data-dependent Python branches and boolean masks over the
# text tokens): the role probe runs a miniature of the model's own config instead, on the CPU, with these
# fields shrunk (its module names are the model's, blocks aside).
MINIATURES: dict[str, dict] = {
    "HunyuanVideo15Transformer3DModel": dict(num_layers=1, num_refiner_layers=1, num_attention_heads=2,
                                             text_embed_dim=256, text_embed_2_dim=256, image_embed_dim=256),
}


def pixels_per_token(model: nn.Module) -> int:
    """The side in pixels of one image token: 16, or 32 for Wan 2.2 TI2V 5B (its 16x VAE and 2x2 patches)."""
    return 32 if type(model).__name__ == "WanTransformer3DModel" and _wan22_vae(model.config) else 16


def image_tokens(model: nn.Module, height: int, width: int, frames: int = 1) -> int:
    """Image (or video) tokens of one sample of ``model``'s family at that size: one per ``pixels_per_token``
    square, per latent frame of a video model (the VAE's 4x temporal compression)."""
    latent_frames = _latent_frames(frames) if type(model).__name__ in VIDEO else 1
    side = pixels_per_token(model)
    return (height // side) * (width // side) * latent_frames


def example_inputs(model: nn.Module, device: torch.device | str = "meta", dtype: torch.dtype | None = None,
                   height: int = 128, width: int = 128, text_tokens: int = TEXT_TOKENS, frames: int = 1,
                   batch: int = 1, seed: int = 0) -> dict | None:
    """Keyword arguments of one forward of ``model`` (a known diffusers family) for ``batch`` ``height`` x
    ``width`` images (``frames`` of them for a video model; each family's own latent layout, one token per
    16 x 16 pixels), random where they are data, or None for another class. The default, one 128 x 128 image
    with 16 text tokens, is the role probe's: 64 image tokens."""
    build = FAMILIES.get(type(model).__name__)
    if build is None:
        return None
    side = pixels_per_token(model)
    if height % side or width % side or frames < 1 or batch < 1:
        raise ValueError(f"{batch} x {height} x {width} x {frames} frames: height and width must be multiples of "
                         f"{side} for {type(model).__name__} with its config, batch and frames at least 1")
    dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.bfloat16)
    gen = None if torch.device(device).type == "meta" else torch.Generator().manual_seed(seed)
    kwargs = build(model.config, batch, height // 16, width // 16, frames, text_tokens, device, dtype, gen)
    return {**kwargs, "return_dict": False}


def sample_output(out) -> torch.Tensor:
    """The denoised sample of a forward's ``return_dict=False`` output: its first element, stacked when the
    family returns one tensor per sample (Z-Image)."""
    first = out[0]
    return torch.stack(first) if isinstance(first, (list, tuple)) else first
