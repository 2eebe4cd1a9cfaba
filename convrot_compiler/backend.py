"""The ``convrot`` torch.compile backend: one Dynamo FX graph in, its compiled form out.

FX graph -> match linears -> plan each -> prepare weights -> rewrite into custom ops ->
Inductor (or the rewritten graph as is). ``compile_model.py`` applies it to a whole model.
"""

from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx

from .config import ConvRotConfig
from .ops import act_order_for, has_kernel, w4a16_layout
from .passes.attention import AttentionDecision, plan_attention, rewrite_attention
from .passes.match import LinearMatch, find_linears
from .passes.rewrite import Rewrite, rewrite_linears
from .plans import LayerDecision, Plan, decide, summarize, warn_if_ineffective
from .quant import quantized_nbytes
from .rotations import GroupHadamardRotation
from .weights import PREPARED, PrepSpec, is_released

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
    gemm: str = "kernel"                      # how the quantized GEMMs are lowered (option 'gemm')
    fused_producers: int = 0                  # quantizations that read the concatenation (+ GELU) feeding them
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


def _decide(m: LinearMatch, plan: Plan, group_size: int) -> LayerDecision:
    unsupported = None
    if m.weight_index is None or m.weight is None:
        unsupported = "weight is computed in the graph, not a parameter: nothing to prepare at compile time"
    elif m.weight.dim() != 2:
        unsupported = f"weight has shape {tuple(m.weight.shape)}, expected 2-D"
    nbytes = 0 if m.weight is None else m.weight.numel() * m.weight.element_size()
    d = decide(plan, m.name, m.in_features, m.out_features, m.dtype, group_size, rows=m.rows, nbytes=nbytes,
               unsupported=unsupported)
    if unsupported is None:
        d.extra["parameter"] = weakref.ref(m.weight)  # which parameter it was, for compile's decisions
    return d


def weight_spec(precision: str, rotation: str, group_size: int, weight: torch.Tensor) -> PrepSpec:
    """How a weight is prepared for ``precision`` on its device (layout, channel order)."""
    if precision == "w4a16":
        return PrepSpec(precision, "none", group_size, w4a16_layout(weight, group_size))
    return PrepSpec(precision, rotation, group_size,
                    act_order=act_order_for(weight.device, weight.dtype, group_size, rotation != "none"))


def weight_rotation(precision: str, rotation: GroupHadamardRotation) -> GroupHadamardRotation | None:
    """Weight-only int4 takes no rotation: its activations stay in float."""
    return None if precision == "w4a16" else rotation


def _fakeify_static(tensors: list[torch.Tensor]) -> list:
    """Give the prepared weights static fake shapes in Dynamo's fake mode before Inductor sees them.

    They are graph inputs Dynamo never saw, so AOTAutograd would fakeify them with fresh dynamic
    sizes that have no guard source; the first Inductor kernel indexing one (the GEMM template's
    32-bit-indexing check on the unpacked weight) then fails while building guards. The fake mode
    memoizes per real tensor (weakly: hold the returned fakes until Inductor is done), so fakeifying
    them first, statically, is what AOTAutograd then reuses."""
    ctx = torch._guards.TracingContext.try_get()
    if ctx is None or ctx.fake_mode is None:
        return []
    return [ctx.fake_mode.from_tensor(t, static_shapes=True) for t in tensors]


