"""Built-in FLUX-architecture models and inputs, so the tools run without downloads."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..numerics.error import relative_error  # noqa: F401  (the tools' measure, re-exported)

FLUX_CONFIGS: dict[str, dict] = {
    # FLUX.1-dev: hidden 3072, 19 double + 38 single blocks, 11.9 B parameters.
    "flux-dev": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                     guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    # FLUX.1-dev widths, 2 double + 2 single blocks: real GEMM shapes at a fraction of the size.
    "flux-dev-short": dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=128,
                           num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                           guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    # Same structure, CPU-sized: hidden 256 (one 256-wide rotation group), 2 double + 2 single blocks.
    "flux-tiny": dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=64,
                      num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=64,
                      guidance_embeds=True, axes_dims_rope=(8, 28, 28)),
}


def build_flux(config: str | dict = "flux-tiny", seed: int = 0, dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str = "cpu", std: float = 0.02, gate_bias: float = 0.0):
    """A diffusers FluxTransformer2DModel with seeded random N(0, std) weights (norm scales 1),
    drawn on ``device`` (so the same seed gives other weights on CPU and CUDA).

    ``gate_bias`` is added to the adaLN gates (the bias of the gate chunks of every modulation linear).
    With random weights the gates are near 0, so each block adds almost nothing to the residual stream
    and the output hardly depends on the linears (flux-tiny: zeroing every quantized linear moves it by
    5%); a trained model's gates are of order 1, and so the demo's built-in model sets 0.5."""
    from diffusers import FluxTransformer2DModel

    if isinstance(config, str) and config not in FLUX_CONFIGS:
        raise ValueError(f"unknown config {config!r}; choose one of {tuple(FLUX_CONFIGS)}")
    cfg = FLUX_CONFIGS[config] if isinstance(config, str) else dict(config)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg)
    # nn.Module.to, not ModelMixin.to: the latter warns about fp32-kept modules FLUX does not have. Cast on
    # meta, so that the device only ever holds the model in its dtype (the peak a checkpoint load has).
    model = nn.Module.to(model, dtype).eval()
    if torch.device(device).type == "meta":  # shapes only, e.g. to inspect FLUX.1-dev on a small machine
        return model
    randomize(model, seed, device, std)
    if gate_bias:
        with torch.no_grad():
            for module in model.modules():
                gates = {"AdaLayerNormZero": (6, [2, 5]), "AdaLayerNormZeroSingle": (3, [2])}.get(type(module).__name__)
                if gates is not None:
                    module.linear.bias.view(gates[0], -1)[gates[1]] += gate_bias
    return model


def randomize(model: nn.Module, seed: int, device: torch.device | str, std: float = 0.02) -> nn.Module:
    """Give a model seeded N(0, std) weights (norm scales 1, float buffers 0), drawn on ``device``; a meta-device
    model is materialized there first."""
    materialized = any(p.is_meta for p in model.parameters())
    if materialized:
        model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 and name.endswith("weight") and "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
        for _, b in model.named_buffers():
            if materialized and b.is_floating_point():  # uninitialized memory; a constructor's buffers are kept
                b.zero_()
    return model


def build_family(name: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "meta",
                 std: float = 0.02) -> nn.Module:
    """A built-in model of another diffusers family (``families.CONFIGS``: its published config or a tiny
    one), on the meta device (shapes only) or with seeded random weights on ``device``. It is constructed there
    with ``dtype`` as the default dtype, so that the device never holds a float32 copy and the tensors its
    constructor computes (RoPE tables, kept as diffusers builds them) are real."""
    import diffusers

    from ..families import CONFIGS

    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose one of {tuple(FLUX_CONFIGS) + tuple(CONFIGS)}")
    class_name, cfg = CONFIGS[name]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(diffusers, class_name)(**cfg).eval()
    finally:
        torch.set_default_dtype(default)
    return model if torch.device(device).type == "meta" else randomize(model, seed, device, std)


def build_model(name: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                device: torch.device | str = "meta") -> nn.Module:
    """A built-in model by config name: FLUX.1's (``FLUX_CONFIGS``) or another family's (``build_family``)."""
    if name in FLUX_CONFIGS:
        return build_flux(name, seed=seed, dtype=dtype, device=device)
    return build_family(name, seed=seed, dtype=dtype, device=device)


def load_flux(path: str, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):
    """A FluxTransformer2DModel from a local diffusers directory (the transformer folder or a pipeline root)."""
    from diffusers import FluxTransformer2DModel

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path!r} is not a directory; pass a local diffusers FLUX checkpoint")
    sub = "transformer" if os.path.isdir(os.path.join(path, "transformer")) else None
    model = FluxTransformer2DModel.from_pretrained(path, subfolder=sub, torch_dtype=dtype, local_files_only=True)
    return model.to(device).eval()


@dataclass
class FluxInputs(Mapping):
    """One forward's keyword arguments (``model(**inputs)`` works) and its token counts."""

    kwargs: dict
    image_tokens: int
    text_tokens: int

    def __getitem__(self, key):
        return self.kwargs[key]

    def __iter__(self):
        return iter(self.kwargs)

    def __len__(self) -> int:
        return len(self.kwargs)


def image_tokens_for(height: int, width: int) -> int:
    """FLUX packs 8x-downsampled latents in 2x2 patches: (H/16) * (W/16) tokens."""
    if height % 16 or width % 16 or height < 16 or width < 16:
        raise ValueError(f"height and width must be positive multiples of 16, got {height}x{width}")
    return (height // 16) * (width // 16)


def make_flux_inputs(model, height: int = 1024, width: int = 1024, text_tokens: int = 512, batch: int = 1,
                     seed: int = 0, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> FluxInputs:
    """Random (never zero) inputs for one denoising forward of a FluxTransformer2DModel (families.example_inputs),
    with their token counts."""
    from ..families import example_inputs

    n_img = image_tokens_for(height, width)
    kwargs = example_inputs(model, device, dtype, height, width, text_tokens, batch=batch, seed=seed)
    return FluxInputs(kwargs, n_img, text_tokens)
