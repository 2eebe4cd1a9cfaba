"""Regional compilation: compile each repeated block class once (FLUX: its double- and single-stream
transformer blocks) instead of the whole model, as diffusers' ``compile_repeated_blocks`` does.

One compiled graph serves every instance of a class: Dynamo passes each instance's parameters as
graph inputs, and the backend looks its prepared weights up by parameter at every call (weights.py).
So the plan must treat every instance of a class alike. Names inside a block's graph are relative to
the block: the block's plan is the whole-model plan's decisions written out per relative name.
Linears outside the repeated blocks run eagerly and stay bf16; their decisions say so.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .plans import LayerDecision, Plan


def block_classes(model: nn.Module, regional: bool | Sequence[str]) -> list[str]:
    """The class names to compile: ``regional`` itself, or the model's ``_repeated_blocks`` (diffusers)."""
    classes = list(getattr(model, "_repeated_blocks", None) or []) if regional is True else list(regional)
    if not classes or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"regional compilation needs the class names of the repeated blocks: "
                         f"{type(model).__name__} has no _repeated_blocks attribute; pass regional=['BlockClass', ...]")
    return classes


def block_instances(model: nn.Module, classes: Sequence[str]) -> dict[str, list[str]]:
    """{class name: qualified names of its instances}, outermost instances only."""
    found: dict[str, list[str]] = {c: [] for c in classes}
    taken: list[str] = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls in found and name and not any(name.startswith(t + ".") for t in taken):
            found[cls].append(name)
            taken.append(name)
    missing = [c for c, names in found.items() if not names]
    if missing:
        raise ValueError(f"regional compilation: no module of class {missing} in {type(model).__name__}")
    return found


def block_plans(plan: Plan, decisions: list[LayerDecision], instances: dict[str, list[str]]) -> dict[str, Plan]:
    """One plan per block class, with a rule per linear (relative name -> precision). Decisions of
    linears outside every block become bf16 in place, with the reason. Raises when the whole-model
    plan gives instances of one class different precisions: one graph cannot serve them."""
    owner = {name: cls for cls, names in instances.items() for name in names}
    per_class: dict[str, dict[str, tuple[str, str]]] = {c: {} for c in instances}
    for d in decisions:
        block = next((b for b in owner if d.name.startswith(b + ".")), None)
        if block is None:
            if d.precision != "bf16":
                d.precision = "bf16"
                d.reason = "outside the repeated blocks: regional compilation runs it eagerly"
                d.bytes_after = d.bytes_before
            continue
        cls, rel = owner[block], d.name[len(block) + 1:]
        seen = per_class[cls].setdefault(rel, (d.precision, d.name))
        if seen[0] != d.precision:
            raise ValueError(f"regional compilation compiles one graph per block class, but the plan gives "
                             f"{seen[1]} {seen[0]} and {d.name} {d.precision}; use a plan that treats every "
                             f"{cls} alike, or compile without regional")
    return {cls: Plan(f"{plan.name} ({cls})", tuple((rel, p) for rel, (p, _) in rules.items()))
            for cls, rules in per_class.items()}