def compile_graph(gm: fx.GraphModule, example_inputs: list, config: ConvRotConfig) -> tuple[Callable, CompileReport]:
    plan: Plan = config.plan
    group_size, rotation_kind = config.group_size, config.rotation
    rotation = GroupHadamardRotation(rotation_kind, group_size)
    gm = copy_graph_module(gm)  # Dynamo reads its own graph's placeholders after the backend returns
    original = gm.forward
    before = gm.print_readable(print_output=False)
    matches = find_linears(gm, example_inputs)
    decisions = [_decide(m, plan, group_size) for m in matches]
    rewrites, specs, rewritten = [], [], []
    for m, d in zip(matches, decisions):
        if d.precision == "bf16":
            if not config.dry_run and m.weight is not None and is_released(m.weight):
                raise RuntimeError(f"{m.name}: its float weight was released by convrot_compiler.compile but this "
                                   f"graph keeps it in bf16 ({d.reason}); compile with the same options")
            continue
        spec = weight_spec(d.precision, rotation_kind, group_size, m.weight)
        if d.precision == "w4a16":
            d.extra["layout"] = spec.layout
        else:
            d.extra["act_order"] = spec.act_order
        if config.dry_run:
            d.bytes_after = quantized_nbytes(d.precision, d.out_features, d.in_features, group_size, spec.layout)
        else:
            qw = PREPARED.get(m.weight, spec, weight_rotation(d.precision, rotation))
            if m.weight.is_cuda and not has_kernel(qw):
                raise ValueError(f"{m.name}: the CUDA kernels take group_size 256, not {group_size} "
                                 f"({d.precision}, rotation {rotation.name}); other group sizes run on CPU only")
            d.bytes_after = qw.nbytes()
        rewrites.append(Rewrite(m, d.precision, group_size, d.precision != "w4a16" and rotation_kind != "none",
                                spec.act_order))
        specs.append(spec)
        rewritten.append(d)
    report = CompileReport(decisions, plan.name, rotation_kind, group_size, graph_before=before, gemm=config.gemm)
    result = rewrite_linears(gm, rewrites, fuse=config.fuse_gemms, gemm=config.gemm,
                             fuse_producers=config.fuse_producers,
                             gelu_epilogue=config.use_gelu_epilogue, fuse_norms=config.fuse_norms) if rewrites else None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for rw, d in zip(rewrites, rewritten):
        d.extra["graph_reads_weight"] = bool(placeholders[rw.match.weight_index].users)  # besides its linears
    if result is not None:
        report.activation_quantizations, report.shared_activation_quantizations = result.activation_quantizations, result.shared
        report.fused_gemms, report.fused_linears = result.fused_gemms, result.fused_linears
        report.fused_producers, report.gelu_epilogues = result.fused_producers, result.gelu_epilogues
        report.fused_norms = result.fused_norms
    planned_attention = plan_attention(gm, config.attention)
    report.attention = [d for _, d in planned_attention]
    attention_rewrites = rewrite_attention(gm, planned_attention)
    changed = bool(rewrites) or attention_rewrites > 0
    report.graph_after = gm.print_readable(print_output=False) if changed else before
    report.graph_modules["after"] = gm
    if config.dry_run or not changed:
        return original, report
    h = rotation.kernel_matrix()
    device_h: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def extra_inputs(args) -> list[torch.Tensor]:
        extra = []
        if not rewrites:
            return extra
        for rw, spec in zip(rewrites, specs):
            w = args[rw.match.weight_index]
            qw = PREPARED.get(w, spec, weight_rotation(spec.scheme, rotation))
            extra += [qw.values, qw.scale]
        if result.uses_h:
            # in the weights' (= activations') dtype: the kernel would otherwise cast it on every call
            # (a copy kernel per rotate+quantize); group-Hadamard entries are exact in bf16/fp16
            w = args[rewrites[0].match.weight_index]
            key = (w.device, w.dtype)
            if key not in device_h:
                device_h[key] = h.to(w.device, w.dtype if w.is_floating_point() else h.dtype)
            extra.append(device_h[key])
        return extra

    use_inductor = config.inductor
    if use_inductor is None:
        use_inductor = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    inner: Callable = gm.forward
    if use_inductor:
        from torch._inductor.compile_fx import compile_fx

        if config.gemm == "template":
            from .kernels.inductor_gemm import register

            register()

        extra = extra_inputs(example_inputs)
        static_fakes = _fakeify_static(extra)
        inner = compile_fx(gm, list(example_inputs) + extra)
        del static_fakes

    def run(*args):
        return inner(*args, *extra_inputs(args))

    return run, report


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
