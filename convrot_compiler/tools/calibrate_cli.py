"""``convrot calibrate``: run a FLUX pipeline's real denoising with its transformer hooked, and save the second
moment of every quantized linear's input (calibration.py), for DiRotQ (``rotation="pca"``) and GPTQ weights.

    convrot calibrate --out flux.cal.safetensors                      # a tiny random pipeline, nothing downloaded
    convrot calibrate --model /path/to/FLUX.1-dev --prompts prompts.txt --steps 25 --out flux.cal.safetensors
    convrot generate --model /path/to/FLUX.1-dev --rotation pca --weights gptq --calibration flux.cal.safetensors
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from ..calibration import Calibrator
from ..plans import PRESETS
from .cli_options import doc_summary
from .demo import resolve_device
from .evaluate import DEFAULT_PROMPTS
from .pipelines import load_pipeline, random_pipeline, random_prompt_embeds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convrot calibrate", description=doc_summary(__doc__))
    p.add_argument("--model", metavar="PATH", help="local FLUX.1 pipeline folder (default: a tiny random pipeline)")
    p.add_argument("--prompts", metavar="FILE", help="text file, one prompt per line (default: three built-in ones)")
    p.add_argument("--steps", type=int, help="denoising steps per prompt (default 25; 4 for the tiny pipeline)")
    p.add_argument("--size", type=int, help="image height and width (default 1024; 64 for the tiny pipeline)")
    p.add_argument("--plan", default="w4a4", help="the plan whose activation-quantized linears are calibrated "
                   f"({', '.join(sorted(PRESETS))}, or a plan file; default w4a4)")
    p.add_argument("--block", type=int, help="the widest input kept as one second moment; wider ones in diagonal "
                   "blocks of at most this many channels (default 3072)")
    p.add_argument("--out", required=True, metavar="FILE", help="the calibration file to write (.safetensors)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def _prompts(path: str | None) -> list[str]:
    if path is None:
        return DEFAULT_PROMPTS
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts {path}: no such file (give a text file, one prompt per line)")
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts in the file")
    return prompts


def main(argv=None) -> dict:
    from tabulate import tabulate
    from tqdm.auto import tqdm

    args = build_parser().parse_args(argv)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"--out {args.out}: its folder does not exist")
    prompts = _prompts(args.prompts)
    dev = resolve_device(args.device)
    tiny = args.model is None
    pipe = random_pipeline("flux-tiny", dev, args.seed) if tiny else load_pipeline(args.model).to(dev)
    pipe.set_progress_bar_config(disable=True)
    steps = args.steps if args.steps is not None else 4 if tiny else 25
    size = args.size if args.size is not None else 64 if tiny else 1024
    calls = (random_prompt_embeds(pipe.transformer, len(prompts), 32, dev, args.seed) if tiny
             else [{"prompt": p} for p in prompts])
    start = time.perf_counter()
    calibrator = Calibrator(pipe.transformer, args.plan, block=args.block)
    if not args.no_progress:
        print(f"second moments: at most {calibrator.estimated_bytes() / 2**20:.0f} MiB (float32, on {dev})")
    with calibrator as cal:
        for i, call in enumerate(tqdm(calls, desc="calibration prompts", unit="prompt", disable=args.no_progress)):
            pipe(**call, height=size, width=size, num_inference_steps=steps, guidance_scale=3.5,
                 generator=torch.Generator().manual_seed(args.seed + i), output_type="latent")
    seconds = time.perf_counter() - start
    unshared = calibrator.estimated_bytes()
    cal.save(args.out)
    rows = [["model", args.model or "tiny random FluxPipeline (flux-tiny transformer)"],
            ["prompts x steps", f"{len(prompts)} x {steps} at {size}x{size}"],
            ["linears calibrated", f"{len(cal.layers)} (plan {args.plan}), reading {len(cal.moments)} distinct inputs"],
            ["tokens per input", f"{min(cal.tokens.values())} to {max(cal.tokens.values())}"],
            ["second moments", f"{cal.nbytes() / 2**20:.1f} MiB (float32; {unshared / 2**20:.0f} MiB without sharing)"],
            ["time", f"{seconds:.1f} s"], ["written", args.out]]
    print(tabulate(rows, tablefmt="github"))
    return {"layers": len(cal.layers), "inputs": len(cal.moments), "seconds": seconds, "path": args.out}
