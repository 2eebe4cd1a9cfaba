"""Regional compilation: compile each repeated block class once (FLUX: its double- and single-stream
transformer blocks) instead of the whole model, as diffusers' ``compile_repeated_blocks`` does.

One compiled graph serves every instance of a class: Dynamo passes each instance's parameters as
graph inputs, and the backend looks its prepared weights up by parameter at every call (weights.py).
Instances the plan treats alike share a graph; names inside a block's graph are relative to the block,
so a unit's plan is the whole-model plan's decisions written out per relative name.
Each other top-level child that holds a quantized linear (FLUX: the time/text embedders, norm_out)
is compiled alone, so the decisions are those of a whole-model compile; what runs eagerly is the
glue between them. A linear in a top-level child that also holds blocks, or in a top-level torch.nn
module (whose frames Dynamo skips when compiled alone), stays bf16, with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..plans import LayerDecision, Plan


def _inside(name: str, module: str) -> bool:
    """Whether the module or parameter path ``name`` lies strictly under ``module``."""
    return name.startswith(module + ".")


def repeated_block_classes(model: nn.Module) -> list[str]:
    """The class names of a model's repeated blocks: its ``_repeated_blocks`` (diffusers), else the class of
    each ``ModuleList`` holding two or more modules of one class that is not a torch.nn module. Empty when
    it has neither."""
    declared = getattr(model, "_repeated_blocks", None)
    if declared:
        return list(declared)
    found: list[str] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            classes = {type(m) for m in module}
            cls = next(iter(classes))
            if len(classes) == 1 and not cls.__module__.startswith("torch.nn") and cls.__name__ not in found:
                found.append(cls.__name__)
    return found


def block_classes(model: nn.Module, regional: bool | Sequence[str]) -> list[str]:
    """The class names to compile: ``regional`` itself, or the model's repeated blocks."""
    classes = repeated_block_classes(model) if regional is True else list(regional)
    if not classes or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"regional compilation needs the class names of the repeated blocks: "
                         f"{type(model).__name__} has no _repeated_blocks attribute and no ModuleList of one block "
                         "class; pass regional=['BlockClass', ...], or regional=False to compile the whole model")
    return classes


def block_instances(model: nn.Module, classes: Sequence[str]) -> dict[str, list[str]]:
    """{class name: qualified names of its instances}, outermost instances only."""
    found: dict[str, list[str]] = {c: [] for c in classes}
    taken: list[str] = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls in found and name and not any(_inside(name, t) for t in taken):
            found[cls].append(name)
            taken.append(name)
    missing = [c for c, names in found.items() if not names]
    if missing:
        raise ValueError(f"regional compilation: no module of class {missing} in {type(model).__name__}")
    return found


def compiled_units(model: nn.Module, instances: dict[str, list[str]],
                   decisions: list[LayerDecision]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """What to compile: ({unit: module names}, {top-level child left eager: why}). Each block class is
    one unit (its instances share a graph); each top-level child that holds a quantized linear and no
    block is a unit of its own, unless it is a torch.nn module (Dynamo skips their frames when they
    are compiled alone)."""
    blocks = [n for names in instances.values() for n in names]
    quantized = [d.name for d in decisions if d.precision != "bf16"]
    units, eager = dict(instances), {}
    for child, module in model.named_children():
        if child in blocks or not any(q == child or _inside(q, child) for q in quantized):
            continue
        if any(_inside(b, child) for b in blocks):
            eager[child] = f"its top-level module {child!r} also holds repeated blocks"
        elif type(module).__module__.startswith("torch.nn"):
            eager[child] = f"its top-level module {child!r} is a torch.nn {type(module).__name__}, not compiled alone"
        else:
            units[child] = [child]
    return units, eager


@dataclass
class CompileUnit:
    """Modules compiled under one plan. Instances of one block class that get the same plan share a graph;
    a plan that tells instances apart (the FLUX mix keeps block 18's MLP outputs bf16) gives them units of
    their own."""

    name: str  # the block class, or the top-level child
    modules: list[str]
    plan: Plan


def unit_plans(plan: Plan, decisions: list[LayerDecision], units: dict[str, list[str]],
               eager: dict[str, str]) -> list[CompileUnit]:
    """The units to compile, each with a plan of one rule per linear (name relative to the module ->
    precision). Decisions of linears in no unit become bf16 in place, with the reason (``eager``: why, by
    top-level child)."""
    owner = {name: unit for unit, names in units.items() for name in names}
    per_module: dict[str, dict[str, str]] = {name: {} for name in owner}
    for d in decisions:
        module = next((m for m in owner if d.name == m or _inside(d.name, m)), None)
        if module is None:
            if d.precision != "bf16":
                d.precision = "bf16"
                why = eager.get(d.name.split(".")[0], "not in a compiled region")
                d.reason = f"regional compilation runs it eagerly: {why}"
                d.bytes_after = d.bytes_before
            continue
        per_module[module][d.name[len(module) + 1:]] = d.precision
    out = []
    for unit, names in units.items():
        groups: dict[tuple[tuple[str, str], ...], list[str]] = {}
        for name in names:
            groups.setdefault(tuple(sorted(per_module[name].items())), []).append(name)
        for rules, members in groups.items():
            label = unit if len(groups) == 1 else f"{unit}: {members[0]}" + (
                f" and {len(members) - 1} more" if len(members) > 1 else "")
            out.append(CompileUnit(unit, members, Plan(f"{plan.name} ({label})", rules)))
    return out
