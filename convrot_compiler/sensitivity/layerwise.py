"""Error measures less chaotic than the whole output's: the error of the hidden states after the first K
blocks, and each quantized linear's SQNR on its own float inputs.

On random weights (and early in any deep model) a small change grows from block to block, so the error of
the final output says little about how good a quantizer is; the state after a few blocks and each layer's
SQNR do not compound. Both use the eager quantized modules (nn/), which compute what the compiled graphs
compute, and leave the model as it was.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn.linear import quantized_module_for
from ..numerics.error import relative_error
from ..plans import LayerDecision, PlanSpec, decide_linears, make_plan
from .swap import swapped


def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's repeated blocks in the order its forward runs them: the entries of each ``nn.ModuleList`` of
    modules of one class, lists in the order they are defined (FLUX: the 19 double-stream blocks, then the 38
    single-stream ones)."""
    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            blocks += [(f"{name}.{i}", m) for i, m in enumerate(module)]
    return blocks


def _flat_tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat_tensors(o)]
    return []


class _Done(Exception):
    """Raised by a hook once the deepest measured block has run: the rest of the forward is not needed."""


def _block_states(model: nn.Module, blocks: list[tuple[str, nn.Module]], depths: list[int], args: tuple,
                  kwargs: dict) -> dict[int, torch.Tensor]:
    states: dict[int, torch.Tensor] = {}
    deepest = max(depths)

    def hook_for(depth: int):
        def hook(module, inputs, output):
            states[depth] = torch.cat([t.detach().float().flatten() for t in _flat_tensors(output)])
            if depth == deepest:
                raise _Done

        return hook

    handles = [blocks[d - 1][1].register_forward_hook(hook_for(d)) for d in depths]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except _Done:
        pass
    finally:
        for h in handles:
            h.remove()
    return states


def _quantized_module(model: nn.Module, d: LayerDecision, group_size: int, rotation: str, method: dict) -> nn.Module:
    """The eager quantized module of decision ``d``; ``method``: ``weights``, ``calibration`` and
    ``high_precision_fraction`` for the calibrated methods (DiRotQ, GPTQ), as ``quantize_model`` takes them."""
    return quantized_module_for(model.get_submodule(d.name), d, group_size, rotation, **method)


def quantized_decisions(model: nn.Module, plan: PlanSpec, group_size: int) -> list[LayerDecision]:
    decisions = [d for d in decide_linears(model, make_plan(plan), group_size) if d.precision != "bf16"]
    if not decisions:
        raise ValueError(f"plan {make_plan(plan).name!r} quantizes none of {type(model).__name__}'s linears: "
                         "nothing to measure")
    return decisions


def error_by_depth(model: nn.Module, args: tuple = (), kwargs: dict | None = None, plan: PlanSpec = "w4a4",
                   depths: tuple[int, ...] = (1, 2, 4), group_size: int = 256,
                   rotation: str = "regular", **method) -> dict[int, float]:
    """{K: ||h_K - ref_K|| / ||ref_K||}, h_K everything the K-th repeated block returns (``repeated_blocks``)
    with ``plan`` applied, ref_K the same in float. Depths beyond the model's blocks are left out. ``method``:
    ``weights``, ``calibration``, ``high_precision_fraction`` (DiRotQ with ``rotation="pca"``, GPTQ)."""
    kwargs = kwargs or {}
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no repeated blocks (no nn.ModuleList of one module class)")
    if any(d < 1 for d in depths):
        raise ValueError(f"depths count blocks from 1, got {depths}")
    kept = sorted({d for d in depths if d <= len(blocks)})
    if not kept:
        raise ValueError(f"{type(model).__name__} has {len(blocks)} repeated blocks, fewer than any of {depths}")
    decisions = quantized_decisions(model, plan, group_size)
    ref = _block_states(model, blocks, kept, args, kwargs)
    quantized = {d.name: _quantized_module(model, d, group_size, rotation, method) for d in decisions}
    with swapped(model, quantized):
        test = _block_states(model, blocks, kept, args, kwargs)
    return {d: relative_error(test[d], ref[d]) for d in kept}


@dataclass
class LayerSQNR:
    name: str
    precision: str
    sqnr_db: float   # 10 log10(||y||^2 / ||y_q - y||^2), y the float layer's output on its float inputs


@dataclass
class LayerwiseReport:
    plan: str
    depth_errors: dict[int, float]
    layers: list[LayerSQNR] = field(default_factory=list)

    def sqnr_by_kind(self) -> dict[str, dict[str, float]]:
        """{layer kind (block index as *): {"layers", "min", "median", "max"} in dB}."""
        from .measure import layer_kind

        kinds: dict[str, list[float]] = {}
        for layer in self.layers:
            kinds.setdefault(f"{layer_kind(layer.name)[0]} ({layer.precision})", []).append(layer.sqnr_db)
        return {k: {"layers": len(v), "min": min(v), "median": statistics.median(v), "max": max(v)}
                for k, v in sorted(kinds.items(), key=lambda kv: min(kv[1]))}

    def table(self) -> str:
        from tabulate import tabulate

        depth = tabulate([[f"after {k} block{'s' if k > 1 else ''}", f"{e:.4f}"] for k, e in self.depth_errors.items()],
                         headers=[f"plan {self.plan!r}", "error vs float"], tablefmt="github")
        sqnr = tabulate([[k, s["layers"], f"{s['min']:.1f}", f"{s['median']:.1f}", f"{s['max']:.1f}"]
                         for k, s in self.sqnr_by_kind().items()],
                        headers=["linear kind (precision)", "layers", "SQNR dB min", "median", "max"],
                        tablefmt="github")
        return f"{depth}\n\n{sqnr}"


def layer_sqnr(model: nn.Module, args: tuple = (), kwargs: dict | None = None, plan: PlanSpec = "w4a4",
               group_size: int = 256, rotation: str = "regular", **method) -> list[LayerSQNR]:
    """Each linear ``plan`` quantizes, quantized alone and fed the float model's inputs to it, in one float
    forward (each quantized module is made in its hook and dropped after it, so memory stays that of one layer)."""
    kwargs = kwargs or {}
    decisions = quantized_decisions(model, plan, group_size)
    results: list[LayerSQNR] = []

    def hook_for(d: LayerDecision):
        def hook(module, inputs, output):
            q = _quantized_module(model, d, group_size, rotation, method)
            y = output.float()
            noise = (q(inputs[0]).float() - y).pow(2).sum().item()
            signal = y.pow(2).sum().item()
            db = math.inf if noise == 0 else (-math.inf if signal == 0 else 10 * math.log10(signal / noise))
            results.append(LayerSQNR(d.name, d.precision, db))

        return hook

    handles = [model.get_submodule(d.name).register_forward_hook(hook_for(d)) for d in decisions]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    called = {r.name for r in results}
    if missing := [d.name for d in decisions if d.name not in called]:
        raise RuntimeError(f"{len(missing)} quantized linears never ran in the forward (first: {missing[0]}); "
                           "their SQNR cannot be measured on these inputs")
    return results


def layerwise(model: nn.Module, args: tuple = (), kwargs: dict | None = None, plan: PlanSpec = "w4a4",
              depths: tuple[int, ...] = (1, 2, 4), group_size: int = 256, rotation: str = "regular",
              **method) -> LayerwiseReport:
    """Both measures of this module for one plan (and method) on one input."""
    return LayerwiseReport(make_plan(plan).name,
                           error_by_depth(model, args, kwargs, plan, depths, group_size, rotation, **method),
                           layer_sqnr(model, args, kwargs, plan, group_size, rotation, **method))
