"""The ``convrot`` torch.compile backend: one Dynamo FX graph in, its compiled form out.

FX graph -> match linears -> decide each -> prepare weights -> rewrite into custom ops -> attention ->
lower (Inductor, or the rewritten graph as is): stages.py, one function per stage. ``compile_model.py``
applies it to a whole model.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx

from ..config import ConvRotConfig
from ..plans import LayerDecision, summarize, warn_if_ineffective
from . import stages
from .attention_rewrite import AttentionDecision


@dataclass
class CompileReport:
    """What the pass did to one graph."""

    decisions: list[LayerDecision]
    plan: str
    rotation: str
    group_size: int
    graph_before: str = ""
    graph_after: str = ""
    graph_modules: dict = field(default_factory=dict)
    activation_quantizations: int = 0         # rotate+quantize ops in the rewritten graph
    shared_activation_quantizations: int = 0  # linears reusing another's (same input, same precision)
    fused_gemms: int = 0                      # GEMMs that compute two or more linears
    fused_linears: int = 0                    # linears computed by those
    fused_producers: int = 0                  # quantizations that read the concatenation feeding them
    fused_norms: int = 0                      # quantizations that compute the adaLN normalization feeding them
    gelu_epilogues: int = 0                   # GELUs computed in the epilogue of the GEMM before them
    attention: list[AttentionDecision] = field(default_factory=list)  # every SDPA of the graph, fp8 or kept

    @property
    def counts(self) -> dict[str, int]:
        return summarize(self.decisions)

    @property
    def rewritten(self) -> int:
        return sum(d.precision != "bf16" for d in self.decisions)


REPORTS: "collections.deque[CompileReport]" = collections.deque(maxlen=16)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over a fresh copy of gm's graph (node meta shared, not deep-copied)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def compile_graph(gm: fx.GraphModule, example_inputs: list, config: ConvRotConfig) -> tuple[Callable, CompileReport]:
    gm = copy_graph_module(gm)  # Dynamo reads its own graph's placeholders after the backend returns
    original, before = gm.forward, gm.print_readable(print_output=False)
    matches = stages.match(gm, example_inputs, config.linear_names)
    decisions = stages.decide(matches, config)
    quantized = stages.prepare(matches, decisions, config)
    rewritten = stages.rewrite(gm, quantized, config)
    attention, attention_rewrites = stages.attention(gm, config, linears_rewritten=bool(quantized))
    report = CompileReport(decisions, config.plan.name, config.rotation, config.group_size, graph_before=before,
                           attention=attention)
    if rewritten is not None:
        report.activation_quantizations = rewritten.activation_quantizations
        report.shared_activation_quantizations = rewritten.shared
        report.fused_gemms, report.fused_linears = rewritten.fused_gemms, rewritten.fused_linears
        report.fused_producers, report.gelu_epilogues = rewritten.fused_producers, rewritten.gelu_epilogues
        report.fused_norms = rewritten.fused_norms
    changed = bool(quantized) or attention_rewrites > 0
    report.graph_after = gm.print_readable(print_output=False) if changed else before
    report.graph_modules["after"] = gm
    if config.dry_run or not changed:
        return original, report
    return stages.lower(gm, example_inputs, quantized, rewritten, config), report


def convrot_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None) -> Callable:
    """torch.compile backend: ``torch.compile(model, backend="convrot", options={...})``.

    Options: the graph-level fields of ``ConvRotConfig`` by name, or ``{"config": ConvRotConfig(...)}``.
    Inference only: call the compiled model under ``torch.no_grad()`` or ``torch.inference_mode()``. Using it sets Dynamo's
    ``fail_on_recompile_limit_hit``: a new input shape past ``torch._dynamo.config.recompile_limit`` raises
    instead of running the model unquantized. A graph whose linears the plan leaves all in bf16 (no rule
    matches them, or the group size is too large) is warned of."""
    fn, report = _backend(gm, example_inputs, options)
    warn_if_ineffective(report.decisions, report.plan, report.group_size, where="this graph")
    return fn


def model_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None) -> Callable:
    """The backend ``convrot_compiler.compile`` uses: ``convrot_backend`` without the per-graph warnings,
    since ``compile`` warns once for the whole model (a regional graph sees one block)."""
    return _backend(gm, example_inputs, options)[0]


def _backend(gm: fx.GraphModule, example_inputs: list, options: dict | None) -> tuple[Callable, CompileReport]:
    config = ConvRotConfig.from_backend_options(options)
    # Past the recompile limit Dynamo would run the frame eagerly: unquantized, in silence. Make it an error.
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    if torch.is_grad_enabled():
        raise RuntimeError("the convrot backend is inference-only: run the compiled model under torch.no_grad() "
                           "or torch.inference_mode(), as diffusers pipelines do")
    fn, report = compile_graph(gm, example_inputs, config)
    REPORTS.append(report)
    if config.report is not None:
        config.report(report)
    return fn, report
