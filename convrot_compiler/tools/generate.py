"""``convrot generate``: text to image through diffusers' FluxPipeline with the convrot-compiled transformer.

With ``--model PATH`` (a local FLUX.1 pipeline folder) it encodes the prompt with the pipeline's text
encoders (moved to the CPU afterwards unless ``--keep-text-encoders``), compiles the transformer,
denoises with a per-step progress bar and decodes with the VAE (in tiles where the whole image does not fit in
GPU memory, or always with ``--vae-tiling on``); with
``--quantized CKPT`` (``convrot quantize``) the transformer comes from that checkpoint instead, never holding
its bf16 weights anywhere. Without
it, a built-in random pipeline runs instead (the FLUX.1-dev transformer config on CUDA, a tiny one on
CPU; random prompt embeddings): its image is noise, its timings are the real model's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..compiler.compile_model import compile as convrot_compile
from ..compiler.compile_model import weight_bytes
from ..config import check_attention_mode
from ..plans import make_plan
from .bench_model import sync
from .cli_options import add_quant_args, doc_summary, quant_overrides
from .demo import resolve_device
from .models import image_tokens_for
from .pipelines import (
    VAE_TILE,
    VAE_TILING,
    StepTimer,
    decode_latents,
    load_pipeline,
    random_pipeline,
    random_prompt_embeds,
)

DEFAULT_PROMPT = "a red fox in fresh snow, morning light"


@dataclass
class GenerateResult:
    model: str
    device: str
    prompt: str
    height: int
    width: int
    steps: int
    plan: str
    attention: str
    out: str
    encode_s: float | None
    prepare_s: float
    first_step_s: float
    step_ms: float | None
    denoise_s: float
    decode_s: float
    vae_tiled: bool
    total_s: float
    peak_gpu_bytes: int | None
    transformer_weight_bytes: int
    noise: bool


def run_generate(model: str | None = None, prompt: str = DEFAULT_PROMPT, steps: int | None = None,
                 guidance: float = 3.5, height: int | None = None, width: int | None = None, seed: int = 0,
                 plan: str | None = None, attention: str = "keep",
                 out: str = os.path.join("convrot-out", "image.png"), device: str = "auto",
                 offload_text_encoders: bool = True, vae_tiling: str = "auto", progress: bool = True,
                 quantized: str | None = None, quant: dict | None = None) -> GenerateResult:
    """``plan``: default w4a4, or the checkpoint's with ``quantized``; ``quant``: more ``compile`` options (the
    rotation, the weight quantizer, a calibration); ``vae_tiling``: ``pipelines.decode_latents``' ``tiling``."""
    if quantized is not None and model is None:
        raise ValueError("--quantized takes the transformer from a checkpoint: pass --model, the pipeline folder "
                         "whose transformer it was quantized from (its text encoders, VAE and scheduler)")
    if plan is not None:
        make_plan(plan)
    check_attention_mode(attention)
    if vae_tiling not in VAE_TILING:
        raise ValueError(f"--vae-tiling {vae_tiling!r}: choose one of {VAE_TILING}")
    dev = resolve_device(device)
    noise = model is None
    config = "flux-dev" if dev.type == "cuda" else "flux-tiny"
    height = height if height is not None else 1024 if not noise or config == "flux-dev" else 64
    width = width if width is not None else height
    image_tokens_for(height, width)  # refuses sizes that are not multiples of 16
    steps = steps if steps is not None else 28 if not noise else 8 if config == "flux-dev" else 4
    if steps < 2:
        raise ValueError(f"--steps must be at least 2 (the first step compiles), got {steps}")
    if not out.lower().endswith(".png"):
        raise ValueError(f"--out {out!r}: give a .png path")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()

    encode_s = None
    if noise:
        pipe = random_pipeline(config, dev, seed)
        embeds = random_prompt_embeds(pipe.transformer, 1, 512 if config == "flux-dev" else 32, dev, seed)[0]
    else:
        transformer = None
        if quantized is not None:
            from ..checkpoint import load
            from ..checkpoint.source import open_source

            transformer = load(quantized, dev, expect_config=open_source(model).config)
        pipe = load_pipeline(model, transformer=transformer)
        t0 = time.perf_counter()
        for name in ("text_encoder", "text_encoder_2"):
            getattr(pipe, name).to(dev)
        with torch.no_grad():
            prompt_embeds, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, device=dev)
        sync(dev)
        encode_s = time.perf_counter() - t0
        if offload_text_encoders:
            for name in ("text_encoder", "text_encoder_2"):
                getattr(pipe, name).to("cpu")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        embeds = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
        pipe.transformer.to(dev)
        pipe.vae.to(dev)
    pipe.set_progress_bar_config(disable=not progress, desc="denoising")

    t0 = time.perf_counter()
    convrot_compile(pipe, attention=attention, progress=progress, **({} if plan is None else {"plan": plan}),
                    **(quant or {}))
    prepare_s = time.perf_counter() - t0

    timer = StepTimer(dev)
    t0 = time.perf_counter()
    timer.start()
    latents = pipe(**embeds, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                   callback_on_step_end=timer).images
    step_ms = timer.step_ms()
    denoise_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    decoded = decode_latents(pipe, latents, height, width, vae_tiling)
    image = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
    decode_s = time.perf_counter() - t0
    image.save(out)
    return GenerateResult(
        model=model or f"built-in random FluxPipeline ({config} transformer, seed {seed})", device=str(dev),
        prompt=prompt if not noise else "(random prompt embeddings)", height=height, width=width, steps=steps,
        plan=pipe.transformer.convrot_checkpoint.plan.name if quantized else plan or "w4a4", attention=attention,
        out=out, encode_s=encode_s, prepare_s=prepare_s,
        first_step_s=step_ms[0] / 1e3, step_ms=statistics.median(step_ms[1:]), denoise_s=denoise_s,
        decode_s=decode_s, vae_tiled=bool(pipe.vae.use_tiling), total_s=time.perf_counter() - start,
        peak_gpu_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        transformer_weight_bytes=weight_bytes(pipe.transformer), noise=noise)


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_generate(r: GenerateResult) -> str:
    from tabulate import tabulate

    rows = [
        ["prompt encoding", "-" if r.encode_s is None else f"{r.encode_s:.2f} s"],
        ["weights prepared (rotate, quantize, pack)", f"{r.prepare_s:.2f} s"],
        ["first step (compile" + (", CUDA-graph capture)" if r.device.startswith("cuda") else ")"),
         f"{r.first_step_s:.2f} s"],
        [f"per step after the first (median of {r.steps - 1})", f"{r.step_ms:.1f} ms"],
        [f"denoising, {r.steps} steps", f"{r.denoise_s:.2f} s"],
        ["VAE decode" + (f" (in tiles of {VAE_TILE} px)" if r.vae_tiled else ""), f"{r.decode_s:.2f} s"],
        ["total", f"{r.total_s:.2f} s"],
        ["peak GPU memory", "-" if r.peak_gpu_bytes is None else format_bytes(r.peak_gpu_bytes)],
        ["transformer weights", format_bytes(r.transformer_weight_bytes)],
    ]
    head = (f"model: {r.model} | device: {r.device} | {r.width}x{r.height}, {r.steps} steps | plan {r.plan}"
            + (", fp8 attention" if r.attention == "fp8" else "") + "\n")
    tail = f"\nimage written to {r.out}"
    if r.noise:
        tail += ("\nthis pipeline has random weights and no text encoders: its image is noise. Pass --model "
                 "with a local FLUX.1 checkpoint for a real image.")
    return head + tabulate(rows, headers=["", ""], tablefmt="github") + tail


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convrot generate", description=doc_summary(__doc__))
    p.add_argument("--model", metavar="PATH", help="local FLUX.1 pipeline folder (default: a built-in random pipeline)")
    p.add_argument("--quantized", metavar="CKPT", help="the transformer from this checkpoint (convrot quantize), with "
                   "--model's text encoders, VAE and scheduler")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--steps", type=int, help="denoising steps (default 28; 8 for the random pipeline, 4 on CPU)")
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--height", type=int, help="pixels (default 1024; 64 for the random pipeline on CPU)")
    p.add_argument("--width", type=int, help="pixels (default: the height)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("convrot-out", "image.png"), help="PNG to write")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--keep-text-encoders", action="store_true",
                   help="keep the text encoders on the GPU after encoding (default: moved to the CPU)")
    p.add_argument("--vae-tiling", nargs="?", const="on", default="auto", choices=VAE_TILING,
                   help="decode in tiles: auto (default) where the whole image runs out of GPU memory, on "
                        "(also the bare flag), off")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.add_argument("--no-progress", action="store_true")
    add_quant_args(p, plan_default=None, calibrated=True)
    return p


def main(argv=None) -> GenerateResult:
    import json

    args = build_parser().parse_args(argv)
    result = run_generate(args.model, args.prompt, args.steps, args.guidance, args.height, args.width, args.seed,
                          args.plan, args.attention, args.out, args.device, not args.keep_text_encoders,
                          args.vae_tiling, not args.no_progress, args.quantized, quant_overrides(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(result), f, indent=2)
    print(format_generate(result))
    return result
