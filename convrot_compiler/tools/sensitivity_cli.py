"""``convrot sensitivity``: each linear's share of a FLUX transformer's output error, ranked, as JSON and as a
plot; with ``--budget``, the plan those numbers buy for a weight budget, written as a plan file.

    convrot sensitivity                                   # the built-in model: flux-tiny on CPU, flux-dev on CUDA
    convrot sensitivity --model /path/to/FLUX.1-dev --height 512 --width 512 --plot sens.png --json sens.json
    convrot sensitivity --budget 0.1 --plan-out plan.json # a tenth of the way from the cheapest plan to bf16
    convrot sensitivity --budget 6.5GiB --plan-out plan.json
"""

from __future__ import annotations

import argparse
import os
import re

import torch

from ..sensitivity import SensitivityReport, budget_plan, plan_bytes, sensitivity
from .cli_options import add_model_args, add_quant_args, write_json
from .demo import DEMO_GATE_BIAS, resolve_device
from .models import build_flux, load_flux, make_flux_inputs

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
    p = argparse.ArgumentParser(prog="convrot sensitivity", description=__doc__.splitlines()[0])
    add_model_args(p, default_size="512; 64 for flux-tiny", default_tokens="512; 16 for flux-tiny")
    add_quant_args(p, attention=False)
    p.add_argument("--top", type=int, default=20, help="rows of the ranked table (default 20)")
    p.add_argument("--json", metavar="FILE", help="write every layer's numbers as JSON")
    p.add_argument("--plot", metavar="PNG", help="draw each layer kind's sensitivity against its block index")
    p.add_argument("--budget", help="with --plan-out: a weight budget for the measured linears, a size (6.5GiB) or "
                   "a fraction of the way from the cheapest plan to bf16 (0.1)")
    p.add_argument("--plan-out", metavar="JSON", help="write the plan --budget buys (a plan file, for --plan-file)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> SensitivityReport:
    from ..plans import save_plan

    args = build_parser().parse_args(argv)
    budget = parse_budget(args.budget) if args.budget is not None else None
    if (budget is None) != (args.plan_out is None):
        raise ValueError("--budget and --plan-out go together: the plan the budget buys is written to --plan-out")
    for path in (args.json, args.plot, args.plan_out):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise FileNotFoundError(f"{path}: its folder does not exist")
    dev = resolve_device(args.device)
    config = args.config if args.config != "auto" else ("flux-dev" if dev.type == "cuda" else "flux-tiny")
    tiny = not args.model and config == "flux-tiny"
    if args.model:
        model, name = load_flux(args.model, device=dev), args.model
    else:
        model = build_flux(config, seed=args.seed, device=dev, gate_bias=DEMO_GATE_BIAS)
        name = f"{config} (random weights, seed {args.seed}, adaLN gates {DEMO_GATE_BIAS})"
    height = args.height or (64 if tiny else 512)
    inputs = make_flux_inputs(model, height, args.width or height, args.text_tokens or (16 if tiny else 512),
                              seed=args.seed, device=dev)
    with torch.no_grad():
        report = sensitivity(model, kwargs=inputs.kwargs, plan=args.plan, group_size=args.group_size,
                             rotation=args.rotation, progress=not args.no_progress)
    print(f"model: {name} | device: {dev} | {inputs.image_tokens} image + {inputs.text_tokens} text tokens")
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
