"""Per-layer sensitivity: how much of a model's output error each linear causes, at each precision.

For every linear a plan quantizes, the model runs with only that linear quantized, at each precision of its
kind (W4A4 and W8A8 for token linears; W4A16 and W8A16 for the one-row linears a plan keeps weight-only),
the rest in float; and once more with the whole plan applied but that linear in float, which gives the error
the plan loses by quantizing it. Linears are swapped for the eager quantized modules (nn/), which compute
what the compiled graphs do, so nothing is compiled and the model is the same object, unchanged, afterwards.
The error is ||out - ref|| / ||ref|| over the whole output, ref the float model on the same inputs.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..nn.linear import make_quantized_linear, swap_module
from ..numerics.error import relative_error
from ..numerics.quant import WEIGHT_ONLY, quantized_nbytes
from ..plans import PlanSpec, decide_linears, make_plan, module_bytes

TOKEN_PRECISIONS = ("w4a4", "w8a8")
ONE_ROW_PRECISIONS = ("w4a16", "w8a16")


@dataclass
class LayerSensitivity:
    name: str
    kind: str                  # the name with its block index replaced by *: layers of one role across blocks
    block: int | None          # the index of its block, None outside the repeated blocks
    in_features: int
    out_features: int
    planned: str               # the base plan's precision
    errors: dict[str, float]   # precision -> output error with this layer alone quantized at it
    nbytes: dict[str, int]     # precision -> bytes of its weight (bf16 included)
    plan_gain: float = 0.0     # base plan's error minus its error with this layer alone in float


@dataclass
class SensitivityReport:
    plan: str
    plan_rules: list[tuple[str, str]]
    group_size: int
    rotation: str
    plan_error: float
    layers: list[LayerSensitivity] = field(default_factory=list)

    def ranked(self) -> list[LayerSensitivity]:
        """Layers by what the plan loses by quantizing them, most first."""
        return sorted(self.layers, key=lambda s: -s.plan_gain)

    def table(self, top: int | None = 20) -> str:
        from tabulate import tabulate

        precisions = [p for p in (*TOKEN_PRECISIONS, *ONE_ROW_PRECISIONS) if any(p in s.errors for s in self.layers)]
        rows = [[s.name, f"{s.in_features}->{s.out_features}", s.planned, f"{s.plan_gain:.4f}",
                 *(f"{s.errors[p]:.4f}" if p in s.errors else "" for p in precisions)]
                for s in self.ranked()[:top]]
        return tabulate(rows, headers=["linear", "in->out", "plan", "plan error saved in float",
                                       *(f"alone at {p}" for p in precisions)], tablefmt="github")

    def summary(self) -> str:
        return (f"plan {self.plan!r}: output error {self.plan_error:.4f} (||out - ref|| / ||ref||) over "
                f"{len(self.layers)} quantized linears; the top 5 in float would save "
                f"{sum(s.plan_gain for s in self.ranked()[:5]):.4f} between them")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "SensitivityReport":
        raw = json.loads(text)
        layers = [LayerSensitivity(**layer) for layer in raw.pop("layers")]
        raw["plan_rules"] = [tuple(r) for r in raw["plan_rules"]]
        return cls(**raw, layers=layers)


_INDEX = re.compile(r"\.(\d+)\.")


def layer_kind(name: str) -> tuple[str, int | None]:
    """(the name with its first block index replaced by *, that index)."""
    m = _INDEX.search(name)
    if m is None:
        return name, None
    return name[:m.start()] + ".*." + name[m.end():], int(m.group(1))


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample if hasattr(out, "sample") else out[0]


def sensitivity(model: nn.Module, args: tuple = (), kwargs: dict | None = None, plan: PlanSpec = "w4a4",
                group_size: int = 256, rotation: str = "regular", progress: bool = True) -> SensitivityReport:
    """Measure every linear ``plan`` quantizes on ``model(*args, **kwargs)`` (see the module docstring).
    The model is left as it was."""
    from tqdm.auto import tqdm

    base = make_plan(plan)
    kwargs = kwargs or {}
    decisions = [d for d in decide_linears(model, base, group_size) if d.precision != "bf16"]
    if not decisions:
        raise ValueError(f"plan {base.name!r} quantizes none of {type(model).__name__}'s linears: nothing to measure")
    originals = {d.name: model.get_submodule(d.name) for d in decisions}
    quantized: dict[tuple[str, str], nn.Module] = {}

    def version(name: str, precision: str) -> nn.Module:
        if (name, precision) not in quantized:
            quantized[name, precision] = make_quantized_linear(originals[name], precision, group_size, rotation)
        return quantized[name, precision]

    def error() -> float:
        with torch.no_grad():
            return relative_error(_first_tensor(model(*args, **kwargs)), ref)

    with torch.no_grad():
        ref = _first_tensor(model(*args, **kwargs)).float()
    layers: list[LayerSensitivity] = []
    steps = sum(len(ONE_ROW_PRECISIONS if d.precision in WEIGHT_ONLY else TOKEN_PRECISIONS) for d in decisions)
    bar = tqdm(total=steps + len(decisions), desc="sensitivity", unit="forward", disable=not progress)
    try:
        for d in decisions:
            kind, block = layer_kind(d.name)
            candidates = ONE_ROW_PRECISIONS if d.precision in WEIGHT_ONLY else TOKEN_PRECISIONS
            errors: dict[str, float] = {}
            for p in candidates:
                swap_module(model, d.name, version(d.name, p))
                errors[p] = error()
                swap_module(model, d.name, originals[d.name])
                bar.update()
            nbytes = {p: quantized_nbytes(p, d.out_features, d.in_features, group_size) for p in candidates}
            nbytes["bf16"] = module_bytes(originals[d.name])
            layers.append(LayerSensitivity(d.name, kind, block, d.in_features, d.out_features, d.precision,
                                           errors, nbytes))
        for d in decisions:
            swap_module(model, d.name, version(d.name, d.precision))
        plan_error = error()
        for layer in layers:
            swap_module(model, layer.name, originals[layer.name])
            layer.plan_gain = plan_error - error()
            swap_module(model, layer.name, version(layer.name, layer.planned))
            bar.update()
    finally:
        for name, module in originals.items():
            swap_module(model, name, module)
        bar.close()
    return SensitivityReport(base.name, list(base.rules), group_size, rotation, plan_error, layers)

