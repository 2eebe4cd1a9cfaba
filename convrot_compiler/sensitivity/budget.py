"""An automatic plan: the precisions a weight budget buys, chosen from measured sensitivities.

Every measured linear starts at the cheapest precision of its kind (W4A4 for token linears, W4A16 for
one-row ones) and climbs its ladder (W8A8 or W8A16, then bf16) one step at a time, the step that saves the
most output error per extra byte first, while the linear weights fit the budget. A step's saving is the
square of the layer's error alone at its precision minus that at the next (none in bf16): the errors of
layers quantized together are nearly independent, so their squares add up.
"""

from __future__ import annotations

import heapq

from ..plans import Plan
from .measure import ONE_ROW_PRECISIONS, TOKEN_PRECISIONS, LayerSensitivity, SensitivityReport

LADDERS = {"token": (*TOKEN_PRECISIONS, "bf16"), "one row": (*ONE_ROW_PRECISIONS, "bf16")}


def _ladder(layer: LayerSensitivity) -> tuple[str, ...]:
    return LADDERS["one row" if layer.planned in ONE_ROW_PRECISIONS else "token"]


def _variance(layer: LayerSensitivity, precision: str) -> float:
    """The layer's error alone, squared: independent errors add as variances, ||sum e_i||^2 ~ sum ||e_i||^2."""
    return 0.0 if precision == "bf16" else layer.errors[precision] ** 2


def plan_bytes(report: SensitivityReport, precisions: dict[str, str]) -> int:
    """Bytes of the measured linears' weights at ``precisions`` (name -> precision)."""
    return sum(layer.nbytes[precisions[layer.name]] for layer in report.layers)


def budget_bytes(report: SensitivityReport, budget: float) -> int:
    """A budget in bytes from ``budget``: bytes themselves when above 1, else the fraction of the way from
    the cheapest plan to every measured linear in bf16."""
    if budget < 0:
        raise ValueError(f"a budget must be positive, got {budget}")
    if budget > 1:
        return int(budget)
    cheapest = plan_bytes(report, {layer.name: _ladder(layer)[0] for layer in report.layers})
    full = plan_bytes(report, {layer.name: "bf16" for layer in report.layers})
    return int(cheapest + budget * (full - cheapest))


def budget_plan(report: SensitivityReport, budget: float, name: str = "auto") -> tuple[Plan, dict[str, str]]:
    """(the plan, name -> precision) that ``budget`` (``budget_bytes``) buys. Linears the report did not
    measure keep the report's base plan."""
    limit = budget_bytes(report, budget)
    level = {layer.name: 0 for layer in report.layers}
    by_name = {layer.name: layer for layer in report.layers}
    total = plan_bytes(report, {n: _ladder(by_name[n])[0] for n in level})
    if total > limit:
        raise ValueError(f"a budget of {limit / 2**20:.1f} MiB is below the cheapest plan's {total / 2**20:.1f} MiB "
                         "of linear weights")

    def step(layer: LayerSensitivity) -> tuple[float, int, str] | None:
        ladder = _ladder(layer)
        i = level[layer.name]
        if i + 1 >= len(ladder):
            return None
        extra = layer.nbytes[ladder[i + 1]] - layer.nbytes[ladder[i]]
        saving = _variance(layer, ladder[i]) - _variance(layer, ladder[i + 1])
        return -saving / max(extra, 1), extra, layer.name

    heap = [s for s in map(step, report.layers) if s is not None]
    heapq.heapify(heap)
    while heap:
        score, extra, layer_name = heapq.heappop(heap)
        if score >= 0 or total + extra > limit:
            continue  # saves nothing, or does not fit: a cheaper step of another layer still may
        total += extra
        level[layer_name] += 1
        nxt = step(by_name[layer_name])
        if nxt is not None:
            heapq.heappush(heap, nxt)
    chosen = {n: _ladder(by_name[n])[i] for n, i in level.items()}
    rules = [(n, p) for n, p in chosen.items()] + list(report.plan_rules)
    return Plan(name, tuple(rules)), chosen
