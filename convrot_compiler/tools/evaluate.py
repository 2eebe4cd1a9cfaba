"""``convrot eval``: does the compiled W4A4 transformer keep a FLUX pipeline's images?

Runs diffusers' ``FluxPipeline`` with the same prompts and seeds twice per plan:
once with the bf16 transformer, once with the transformer compiled by
``convrot_compiler.compile`` (the path users run: the pipeline calls the compiled
module as its transformer), and compares the image pairs: PSNR, SSIM, and LPIPS
where the ``lpips`` package and its weights load offline. It also reports the
median time of a denoising step, and two measures of the transformer alone that do not compound through
its blocks as image differences do (sensitivity/layerwise.py): the error after the first 1, 2 and 4
blocks, and each quantized linear's SQNR, both on the transformer's real inputs at the middle denoising step
of the first prompt. Images and a side-by-side grid (rows: prompts; columns: bf16, then each
plan) are written as PNG.

By default it builds a tiny randomly initialised pipeline (flux-tiny transformer,
a two-level VAE, no text encoders: seeded prompt embeddings are passed directly),
so it runs anywhere in seconds; ``--model PATH`` takes a local FLUX.1-dev folder and
``--prompts FILE`` one prompt per line.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..compiler.compile_model import compile as convrot_compile
from ..plans import make_plan
from ..sensitivity.layerwise import layerwise
from .cli_options import doc_summary
from .demo import resolve_device
from .models import image_tokens_for
from .pipelines import StepTimer, capture_transformer_inputs, load_pipeline, random_pipeline, random_prompt_embeds

DEFAULT_PROMPTS = ["a red fox in fresh snow, morning light", "a lighthouse on a cliff at dusk, oil painting",
                   "a bowl of ramen, top view, studio photo"]


# ---- metrics on images as float tensors [3, H, W] in [0, 1] ----

def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1]; inf for identical images."""
    mse = F.mse_loss(a.double(), b.double()).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) over channels."""
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"ssim takes two [C, H, W] images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    window = min(window, a.shape[-1], a.shape[-2])
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(a.shape[0], 1, window, window)
    x, y = a.double()[None], b.double()[None]

    def blur(t):
        return F.conv2d(t, kernel, groups=a.shape[0])

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean().item()


def lpips_metric():
    """An LPIPS callable on [3, H, W] images in [0, 1], or (None, why) when it cannot load offline."""
    try:
        import lpips  # type: ignore

        net = lpips.LPIPS(net="alex", verbose=False)
    except Exception as e:  # not installed, or its backbone weights would need a download
        return None, f"LPIPS not computed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"

    def score(a: torch.Tensor, b: torch.Tensor) -> float:
        with torch.no_grad():
            return net(a[None].float() * 2 - 1, b[None].float() * 2 - 1).item()

    return score, ""


# ---- images through the pipeline ----

def make_images(pipe, inputs: list[dict], size: int, steps: int, seed: int,
                timer: StepTimer | None = None) -> tuple[list[torch.Tensor], list[float]]:
    """One image per prompt input, each from its own seeded generator: float [3, H, W] in [0, 1]; and the
    milliseconds of each denoising step after each call's first."""
    images, step_ms = [], []
    for i, kw in enumerate(inputs):
        g = torch.Generator(device="cpu").manual_seed(seed + i)
        if timer:
            timer.start()
        out = pipe(**kw, height=size, width=size, num_inference_steps=steps, guidance_scale=3.5, generator=g,
                   output_type="pt", callback_on_step_end=timer)
        images.append(out.images[0].float().cpu().clamp(0, 1))
        if timer:
            step_ms += timer.step_ms()[1:]
    return images, step_ms


# ---- the evaluation ----

@dataclass
class EvalRow:
    plan: str
    psnr_mean: float
    psnr_min: float
    ssim_mean: float
    ssim_min: float
    lpips_mean: float | None
    seconds: float
    ms_per_step: float | None = None  # median over the steps after each call's first
    per_image: list[dict] = field(default_factory=list)
    depth_errors: dict[int, float] = field(default_factory=dict)   # K -> error after the first K blocks
    sqnr_db: dict[str, dict[str, float]] = field(default_factory=dict)  # layer kind -> SQNR min/median/max


