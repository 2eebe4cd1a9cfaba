"""Each linear's role in the model, from its shapes in one forward, not from its name.

The presets name FLUX.1's modulation, embedders and projections; other families name theirs otherwise
(Qwen-Image's ``img_mod.1``, FLUX.2's ``double_stream_modulation_img.linear``, Wan's ``time_proj``), and a
preset would run them W4A4. So before deciding, the model runs once on the meta device (no weight is read and
nothing is computed) on its family's example inputs (families.py), each nn.Linear's input recorded:

* a linear that sees one row per sample, where the others see many (adaLN modulation, time, text and
  guidance embedders), is weight-bound and scales the whole residual stream: a preset gives it its weight-only
  precision (w4a16 under w4a4, w8a16 under w8a8 and mix), never an activation-quantized one;
* a linear reading a model input as it is (the input projections) and the last linear of the forward (the
  output projection) stay bf16 under a preset, as FLUX.1's do by name.

A plan of the user's own rules is left as it is (the graphs warn of a per-sample linear it quantizes). A family
whose forward branches on data (HunyuanVideo 1.5) is probed through a miniature of its own config on the CPU,
its roles carried over by module name with the block indices left out. A model of a family without example
inputs, or one the probe cannot run, is decided by names alone, and says so.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ..families import MINIATURES, example_inputs
from ..plans import PER_SAMPLE_PRECISION, PRESETS, LayerDecision, Plan, decide_linears, eligibility, iter_linears

PER_SAMPLE = "sees one row per sample (modulation, time or guidance embedder)"
INPUT_PROJECTION = "reads a model input (input projection)"
OUTPUT_PROJECTION = "the forward's last linear (output projection)"
ROLE_RULE = "<role>"


def per_sample_linears(rows: dict[str, int]) -> set[str]:
    """The linears that see one row per sample, from the rows each linear saw in one forward or graph: the
    fewest, where some other linear saw at least 8 times as many (tokens)."""
    if len(rows) < 2 or max(rows.values()) < 8 * min(rows.values()):
        return set()
    return {name for name, r in rows.items() if r == min(rows.values())}


@dataclass
class Probe:
    roles: dict[str, str]  # linear name -> role, for the linears that have one
    note: str              # how the roles were found, or why there are none


@dataclass
class _Run:
    rows: dict[str, int]     # linear name -> rows of its input
    reads_input: set[str]    # linears whose input is a model input as it is
    order: list[str]         # linears in the order they ran

    def roles(self) -> dict[str, str]:
        roles = dict.fromkeys(per_sample_linears(self.rows), PER_SAMPLE)
        for name in self.reads_input:
            roles.setdefault(name, INPUT_PROJECTION)
        if self.order:
            roles.setdefault(self.order[-1], OUTPUT_PROJECTION)
        return roles


def _run(model: nn.Module, inputs: dict, state: dict | None) -> _Run:
    """One forward of ``model`` on ``inputs`` (with the tensors of ``state`` in place of its own, if given), each
    linear's input recorded; every attribute the forward caches is put back."""
    run = _Run({}, set(), [])
    given = {id(v) for v in inputs.values() if isinstance(v, torch.Tensor)}

    def record(name: str):
        def hook(module, args):
            x = args[0]
            run.rows[name] = x.numel() // max(1, x.shape[-1])
            run.order.append(name)
            if id(x) in given:
                run.reads_input.add(name)
        return hook

    # a forward may cache tensors in attributes (Z-Image's RoPE table, on a plain object a module holds): on the
    # meta device they would outlive the probe, so every attribute it changes is put back
    holders = list(model.modules())
    holders += [v for m in list(holders) for v in m.__dict__.values()
                if hasattr(v, "__dict__") and not isinstance(v, (nn.Module, torch.Tensor, type))]
    attributes = [(h, dict(h.__dict__)) for h in holders]
    hooks = [m.register_forward_pre_hook(record(name)) for name, m in iter_linears(model)]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if state is None:
                model(**inputs)
            else:
                functional_call(model, state, args=(), kwargs=inputs, tie_weights=False, strict=False)
    finally:
        for h in hooks:
            h.remove()
        for holder, before in attributes:
            for key in [k for k in holder.__dict__ if k not in before]:
                del holder.__dict__[key]
            holder.__dict__.update({k: v for k, v in before.items() if holder.__dict__.get(k) is not v})
    return run


