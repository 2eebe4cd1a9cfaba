"""Per-layer precision plans: which precision each linear gets, and why.

A plan is an ordered list of (fnmatch pattern on the module's qualified name,
precision) rules; the first match wins. Presets encode ConvRot's choices for
FLUX; on other models their FLUX-specific patterns simply match nothing.
"""

from __future__ import annotations

import fnmatch
import json
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence, Union

import torch
from torch import nn

PRECISIONS: tuple[str, ...] = ("w4a4", "w8a8", "w4a16", "w8a16", "bf16")
QUANTIZED: tuple[str, ...] = ("w4a4", "w8a8", "w4a16", "w8a16")
NO_RULE = "<no rule matched>"  # the rule of a linear no rule of the plan matches

Rule = tuple[str, str]
PlanSpec = Union[str, Sequence[Rule], "Plan"]

# Linears that see one row per sample (adaLN modulation, time/text/guidance embedders): weight-bandwidth
# bound, so weight-only, never W4A4; int4 weights (w4a16) or int8 (w8a16).
_SKINNY_NAMES = ("time_text_embed.*", "*norm1.linear", "*norm1_context.linear", "*norm.linear", "norm_out.linear")


def _skinny(precision: str) -> list[Rule]:
    return [(name, precision) for name in _SKINNY_NAMES]


# Input/output projections stay in high precision, as in the ConvRot reference.
_EMBEDDERS: list[Rule] = [
    ("x_embedder", "bf16"),
    ("context_embedder", "bf16"),
    ("proj_out", "bf16"),
]
# The paper's "mix" exceptions (FLUX.1-dev).
_MIX: list[Rule] = [
    ("single_transformer_blocks.37.proj_out", "bf16"),
    ("transformer_blocks.18.ff.net.2", "bf16"),
    ("transformer_blocks.18.ff_context.net.2", "bf16"),
    ("transformer_blocks.*.attn.to_out.0", "w8a8"),
    ("single_transformer_blocks.*.attn.to_v", "w8a8"),
]

# The modulation's weight precision, by measurement (docs/PLANS.md, benchmarks/results/plans.md): int4
# modulation weights, which scale the whole residual stream, set the error of an otherwise 8-bit model
# (0.163 against 0.016 with int8 ones on a small FLUX), so w8a8 never takes them; mix, the best-quality
# preset, takes int8 too (8-25% less error where the modulation's counts, equal elsewhere); w4a4, the
# smallest, keeps int4 (the modulation holds 27% of FLUX's weights).
PER_SAMPLE_PRECISION: dict[str, str] = {"w4a4": "w4a16", "w8a8": "w8a16", "mix": "w8a16"}
PRESETS: dict[str, list[Rule]] = {
    "w4a4": _EMBEDDERS + _skinny(PER_SAMPLE_PRECISION["w4a4"]) + [("*", "w4a4")],
    "w8a8": _EMBEDDERS + _skinny(PER_SAMPLE_PRECISION["w8a8"]) + [("*", "w8a8")],
    "mix": _EMBEDDERS + _MIX + _skinny(PER_SAMPLE_PRECISION["mix"]) + [("*", "w4a4")],
    "none": [("*", "bf16")],
}


@dataclass(frozen=True)
class Plan:
    name: str
    rules: tuple[Rule, ...]

    def match(self, module_name: str) -> tuple[str, str]:
        """(precision, the pattern that chose it) for a module name."""
        for pattern, precision in self.rules:
            if fnmatch.fnmatchcase(module_name, pattern):
                return precision, pattern
        return "bf16", NO_RULE


PLAN_FORMAT = "convrot-plan"


def make_plan(spec: PlanSpec = "w4a4") -> Plan:
    """A Plan from a preset name, a plan file (``*.json``, ``save_plan``), a list of (pattern, precision)
    rules, or a Plan."""
    if isinstance(spec, Plan):
        return spec
    if isinstance(spec, str) and spec.endswith(".json"):
        return load_plan(spec)
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown plan {spec!r}; choose one of {tuple(PRESETS)}, a plan file (*.json), or pass a "
                             "list of (pattern, precision) rules")
        return Plan(spec, tuple(PRESETS[spec]))
    rules = []
    for i, rule in enumerate(spec):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and all(isinstance(r, str) for r in rule)):
            raise ValueError(f"plan rule {i} must be a (pattern, precision) pair of strings, got {rule!r}")
        if rule[1] not in PRECISIONS:
            raise ValueError(f"plan rule {i} ({rule[0]!r}) has unknown precision {rule[1]!r}; choose one of {PRECISIONS}")
        rules.append((rule[0], rule[1]))
    return Plan("custom", tuple(rules))