def compare(ref: list[torch.Tensor], test: list[torch.Tensor], lpips_fn=None) -> dict:
    p = [psnr(a, b) for a, b in zip(ref, test)]
    s = [ssim(a, b) for a, b in zip(ref, test)]
    lp = [lpips_fn(a, b) for a, b in zip(ref, test)] if lpips_fn else None
    return {"psnr": p, "ssim": s, "lpips": lp}


def save_images(images: dict[str, list[torch.Tensor]], out_dir: str) -> list[str]:
    """Each image as PNG, plus grid.png: one row per prompt, one column per variant."""
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    written = []

    def to_pil(t):
        return Image.fromarray((t.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))

    for name, imgs in images.items():
        for i, t in enumerate(imgs):
            path = os.path.join(out_dir, f"{name}_{i}.png")
            to_pil(t).save(path)
            written.append(path)
    cols = list(images)
    rows = len(images[cols[0]])
    h, w = images[cols[0]][0].shape[1:]
    grid = Image.new("RGB", (w * len(cols), h * rows), "white")
    for c, name in enumerate(cols):
        for r, t in enumerate(images[name]):
            grid.paste(to_pil(t), (c * w, r * h))
    path = os.path.join(out_dir, "grid.png")
    grid.save(path)
    written.append(path)
    return written