def _block_pattern(name: str) -> str:
    """A linear's name with its block indices left out: ``transformer_blocks.#.attn.to_q``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "#", name)


def _miniature_roles(model: nn.Module, shrink: dict) -> dict[str, str]:
    """The roles of ``model``'s linears from a forward of a miniature of its own config (``shrink`` applied), on
    the CPU with random weights: by block pattern, for a family whose forward the meta device cannot run."""
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:  # its random init leaves the caller's random state as it was
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.manual_seed(0)
            miniature = type(model)(**{**config, **shrink}).eval()
    finally:
        torch.set_default_dtype(default)
    run = _run(miniature, example_inputs(miniature, "cpu", dtype=torch.float32), None)
    found = run.roles()
    by_pattern: dict[str, str | None] = {}
    for name in run.rows:
        p = _block_pattern(name)
        if by_pattern.setdefault(p, found.get(name)) != found.get(name):
            raise RuntimeError(f"linears named {p} have different roles in the miniature")
    ours = {_block_pattern(name) for name, _ in iter_linears(model)}
    missing = ours - {_block_pattern(name) for name in run.rows}
    if missing:
        raise RuntimeError(f"{len(missing)} linears of the model did not run in its miniature "
                           f"(e.g. {sorted(missing)[0]})")
    return {name: role for name, _ in iter_linears(model) if (role := by_pattern[_block_pattern(name)]) is not None}


def probe_roles(model: nn.Module) -> Probe:
    """The roles of ``model``'s linears from one meta-device forward on its family's example inputs, or for a
    family in ``families.MINIATURES`` from a CPU forward of a miniature of its config."""
    inputs = example_inputs(model)
    kind = type(model).__name__
    if inputs is None:
        return Probe({}, f"no example inputs for {kind}: roles by module names only")
    if any(hasattr(m, "_hf_hook") for m in model.modules()):  # offload hooks move weights in their forward
        return Probe({}, f"{kind} has accelerate hooks: roles by module names only")
    try:
        if kind in MINIATURES:
            roles = _miniature_roles(model, MINIATURES[kind])
            return Probe(roles, f"roles from a shape probe of a miniature {kind} on the CPU (its forward branches "
                                "on data: the meta device cannot run it)")
        state = {k: torch.empty_like(t, device="meta") for k, t in
                 [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]}
        run = _run(model, inputs, state)
    except Exception as e:  # a forward the probe cannot run: fall back to names, and say why
        note = f"the shape probe of {kind} failed ({type(e).__name__}: {e}): roles by module names only"
        warnings.warn(note, stacklevel=3)
        return Probe({}, note)
    return Probe(run.roles(), f"roles from a shape probe of {kind} ({len(run.rows)} linears ran)")


def is_preset(plan: Plan) -> bool:
    return plan.name in PER_SAMPLE_PRECISION and tuple(PRESETS[plan.name]) == tuple(plan.rules)


def apply_roles(decisions: list[LayerDecision], plan: Plan, probe: Probe, group_size: int,
                dtypes: dict[str, torch.dtype]) -> Plan:
    """Record each decision's role, and under a preset give the linears whose role asks for it the role's
    precision. Returns the plan the graphs take: the preset with one exact rule ahead of it per changed
    linear, or ``plan`` itself when nothing changed."""
    changed = []
    for d in decisions:
        role = probe.roles.get(d.name)
        if role is None:
            continue
        d.extra["role"] = role
        if not is_preset(plan) or d.planned not in ("w4a4", "w8a8"):
            continue
        want = PER_SAMPLE_PRECISION[plan.name] if role == PER_SAMPLE else "bf16"
        d.planned, d.rule = want, ROLE_RULE
        why = eligibility(want, d.in_features, d.out_features, dtypes[d.name], group_size)
        d.precision = "bf16" if why else want
        d.reason = why or f"{role}: {want} under preset {plan.name!r}"
        if d.precision == "bf16":
            d.bytes_after = d.bytes_before
        changed.append(d)
    if not changed:
        return plan
    return Plan(plan.name, tuple((d.name, d.precision) for d in changed) + tuple(plan.rules))


def decide_model(model: nn.Module, plan: Plan, group_size: int) -> tuple[list[LayerDecision], Plan, str]:
    """Every nn.Linear's decision, the plan's rules then the roles (``apply_roles``), the plan the graphs take,
    and how the roles were found (or why there are none: ``Probe.note``)."""
    decisions = decide_linears(model, plan, group_size)
    dtypes = {name: lin.weight.dtype for name, lin in iter_linears(model)}
    probe = probe_roles(model)
    return decisions, apply_roles(decisions, plan, probe, group_size, dtypes), probe.note