def save_plan(plan: Plan, path: str) -> None:
    """Write ``plan`` as a plan file: JSON, its name and its rules, first match wins."""
    with open(path, "w") as f:
        json.dump({"format": PLAN_FORMAT, "name": plan.name, "rules": [list(r) for r in plan.rules]}, f, indent=1)


def load_plan(path: str) -> Plan:
    """The plan in a plan file (``save_plan``), its rules checked as make_plan checks a list of rules."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"plan file {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"plan file {path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != PLAN_FORMAT or not isinstance(raw.get("rules"), list):
        raise ValueError(f"plan file {path}: not a convrot plan (a JSON object with format {PLAN_FORMAT!r}, a name and "
                         "rules)")
    try:
        rules = make_plan(raw["rules"]).rules
    except ValueError as e:
        raise ValueError(f"plan file {path}: {e}") from None
    return Plan(str(raw.get("name", path)), rules)


@dataclass
class LayerDecision:
    """What happened to one linear, for reports."""

    name: str
    in_features: int
    out_features: int
    planned: str
    precision: str
    reason: str
    rule: str = ""
    rows: int | None = None
    bytes_before: int = 0
    bytes_after: int = 0
    extra: dict = field(default_factory=dict)


def eligibility(precision: str, in_features: int, out_features: int, weight_dtype, group_size: int) -> str | None:
    """Why a linear cannot take ``precision`` (None when it can)."""
    if precision == "bf16":
        return None
    if weight_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"weight dtype {weight_dtype} is not a float type"
    if in_features < group_size:
        return f"K={in_features} is smaller than the group size {group_size}"
    if out_features < 16:
        return f"N={out_features} is too small to be worth quantizing"
    return None


def decide(plan: Plan, name: str, in_features: int, out_features: int, weight_dtype, group_size: int,
           rows: int | None = None, nbytes: int = 0, unsupported: str | None = None) -> LayerDecision:
    """The precision a linear gets: the plan's rule for its name, unless it cannot take it (``unsupported``:
    a reason its matcher found, else ``eligibility``); either way with the reason. The one place a linear
    is decided, for the backend, the Inductor pass and the eager modules alike."""
    planned, rule = plan.match(name)
    d = LayerDecision(name, in_features, out_features, planned, planned, f"plan rule {rule!r}", rule, rows=rows,
                      bytes_before=nbytes, bytes_after=nbytes)
    if planned == "bf16":
        d.reason = f"kept by plan rule {rule!r}"
        return d
    why = unsupported or eligibility(planned, in_features, out_features, weight_dtype, group_size)
    if why:
        d.precision, d.reason = "bf16", why
    return d


def warn_if_ineffective(decisions: list[LayerDecision], plan_name: str, group_size: int, where: str = "the model") -> None:
    """Warn when a plan quantizes none of the linears it was given, unless its rules keep each of them on
    purpose, or when the group size leaves more than half of those the plan would quantize in bf16.
    ``where`` names what the decisions cover: the model, or one graph of the stock backend."""
    if not decisions or plan_name == "none":
        return
    planned = [d for d in decisions if d.planned != "bf16"]
    kept_on_purpose = all(d.planned == "bf16" and d.rule != NO_RULE for d in decisions)
    if not any(d.precision != "bf16" for d in decisions) and not kept_on_purpose:
        unmatched = sum(d.rule == NO_RULE for d in decisions)
        warnings.warn(f"plan {plan_name!r} quantizes none of the {len(decisions)} linears of {where}: every one runs "
                      f"in its float dtype ({unmatched} match no rule of the plan; the decisions say why)",
                      stacklevel=3)
        return
    too_small = [d for d in planned if d.precision == "bf16" and "smaller than the group size" in d.reason]
    if planned and len(too_small) > len(planned) / 2:
        warnings.warn(f"group_size={group_size} leaves {len(too_small)} of the {len(planned)} linears of {where} the "
                      f"plan would quantize in bf16 (their K is smaller): use a smaller group size", stacklevel=3)


def summarize(decisions: Iterable[LayerDecision]) -> dict[str, int]:
    counts: dict[str, int] = {p: 0 for p in PRECISIONS}
    for d in decisions:
        counts[d.precision] = counts.get(d.precision, 0) + 1
    return counts


def module_bytes(module: nn.Module) -> int:
    """Bytes held by a module's own parameters and buffers (not its children's)."""
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    return sum(t.numel() * t.element_size() for t in tensors)


def iter_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear:
            yield name, mod


def decide_linears(model: nn.Module, plan: PlanSpec = "w4a4", group_size: int = 256) -> list[LayerDecision]:
    """Decide a precision for every nn.Linear of a model, without changing it."""
    p = make_plan(plan)
    return [decide(p, name, lin.in_features, lin.out_features, lin.weight.dtype, group_size, nbytes=module_bytes(lin))
            for name, lin in iter_linears(model)]
