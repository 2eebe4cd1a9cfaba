"""``convrot sensitivity``: each linear's share of a FLUX transformer's output error, ranked, as JSON and as a
plot; with ``--budget``, the plan those numbers buy for a weight budget, written as a plan file.

    convrot sensitivity                                   # the built-in model: flux-tiny on CPU, flux-dev on CUDA
    convrot sensitivity --model /path/to/FLUX.1-dev --height 512 --width 512 --plot sens.png --json sens.json
    convrot sensitivity --model /path/to/FLUX.1-dev --prompt "a red fox in snow" --prompt "a lighthouse"  # real latents
    convrot sensitivity --budget 0.1 --plan-out plan.json # a tenth of the way from the cheapest plan to bf16
    convrot sensitivity --budget 6.5GiB --plan-out plan.json
"""

from __future__ import annotations

import argparse
import os
import re

import torch

from ..sensitivity import SensitivityReport, budget_plan, plan_bytes, sensitivity
from .cli_options import add_model_args, add_quant_args, doc_summary, write_json
from .demo import DEMO_GATE_BIAS, resolve_device
from .models import build_flux, load_flux, make_flux_inputs
from .pipelines import batch_transformer_inputs, capture_transformer_inputs, load_pipeline

_SIZE = re.compile(r"^\s*([0-9.]+)\s*(GiB|MiB|KiB|B)?\s*$", re.IGNORECASE)
_UNITS = {"gib": 2**30, "mib": 2**20, "kib": 2**10, "b": 1}


def parse_budget(text: str) -> float:
    """``6.5GiB`` / ``800MiB`` (bytes), or a fraction in [0, 1] (of the way from the cheapest plan to bf16)."""
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"--budget {text!r}: give a size (6.5GiB, 800MiB) or a fraction between 0 and 1")
    value = float(m.group(1))
    if m.group(2) is None:
        if not 0 <= value <= 1:
            raise ValueError(f"--budget {text!r}: a bare number is a fraction between 0 and 1; give sizes with a unit")
        return value
    return value * _UNITS[m.group(2).lower()]


def plot(report: SensitivityReport, path: str) -> None:
    """Each layer kind's error saved in float against its block index, one line per kind."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot draws with matplotlib: pip install 'convrot-compiler[plot]'") from None
    kinds: dict[str, list[tuple[int, float]]] = {}
    for layer in report.layers:
        if layer.block is not None:
            kinds.setdefault(layer.kind, []).append((layer.block, layer.plan_gain))
    fig, ax = plt.subplots(figsize=(11, 6))
    for kind, points in sorted(kinds.items(), key=lambda kv: -max(g for _, g in kv[1])):
        points.sort()
        ax.plot([b for b, _ in points], [g for _, g in points], marker="o", markersize=3, label=kind)
    ax.set_xlabel("block index")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("output error saved with this linear alone in float")
    ax.set_title(f"per-layer sensitivity under plan {report.plan!r} (output error {report.plan_error:.4f})")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convrot sensitivity", description=doc_summary(__doc__))
    add_model_args(p, default_size="512; 64 for flux-tiny", default_tokens="512; 16 for flux-tiny")
    add_quant_args(p, attention=False)
    p.add_argument("--prompt", action="append", help="with --model (a pipeline folder): measure on the transformer's "
                   "real inputs at --step of this prompt's denoising; repeat for a batch of prompts")
    p.add_argument("--steps", type=int, default=28, help="with --prompt: the pipeline's denoising steps (default 28)")
    p.add_argument("--step", type=int, help="with --prompt: the step whose inputs are measured (default: the middle)")
    p.add_argument("--top", type=int, default=20, help="rows of the ranked table (default 20)")
    p.add_argument("--json", metavar="FILE", help="write every layer's numbers as JSON")
    p.add_argument("--plot", metavar="PNG", help="draw each layer kind's sensitivity against its block index")
    p.add_argument("--budget", help="with --plan-out: a weight budget for the measured linears, a size (6.5GiB) or "
                   "a fraction of the way from the cheapest plan to bf16 (0.1)")
    p.add_argument("--plan-out", metavar="JSON", help="write the plan --budget buys (a plan file, for --plan-file)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _pipeline_inputs(args, dev: torch.device, height: int, width: int):
    """(transformer, its inputs at --step of each --prompt batched, model name, a line on the inputs)."""
    step = args.steps // 2 if args.step is None else args.step
    pipe = load_pipeline(args.model).to(dev)
    pipe.set_progress_bar_config(disable=True)
    captured = [capture_transformer_inputs(pipe, dict(prompt=prompt, height=height, width=width,
                                                      num_inference_steps=args.steps, guidance_scale=3.5,
                                                      generator=torch.Generator().manual_seed(args.seed + i)), step)
                for i, prompt in enumerate(args.prompt)]
    kwargs = batch_transformer_inputs(captured)
    where = (f"pipeline inputs at step {step} of {args.steps}, {len(args.prompt)} prompt(s), "
             f"{kwargs['hidden_states'].shape[1]} image + {kwargs['encoder_hidden_states'].shape[1]} text tokens")
    return pipe.transformer, kwargs, args.model, where


def main(argv=None) -> SensitivityReport:
    from ..plans import save_plan

    args = build_parser().parse_args(argv)
    budget = parse_budget(args.budget) if args.budget is not None else None
    if (budget is None) != (args.plan_out is None):
        raise ValueError("--budget and --plan-out go together: the plan the budget buys is written to --plan-out")
    for path in (args.json, args.plot, args.plan_out):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise FileNotFoundError(f"{path}: its folder does not exist")
    if args.prompt and not args.model:
        raise ValueError("--prompt takes the transformer's inputs from a pipeline: give --model, a local FLUX.1 "
                         "pipeline folder (without it, the built-in random inputs are used)")
    dev = resolve_device(args.device)
    config = args.config if args.config != "auto" else ("flux-dev" if dev.type == "cuda" else "flux-tiny")
    tiny = not args.model and config == "flux-tiny"
    height = args.height or (64 if tiny else 512)
    if args.prompt:
        model, kwargs, name, where = _pipeline_inputs(args, dev, height, args.width or height)
    else:
        if args.model:
            model, name = load_flux(args.model, device=dev), args.model
        else:
            model = build_flux(config, seed=args.seed, device=dev, gate_bias=DEMO_GATE_BIAS)
            name = f"{config} (random weights, seed {args.seed}, adaLN gates {DEMO_GATE_BIAS})"
        inputs = make_flux_inputs(model, height, args.width or height, args.text_tokens or (16 if tiny else 512),
                                  seed=args.seed, device=dev)
        kwargs = inputs.kwargs
        where = f"random inputs, {inputs.image_tokens} image + {inputs.text_tokens} text tokens"
    with torch.no_grad():
        report = sensitivity(model, kwargs=kwargs, plan=args.plan, group_size=args.group_size,
                             rotation=args.rotation, progress=not args.no_progress)
    print(f"model: {name} | device: {dev} | {where}")
    print(report.table(args.top))
    print(report.summary())
    if args.json:
        write_json(args.json, report.to_json())
    if args.plot:
        plot(report, args.plot)
        print(f"plot written to {args.plot}")
    if budget is not None:
        plan, chosen = budget_plan(report, budget)
        save_plan(plan, args.plan_out)
        counts = {p: sum(v == p for v in chosen.values()) for p in sorted(set(chosen.values()))}
        print(f"plan for a budget of {plan_bytes(report, chosen) / 2**20:.1f} MiB of measured linear weights: "
              + ", ".join(f"{n} {p}" for p, n in counts.items()) + f"; written to {args.plan_out}")
    return report
