"""diffusers FLUX pipelines for the tools: a built-in random one (nothing downloaded) or a local
checkpoint, prompt embeddings for the random one, and the time of each denoising step."""

from __future__ import annotations

import os
import time
import warnings

import torch

from .models import FLUX_CONFIGS, build_flux

# FLUX.1's VAE (16 latent channels, 8x downsampling), and a two-level one for CPU-sized pipelines.
VAE_CONFIGS: dict[str, dict] = {
    "flux": dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 layers_per_block=2, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False, sample_size=1024),
    "tiny": dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32),
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 layers_per_block=1, norm_num_groups=16, scaling_factor=0.3611, shift_factor=0.1159),
}


def random_pipeline(config: str = "flux-tiny", device: torch.device | str = "cpu", seed: int = 0,
                    transformer: torch.nn.Module | None = None):
    """A FluxPipeline of seeded random modules: a built-in transformer config (or ``transformer``), FLUX's
    VAE (a two-level one for flux-tiny), and no text encoders: pass prompt embeddings
    (``random_prompt_embeds``). Its images are noise; its speed is the real model's."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    if config not in FLUX_CONFIGS:
        raise ValueError(f"unknown config {config!r}; choose one of {tuple(FLUX_CONFIGS)}")
    transformer = transformer if transformer is not None else build_flux(config, seed=seed, device=device)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIGS["tiny" if config == "flux-tiny" else "flux"])
    vae = torch.nn.Module.to(vae, device=device, dtype=torch.bfloat16)  # ModelMixin.to warns of fp32 modules it has not
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def load_pipeline(path: str, dtype: torch.dtype = torch.bfloat16, transformer: torch.nn.Module | None = None):
    """A FluxPipeline from a local diffusers folder (with model_index.json), in CPU memory; nothing is
    downloaded. ``transformer``: this one instead of the folder's (whose weights are then never read)."""
    from diffusers import FluxPipeline

    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"--model {path!r} is not a diffusers pipeline folder (no model_index.json): give "
                                "a local FLUX.1 checkpoint; nothing is downloaded")
    extra = {} if transformer is None else {"transformer": transformer}
    return FluxPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True, **extra)


def random_prompt_embeds(transformer: torch.nn.Module, count: int, text_tokens: int, device: torch.device | str,
                         seed: int = 0) -> list[dict]:
    """Seeded random prompt embeddings for a pipeline without text encoders, one dict of pipeline
    arguments per prompt."""
    cfg = transformer.config
    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        out.append({"prompt_embeds": torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=g).to(
                        device, torch.bfloat16),
                    "pooled_prompt_embeds": torch.randn(1, cfg.pooled_projection_dim, generator=g).to(
                        device, torch.bfloat16)})
    return out


VAE_TILING = ("auto", "on", "off")
VAE_TILE = 512


def enable_vae_tiling(vae, tile: int = VAE_TILE) -> None:
    """``vae.enable_tiling()`` with tiles of at most ``tile`` pixels. FLUX.1's VAE tiles at its sample_size,
    1024, and so decodes a 1024² image whole even with tiling on."""
    vae.enable_tiling()
    size = getattr(vae, "tile_sample_min_size", None)
    if isinstance(size, int) and size > tile:
        vae.tile_sample_min_size = tile
        vae.tile_latent_min_size = tile // 2 ** (len(vae.config.block_out_channels) - 1)


def decode_latents(pipe, latents: torch.Tensor, height: int, width: int, tiling: str = "off") -> torch.Tensor:
    """What FluxPipeline does after denoising with ``output_type="latent"``: unpack the latents, undo the
    VAE's scaling and shift, decode. Returns the VAE's image tensor.

    ``tiling``: ``"on"`` decodes in tiles (``vae.enable_tiling``); ``"auto"`` decodes whole and, if the GPU runs
    out of memory, warns and decodes again in tiles (leaving tiling on, so ``pipe.vae.use_tiling`` tells which
    ran). Tiles are ``VAE_TILE`` pixels (``enable_vae_tiling``)."""
    if tiling not in VAE_TILING:
        raise ValueError(f"VAE tiling {tiling!r}: choose one of {VAE_TILING}")
    if tiling == "on":
        enable_vae_tiling(pipe.vae)
    with torch.no_grad():
        lat = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        lat = (lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).to(pipe.vae.dtype)
        if tiling != "auto" or pipe.vae.use_tiling:
            return pipe.vae.decode(lat, return_dict=False)[0]
        try:
            return pipe.vae.decode(lat, return_dict=False)[0]
        except torch.OutOfMemoryError as e:
            reason = str(e).splitlines()[0]
        warnings.warn(f"the VAE decode ran out of GPU memory ({reason}); decoding again in tiles. Pass "
                      "--vae-tiling on to start there", stacklevel=2)
        if lat.is_cuda:
            torch.cuda.empty_cache()
        enable_vae_tiling(pipe.vae)
        return pipe.vae.decode(lat, return_dict=False)[0]


def capture_transformer_inputs(pipe, call_kwargs: dict, step: int) -> dict:
    """The keyword arguments the pipeline passes its transformer at denoising step ``step`` (from 0) of
    ``pipe(**call_kwargs)`` (its ``step``-th transformer call: one per step, as FLUX.1 with distilled guidance
    runs): real latents, timesteps and prompt embeddings, for measuring the transformer alone. The pipeline
    call stops at that call."""
    steps = call_kwargs.get("num_inference_steps")
    if steps is not None and not 0 <= step < steps:
        raise ValueError(f"step {step} is outside the {steps} denoising steps (0 to {steps - 1})")
    captured: dict = {}
    calls = [0]

    class _Captured(Exception):
        pass

    def hook(module, args, kwargs):
        if calls[0] == step:
            captured.update({k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
            raise _Captured
        calls[0] += 1

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(**call_kwargs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"the pipeline called its transformer {calls[0]} times, never at step {step}")
    captured["return_dict"] = False
    return captured


_PER_SAMPLE = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def batch_transformer_inputs(captured: list[dict]) -> dict:
    """Transformer arguments captured one prompt at a time, as one batch: the per-sample tensors concatenated,
    the rest (position ids, flags) the same in all."""
    if not captured:
        raise ValueError("no captured inputs to batch")
    out = dict(captured[0])
    for key in out:
        values = [c.get(key) for c in captured]
        if key in _PER_SAMPLE and isinstance(values[0], torch.Tensor):
            out[key] = torch.cat(values)
        elif not all(_same(v, values[0]) for v in values):
            raise ValueError(f"the captured inputs differ in {key!r}: prompts of different lengths or image sizes "
                             "cannot run as one batch")
    return out


class StepTimer:
    """The time of each denoising step of a pipeline call, as its ``callback_on_step_end``.

    On CUDA an event is recorded on the stream at the start and at the end of every step, so an
    interval is what the GPU spent on that step, idle gaps included; on CPU, the host clock."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list = []

    def start(self) -> None:
        self.marks = [self._mark()]

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        self.marks.append(self._mark())
        return {}

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def step_ms(self) -> list[float]:
        """Milliseconds of each step of the last call, the first one measured from ``start``."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]
