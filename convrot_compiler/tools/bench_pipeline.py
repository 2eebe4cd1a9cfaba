"""Pipeline benchmark (``convrot bench --pipeline``): milliseconds per denoising step through diffusers'
FluxPipeline, each variant's transformer in one pipeline, in one process.

Per variant: ms per step (CUDA events at each step's end, the steps after each call's first), the same
transformer's bare forward on inputs of the pipeline's shapes (the model benchmark's measure) and the
ratio of the two, first-call time, peak GPU memory from building the transformer to the first image,
weight memory, the memory its CUDA graphs hold, the final latents' error against bf16 eager, and
whether a replayed forward equals the same forward launched kernel by kernel. The VAE decode is
timed once, apart. ``bf16-compile`` and ``fp8`` (torchao, regional compile) are each measured plain,
then replayed as CUDA graphs on the same compile (``-cg``), their strongest form; run ``fp8`` last:
torchao's ``quantize_`` slows every later compile in the process.

    convrot bench --pipeline --variants bf16,w4a4,w4a4-fp8attn,mix,bf16-compile,fp8
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import time
import traceback
from typing import Callable, Iterator

import torch

from ..calibration import Calibrator
from ..compiler.compile_model import CompiledForward, weight_bytes
from ..compiler.compile_model import compile as convrot_compile
from ..compiler.cudagraphs import CUDAGraphReplay
from ..numerics.pca import needs_calibration
from .bench_model import LAUNCHES, environment, parse_variants, sync, time_forward, write_results
from .cli_options import doc_summary
from .demo import resolve_device
from .models import build_flux, image_tokens_for, relative_error
from .pipelines import StepTimer, decode_latents, random_pipeline, random_prompt_embeds

PIPELINE_VARIANTS = ("bf16", "bf16-compile", "w4a4", "w4a4-fp8attn", "mix", "mix-fp8attn", "w8a8", "w4a4-whole",
                     "w4a4-gptq", "w4a4-dirotq", "fp8")


def setups(variant: str, model, calibrate_on: Callable[[], object] | None = None) -> Iterator[tuple[str, str]]:
    """Set ``model`` up for each row ``variant`` measures, yielding (row name, note) once it is ready. The
    calibrated variants (``-gptq``, ``-dirotq``) calibrate while ``calibrate_on()`` runs the pipeline once."""
    if variant == "bf16":
        yield "bf16", "eager"
    elif variant == "bf16-compile":
        compiled = torch.compile(model.forward)
        model.forward = compiled
        yield "bf16-compile", "torch.compile of the whole forward"
        if not _on_cuda(model):
            return
        model.forward = CUDAGraphReplay(compiled)
        yield "bf16-compile-cg", "torch.compile of the whole forward, replayed as CUDA graphs"
    elif variant == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        model.compile_repeated_blocks()
        yield "fp8", "torchao fp8 row-wise dynamic, compile_repeated_blocks"
        if not _on_cuda(model):
            return
        model.forward = CUDAGraphReplay(model.forward)
        yield "fp8-cg", "torchao fp8 row-wise dynamic, compile_repeated_blocks, replayed as CUDA graphs"
    else:
        plan, _, launch = variant.partition("-")
        options, note = LAUNCHES[launch] if launch else ({}, "")
        if needs_calibration(options.get("rotation"), options.get("weights")):
            if calibrate_on is None:
                raise ValueError(f"variant {variant!r} calibrates on a pipeline call: pass calibrate_on")
            with Calibrator(model, plan=plan) as calibration, torch.no_grad():
                calibrate_on()
            options = {**options, "calibration": calibration}
            note = f"{note}; calibrated on one call of the measured pipeline"
            del calibration  # the rows are timed while this generator waits: its frame must not pin the moments
        convrot_compile(model, plan=plan, progress=False, **options)
        options = None
        replay = model.forward.replay is not None
        yield variant, "; ".join(x for x in ("convrot_compiler.compile" + (", CUDA-graph replay" if replay else ""),
                                             note) if x)


def _on_cuda(model) -> bool:
    return next(model.parameters()).is_cuda


def pipeline_kwargs(pipe, call: dict) -> dict:
    """The keyword arguments the pipeline passes its transformer in one step (cloned), from one call."""
    seen: dict = {}

    def grab(module, args, kwargs):
        if not seen:
            seen.update({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipe(**{**call, "num_inference_steps": 1})
    finally:
        handle.remove()
    return seen


def _replay_check(model, kwargs: dict) -> bool | None:
    """Whether the replayed forward equals the same compiled forward launched kernel by kernel."""
    fwd = model.__dict__.get("forward")
    inner = fwd.inner if isinstance(fwd, CompiledForward) and fwd.replay else (
        fwd.fn if isinstance(fwd, CUDAGraphReplay) else None)
    if inner is None:
        return None
    with torch.no_grad():
        return bool(torch.equal(model(**kwargs)[0], inner(**kwargs)[0]))


def _graph_bytes(model) -> int | None:
    fwd = model.__dict__.get("forward")
    replay = fwd.replay if isinstance(fwd, CompiledForward) else fwd if isinstance(fwd, CUDAGraphReplay) else None
    return None if replay is None else sum(g["pool_bytes"] + g["static_bytes"] for g in replay.memory())


def run(args) -> dict:
    dev = resolve_device(args.device)
    if args.config == "auto":  # the FLUX.1-dev config takes 22 GiB per copy: a GPU's size
        args.config = "flux-dev" if dev.type == "cuda" else "flux-tiny"
    variants = parse_variants(args.variants, PIPELINE_VARIANTS)
    res = args.resolution[0]
    image_tokens_for(res, res)
    placeholder = build_flux(args.config, device="meta")  # holds the pipeline's place between variants
    pipe = random_pipeline(args.config, dev, transformer=placeholder)
    pipe.set_progress_bar_config(disable=True)
    embeds = random_prompt_embeds(pipe.transformer, 1, args.text_tokens, dev)[0]
    call = dict(**embeds, height=res, width=res, num_inference_steps=args.steps, guidance_scale=3.5,
                output_type="latent")
    rows, ref_latents, latents = [], None, None
    for variant in variants:
        torch._dynamo.reset()
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        model = build_flux(args.config, seed=0, device=dev)
        pipe.transformer = model
        kwargs = pipeline_kwargs(pipe, call)
        try:
            calibrate_on = functools.partial(pipe, **call, generator=torch.Generator("cpu").manual_seed(1))
            for name, note in setups(variant, model, calibrate_on):
                print(f"[{name}] first pipeline call ...", flush=True)
                row = {"variant": name, "resolution": res, "steps": args.steps, "note": note}
                latents = pipe(**call, generator=torch.Generator("cpu").manual_seed(0)).images
                sync(dev)
                row["first_call_s"] = time.perf_counter() - t0
                timer, step_ms, call_s = StepTimer(dev), [], []
                for _ in range(args.iters):
                    t1 = time.perf_counter()
                    timer.start()
                    latents = pipe(**call, generator=torch.Generator("cpu").manual_seed(0),
                                   callback_on_step_end=timer).images
                    step_ms += timer.step_ms()[1:]
                    call_s.append(time.perf_counter() - t1)
                if ref_latents is None and name == "bf16":
                    ref_latents = latents.float()
                forward_ms = statistics.median(time_forward(model, kwargs, dev, args.iters * 2))
                row.update(ms_per_step=statistics.median(step_ms), step_spread=max(step_ms) - min(step_ms),
                           ms_per_call=statistics.median(call_s) * 1e3, ms_per_forward=forward_ms,
                           step_over_forward=statistics.median(step_ms) / forward_ms,
                           replay_equals_launch=_replay_check(model, kwargs), graph_bytes=_graph_bytes(model),
                           weight_bytes=weight_bytes(model),
                           peak_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
                           latent_err_vs_bf16=None if ref_latents is None else relative_error(latents, ref_latents))
                rows.append(row)
                print(row, flush=True)
                _save(args, dev, rows, None)
                t0 = time.perf_counter()
        except (RuntimeError, ValueError, ImportError) as e:  # torchao missing, a plan that cannot compile here
            traceback.print_exc()
            rows.append({"variant": variant, "resolution": res, "steps": args.steps, "ms_per_step": None,
                         "note": f"skipped: {e}".splitlines()[0][:160]})
        pipe.transformer = placeholder
        del model
    decode_ms = _decode_ms(pipe, latents, res, dev) if latents is not None else None
    return _save(args, dev, rows, decode_ms)


def _decode_ms(pipe, latents, res: int, dev: torch.device) -> float:
    decode_latents(pipe, latents, res, res)  # warm-up
    sync(dev)
    t = time.perf_counter()
    decode_latents(pipe, latents, res, res)
    sync(dev)
    return (time.perf_counter() - t) * 1e3


def _save(args, dev, rows: list[dict], decode_ms: float | None) -> dict:
    timed = {r["variant"]: r for r in rows if r.get("ms_per_step")}
    for r in timed.values():
        for base in ("bf16", "bf16-compile", "bf16-compile-cg", "fp8", "fp8-cg"):
            if base in timed:
                r[f"speedup_vs_{base}"] = timed[base]["ms_per_step"] / r["ms_per_step"]
    result = {"env": environment(), "config": args.config, "device": str(dev), "steps": args.steps,
              "text_tokens": args.text_tokens, "vae_decode_ms": decode_ms, "rows": rows}
    write_results(args.name, result, to_markdown(result), args.out)
    return result


def to_markdown(result: dict) -> str:
    from tabulate import tabulate

    gib, mib = 2**30, 2**20
    env = result["env"]

    def num(r, key, fmt):
        return fmt.format(r[key]) if r.get(key) is not None else "-"

    table = tabulate(
        [[r["variant"], num(r, "ms_per_step", "{:.1f}"), num(r, "step_spread", "{:.1f}"),
          num(r, "ms_per_forward", "{:.1f}"), num(r, "step_over_forward", "{:.3f}"),
          *(num(r, f"speedup_vs_{b}", "{:.2f}") for b in ("bf16", "bf16-compile", "bf16-compile-cg", "fp8-cg")),
          num(r, "first_call_s", "{:.0f}"), "-" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / gib:.1f}",
          "-" if r.get("weight_bytes") is None else f"{r['weight_bytes'] / gib:.2f}",
          "-" if r.get("graph_bytes") is None else f"{r['graph_bytes'] / mib:,.0f}",
          num(r, "latent_err_vs_bf16", "{:.3f}"),
          "-" if r.get("replay_equals_launch") is None else ("yes" if r["replay_equals_launch"] else "NO"),
          r.get("note", "")] for r in result["rows"]],
        headers=["variant", "ms/step", "spread", "ms/forward", "step/forward", "x bf16", "x bf16-compile",
                 "x bf16-compile-cg", "x fp8-cg", "first call s", "peak GiB", "weights GiB", "graphs MiB",
                 "latent err vs bf16", "replay == launch", "note"], tablefmt="github")
    decode = result.get("vae_decode_ms")
    return (f"# Pipeline benchmark: FluxPipeline, {result['config']} transformer (random weights), "
            f"{result['steps']} steps\n\n"
            f"GPU {env.get('gpu')} | torch {env['torch']} | triton {env['triton']} | diffusers {env['diffusers']} | "
            f"{env['date']}\n\n{table}\n\n"
            "ms/step: median over the steps after each pipeline call's first, CUDA events at each step's end "
            "(scheduler step, input copies and idle gaps included). ms/forward: the same transformer called "
            "alone on inputs of the pipeline's shapes. Prompt embeddings are passed in (no text encoders); "
            + (f"the VAE decode took {decode:.1f} ms, once per image. " if decode else "")
            + "Latent error on random weights compounds chaotically: a sanity check, not fidelity.\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="convrot bench --pipeline", description=doc_summary(__doc__))
    p.add_argument("--config", default="auto", help="a built-in config (auto: flux-dev on CUDA, flux-tiny elsewhere)")
    p.add_argument("--resolution", type=int, nargs=1, default=[1024])
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--iters", type=int, default=2, help="timed pipeline calls per variant")
    p.add_argument("--variants", default="bf16,w4a4,w4a4-fp8attn,mix,bf16-compile",
                   help=f"comma-separated, from {', '.join(PIPELINE_VARIANTS)}; bf16 first gives the latents' "
                        "reference, fp8 (torchao) last")
    p.add_argument("--device", default="auto")
    p.add_argument("--name", default="pipeline")
    p.add_argument("--out", help="result folder (default $OUT if set, else ./convrot-out/bench)")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2: the first step of each call is not timed")
    if args.iters < 1:
        p.error(f"--iters must be at least 1, got {args.iters}")
    result = run(args)
    print(to_markdown(result))
    return result
