"""Plan benchmark (CPU): what each preset's modulation precision costs in output error, and what the automatic
plan buys at a preset's weight bytes, on small FLUX-architecture models with random weights.

Models: flux-tiny (hidden 256, 2 double + 2 single blocks) in three weight regimes: N(0, 0.05) with the
random init's adaLN gates (near 0), the demo's N(0, 0.02) with gates 0.5, and N(0, 0.05) with gates 0.5; two
seeds each; 128x128 images (64 image + 16 text tokens). The error is ||out - ref|| / ||ref|| over the
output, ref the bf16 model; the eager quantized modules compute what the compiled graphs do. For the
automatic plan, each model's sensitivities are measured (convrot_compiler.sensitivity) and the plan for the
mix preset's bytes is built from them (budget_plan), then applied and measured like the presets.

    python benchmarks/plans.py [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from convrot_compiler.nn import quantize_model
from convrot_compiler.plans import _EMBEDDERS, _MIX, _skinny, decide_linears
from convrot_compiler.sensitivity import budget_plan, plan_bytes, sensitivity
from convrot_compiler.tools.bench_model import environment, write_results
from convrot_compiler.tools.models import build_flux, make_flux_inputs, relative_error

REGIMES = {"std 0.05, gates ~0": dict(std=0.05), "std 0.02, gates 0.5 (demo)": dict(gate_bias=0.5),
           "std 0.05, gates 0.5": dict(std=0.05, gate_bias=0.5)}
VARIANTS = {
    "modulation alone, int4 (w4a16)": _skinny("w4a16") + [("*", "bf16")],
    "modulation alone, int8 (w8a16)": _skinny("w8a16") + [("*", "bf16")],
    "w8a8, modulation int4": _EMBEDDERS + _skinny("w4a16") + [("*", "w8a8")],
    "w8a8, modulation int8 (preset)": _EMBEDDERS + _skinny("w8a16") + [("*", "w8a8")],
    "w4a4, modulation int4 (preset)": _EMBEDDERS + _skinny("w4a16") + [("*", "w4a4")],
    "w4a4, modulation int8": _EMBEDDERS + _skinny("w8a16") + [("*", "w4a4")],
    "mix, modulation int4": _EMBEDDERS + _MIX + _skinny("w4a16") + [("*", "w4a4")],
    "mix, modulation int8 (preset)": _EMBEDDERS + _MIX + _skinny("w8a16") + [("*", "w4a4")],
}


def measure(regime: dict, seed: int) -> dict[str, float]:
    model = build_flux("flux-tiny", seed=seed, **regime)
    kwargs = make_flux_inputs(model, 128, 128, 16, seed=seed).kwargs
    with torch.no_grad():
        ref = model(**kwargs)[0]

    def error(plan) -> float:
        quantized = build_flux("flux-tiny", seed=seed, **regime)
        quantize_model(quantized, plan, progress=False)
        with torch.no_grad():
            return relative_error(quantized(**kwargs)[0], ref)

    out = {name: error(plan) for name, plan in VARIANTS.items()}
    report = sensitivity(model, kwargs=kwargs, plan="w4a4", progress=False)
    mix = {d.name: d.precision for d in decide_linears(model, VARIANTS["mix, modulation int8 (preset)"])}
    budget = plan_bytes(report, {layer.name: mix[layer.name] for layer in report.layers})
    auto, _ = budget_plan(report, budget)
    out["automatic plan at the mix preset's bytes"] = error(auto)
    return out


def main() -> None:
    from tabulate import tabulate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="result folder (default $OUT if set, else ./convrot-out/bench)")
    args = p.parse_args()
    results = {label: [measure(regime, seed) for seed in (0, 1)] for label, regime in REGIMES.items()}
    names = list(results[next(iter(results))][0])
    rows = [[name, *(f"{statistics.mean(r[name] for r in runs):.4f}" for runs in results.values())] for name in names]
    env = environment()
    md = ("# Plans: the modulation's precision per preset, and the automatic plan (CPU)\n\n"
          f"torch {env['torch']}, diffusers {env.get('diffusers')}, {env['date']}. flux-tiny, random weights, "
          "128x128; output error ||out - ref|| / ||ref|| against bf16, the mean of two seeds.\n\n"
          + tabulate(rows, headers=["plan", *results], tablefmt="github") + "\n")
    print(md)
    print("written:", *write_results("plans", {"env": env, "results": results}, md, args.out))


if __name__ == "__main__":
    main()