def run_eval(model_path: str | None = None, plans: tuple[str, ...] = ("w4a4", "mix"), prompts: list[str] | None = None,
             size: int | None = None, steps: int | None = None, seed: int = 0, device: str = "auto",
             out_dir: str = os.path.join("convrot-out", "eval"), progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    for plan in plans:
        make_plan(plan)  # bad arguments fail before any image is made
    if size is not None:
        image_tokens_for(size, size)
    if steps is not None and steps < 2:
        raise ValueError(f"--steps must be at least 2 (the time per step is taken after each call's first), got {steps}")
    dev = resolve_device(device)
    tiny = model_path is None
    pipe = random_pipeline("flux-tiny", dev, seed) if tiny else load_pipeline(model_path).to(dev)
    pipe.set_progress_bar_config(disable=True)
    prompts = prompts or DEFAULT_PROMPTS
    size = size if size is not None else 64 if tiny else 1024
    steps = steps if steps is not None else 4 if tiny else 28
    inputs = (random_prompt_embeds(pipe.transformer, len(prompts), 32, dev, seed) if tiny
              else [{"prompt": p} for p in prompts])
    lpips_fn, lpips_note = lpips_metric()
    timer = StepTimer(dev)

    bf16_transformer = pipe.transformer
    images = {"bf16": make_images(pipe, inputs, size, steps, seed)[0]}
    measured = capture_transformer_inputs(pipe, dict(**inputs[0], height=size, width=size, num_inference_steps=steps,
                                                     guidance_scale=3.5, generator=torch.Generator().manual_seed(seed)),
                                          step=steps // 2)
    rows = []
    t0 = time.perf_counter()
    ref_again, step_ms = make_images(pipe, inputs, size, steps, seed, timer)  # the metrics' own floor
    rows.append(_row("bf16 (again)", compare(images["bf16"], ref_again, lpips_fn), time.perf_counter() - t0, step_ms))
    for plan in tqdm(plans, desc="plans", disable=not progress):
        torch._dynamo.reset()
        layers = layerwise(bf16_transformer, kwargs=measured, plan=plan)
        t0 = time.perf_counter()
        pipe.transformer = convrot_compile(copy.deepcopy(bf16_transformer), plan=plan, progress=False)
        make_images(pipe, inputs[:1], size, steps, seed)  # compiles (and captures CUDA graphs) outside the timing
        images[plan], step_ms = make_images(pipe, inputs, size, steps, seed, timer)
        rows.append(_row(plan, compare(images["bf16"], images[plan], lpips_fn), time.perf_counter() - t0, step_ms,
                         layers.depth_errors, layers.sqnr_by_kind()))
        pipe.transformer = bf16_transformer
    torch._dynamo.reset()
    written = save_images(images, out_dir)
    result = {"model": model_path or "tiny random FluxPipeline (flux-tiny transformer)", "device": str(dev),
              "size": size, "steps": steps, "seed": seed,
              "measured_step": steps // 2, "prompts": prompts, "lpips": lpips_note or "computed",
              "rows": [asdict(r) for r in rows], "images": written}
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    return result


def _row(plan: str, m: dict, seconds: float, step_ms: list[float], depth_errors: dict | None = None,
         sqnr_db: dict | None = None) -> EvalRow:
    lp = m["lpips"]
    return EvalRow(plan, sum(m["psnr"]) / len(m["psnr"]), min(m["psnr"]), sum(m["ssim"]) / len(m["ssim"]),
                   min(m["ssim"]), sum(lp) / len(lp) if lp else None, seconds,
                   statistics.median(step_ms) if step_ms else None,
                   [{"psnr": p, "ssim": s} for p, s in zip(m["psnr"], m["ssim"])], depth_errors or {}, sqnr_db or {})


def _sqnr_summary(sqnr_db: dict) -> tuple[str, str]:
    """(the lowest SQNR of any layer, the median of the kinds' medians), in dB."""
    if not sqnr_db:
        return "-", "-"
    return (f"{min(s['min'] for s in sqnr_db.values()):.1f}",
            f"{statistics.median(s['median'] for s in sqnr_db.values()):.1f}")


def format_eval(result: dict) -> str:
    from tabulate import tabulate

    depth_errors = [{int(k): e for k, e in r.get("depth_errors", {}).items()} for r in result["rows"]]  # JSON: str keys
    depths = sorted({k for errors in depth_errors for k in errors})
    table = tabulate([[r["plan"], f"{r['psnr_mean']:.2f}", f"{r['psnr_min']:.2f}", f"{r['ssim_mean']:.4f}",
                       f"{r['ssim_min']:.4f}", "-" if r["lpips_mean"] is None else f"{r['lpips_mean']:.4f}",
                       *(f"{errors[k]:.4f}" if k in errors else "-" for k in depths),
                       *_sqnr_summary(r.get("sqnr_db", {})),
                       f"{r['seconds']:.1f}", "-" if r.get("ms_per_step") is None else f"{r['ms_per_step']:.1f}"]
                      for r, errors in zip(result["rows"], depth_errors)],
                     headers=["vs bf16 images", "PSNR dB mean", "PSNR min", "SSIM mean", "SSIM min", "LPIPS",
                              *(f"err after {k} blk" for k in depths), "SQNR dB min", "SQNR median", "s",
                              "ms per step"],
                     tablefmt="github")
    return (f"model: {result['model']} | device: {result['device']} | {result['size']}x{result['size']}, "
            f"{result['steps']} steps, {len(result['prompts'])} prompts, seed {result['seed']}\n{table}\n"
            f"{result['lpips']}\nimages and grid: {os.path.dirname(result['images'][-1])}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="convrot eval", description=doc_summary(__doc__))
    p.add_argument("--model", help="local FLUX.1-dev pipeline folder (default: a tiny random pipeline)")
    p.add_argument("--plans", default="w4a4,mix", help="comma-separated convrot plans")
    p.add_argument("--prompts", help="text file, one prompt per line")
    p.add_argument("--size", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=os.path.join("convrot-out", "eval"), help="folder for images, grid.png and "
                   "eval.json (default: ./convrot-out/eval)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    prompts = None
    if args.prompts:
        if not os.path.isfile(args.prompts):
            raise FileNotFoundError(f"--prompts {args.prompts}: no such file (give a text file, one prompt per line)")
        with open(args.prompts) as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise SystemExit(f"--prompts {args.prompts}: no prompts in the file")
    result = run_eval(args.model, tuple(x for x in args.plans.split(",") if x), prompts, args.size, args.steps,
                      args.seed, args.device, args.out, not args.no_progress)
    print(format_eval(result))
    return result
