"""The stages the ``convrot`` backend runs on one Dynamo graph, in order:

    match -> decide -> prepare -> rewrite -> attention -> lower

Each is a short function of what the ones before it produced; ``backend.compile_graph`` calls them
in that order and collects their results into a ``CompileReport``.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

from ..config import ConvRotConfig
from ..numerics.hadamard import hadamard_matrix
from ..numerics.pca import PCA_ROTATIONS, pca_nbytes, pca_rank
from ..numerics.quant import quantized_nbytes
from ..numerics.rotations import GroupHadamardRotation
from ..ops.dispatch import has_kernel
from ..plans import LayerDecision
from ..plans import decide as decide_layer
from .attention_output import read_attention_outputs_in_e4m3
from .attention_rewrite import AttentionDecision, decide_attention, rewrite_attention, value_projections
from .inductor_choices import inductor_choices
from .match import LinearMatch, find_linears
from .rewrite import Rewrite, RewriteResult, rewrite_linears
from .roles import PER_SAMPLE, per_sample_linears
from .weights import PREPARED, PrepSpec, is_released, record_spec


@dataclass
class QuantizedLinear:
    """A linear of the graph that the rewrite quantizes: what matched, what was decided, how its weight is
    prepared."""

    match: LinearMatch
    decision: LayerDecision
    spec: PrepSpec
    row_bounds: bool = False  # the graph takes its weight's row bounds (its output is fp8 attention's V)


def match(gm: fx.GraphModule, example_inputs: list, names: Callable | None = None) -> list[LinearMatch]:
    """Every linear op of the graph, with the parameter and module behind it (named by ``names`` where it
    knows the weight)."""
    return find_linears(gm, example_inputs, names)


def decide(matches: list[LinearMatch], config: ConvRotConfig) -> list[LayerDecision]:
    """The precision of each matched linear, with the reason (plans.decide)."""
    decisions = []
    for m in matches:
        unsupported = None
        if m.weight_index is None or m.weight is None:
            unsupported = "weight is computed in the graph, not a parameter: nothing to prepare at compile time"
        elif m.weight.dim() != 2:
            unsupported = f"weight has shape {tuple(m.weight.shape)}, expected 2-D"
        nbytes = 0 if m.weight is None else m.weight.numel() * m.weight.element_size()
        d = decide_layer(config.plan, m.name, m.in_features, m.out_features, m.dtype, config.group_size, rows=m.rows,
                         nbytes=nbytes, unsupported=unsupported)
        if unsupported is None:
            d.extra["parameter"] = weakref.ref(m.weight)  # which parameter it was, for compile's decisions
        decisions.append(d)
    warn_per_sample_activation_quantization(decisions)
    return decisions


def warn_per_sample_activation_quantization(decisions: list[LayerDecision]) -> None:
    """Mark the linears of a graph that see one row per sample: the fewest rows in a graph whose other linears
    see at least 8 times as many (tokens). A plan that quantizes their activations (W4A4, W8A8) loses accuracy
    where it costs most (the adaLN modulation scales the whole residual stream) and gains nothing (they are
    weight-bound): warned of, naming them and the rule that chose it. The presets name FLUX's such linears;
    other families' need a rule (plans.py)."""
    per_sample = per_sample_linears({d.name: d.rows for d in decisions if d.rows})
    flagged = []
    for d in decisions:
        if d.name in per_sample:
            d.extra["role"] = PER_SAMPLE
            if d.precision in ("w4a4", "w8a8"):
                flagged.append(d)
    if flagged:
        names = ", ".join(f"{d.name} ({d.precision}, rule {d.rule!r})" for d in flagged[:4])
        more = f" and {len(flagged) - 4} more" if len(flagged) > 4 else ""
        warnings.warn(f"{len(flagged)} linears that see one row per sample quantize their activations: {names}{more}. "
                      "They are weight-bound and, as adaLN modulation, set much of a model's error: give them a "
                      "weight-only rule ahead of the plan's, e.g. plan=[('*mod*', 'w8a16'), *make_plan('w4a4').rules]",
                      stacklevel=2)


def prepare(matches: list[LinearMatch], decisions: list[LayerDecision], config: ConvRotConfig) -> list[QuantizedLinear]:
    """The linears to quantize, each weight prepared once (weights.PREPARED; a dry run only sizes them).
    A linear kept in bf16 whose float weight ``compile`` released is an error: the graph cannot run it."""
    quantized = []
    for m, d in zip(matches, decisions):
        if d.precision == "bf16":
            if not config.dry_run and m.weight is not None and is_released(m.weight):
                raise RuntimeError(f"{m.name}: its float weight was released by convrot_compiler.compile but this "
                                   f"graph keeps it in bf16 ({d.reason}); compile with the same options")
            continue
        cal = config.calibration
        if cal is not None:
            cal.bind_weight(m.weight, m.name)  # a whole-model graph's names are the model's
        spec = config.spec_for(d.precision, m.weight)
        if spec.calibration is not None:
            d.extra["calibrated"] = cal.covers(cal.layer_of(m.weight))
        record_spec(d, spec)
        if config.dry_run:
            if spec.is_pca:
                d.extra["rank"] = pca_rank(d.in_features, config.high_precision_fraction, config.group_size)
            d.bytes_after = (pca_nbytes(d.out_features, d.in_features, config.high_precision_fraction,
                                        config.group_size) if spec.is_pca else
                             quantized_nbytes(d.precision, d.out_features, d.in_features, config.group_size,
                                              spec.layout))
        else:
            qw = PREPARED.get(m.weight, spec)
            record_spec(d, spec, qw)
            if m.weight.is_cuda and not has_kernel(qw):
                raise ValueError(f"{m.name}: the CUDA kernels take group_size 256, not {config.group_size} "
                                 f"({d.precision}, rotation {config.rotation}); other group sizes run on CPU only")
            d.bytes_after = qw.nbytes()
        quantized.append(QuantizedLinear(m, d, spec))
    return quantized


def rewrite(gm: fx.GraphModule, quantized: list[QuantizedLinear], config: ConvRotConfig) -> RewriteResult | None:
    """Each quantized linear into the convrot ops (passes/rewrite.py); records in its decision whether the
    rewritten graph still reads its float weight."""
    if not quantized:
        return None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = value_projections(gm) if config.attention == "fp8" and config.attention_scales == "bound" else set()
    for q in quantized:
        q.row_bounds = q.match.node in values and not q.spec.is_pca and q.decision.precision in ("w4a4", "w8a8")
    rewrites = [Rewrite(q.match, q.decision.precision, q.spec.act_order,
                        pca_rank=q.decision.extra["rank"] if q.spec.is_pca else None,
                        share=_input_share(q, config) if q.spec.is_pca else None, row_bounds=q.row_bounds)
                for q in quantized]
    result = rewrite_linears(gm, rewrites, config.group_size, rotated=graph_rotation_matrix(config) is not None,
                             fuse=config.fuse_gemms,
                             fuse_producers=config.fuse_producers, gelu_epilogue=config.gelu_epilogue,
                             fuse_norms=config.fuse_norms)
    for q in quantized:
        q.decision.extra["graph_reads_weight"] = bool(placeholders[q.match.weight_index].users)
    return result


def _input_share(q: QuantizedLinear, config: ConvRotConfig) -> str:
    """The calibration's name of the tensor a DiRotQ linear reads: linears with one share one basis. Weights
    that came prepared (a checkpoint) carry their basis: linears holding one basis tensor share it."""
    cal = config.calibration
    if cal is not None:
        return cal.shared.get(cal.layer_of(q.match.weight), q.match.name)
    if config.dry_run:
        return q.match.name
    return f"basis@{id(PREPARED.get(q.match.weight, q.spec).basis):x}"


def graph_rotation_matrix(config: ConvRotConfig) -> torch.Tensor | None:
    """The matrix the graph's activation quantizations take as ``h``: ConvRot's kernel matrix, the regular
    Hadamard of one int4 group for ``pca-hadamard``, None for ``pca`` and rotation ``none``."""
    if config.rotation in PCA_ROTATIONS:
        kind = PCA_ROTATIONS[config.rotation]
        return None if kind == "none" else hadamard_matrix(kind, config.group_size)
    return GroupHadamardRotation(config.rotation, config.group_size).kernel_matrix()


def attention(gm: fx.GraphModule, config: ConvRotConfig,
              linears_rewritten: bool) -> tuple[list[AttentionDecision], int]:
    """What ``config.attention`` does to each scaled-dot-product attention, and how many were rewritten to fp8; an
    attention kept in 16 bits takes its Q and K from one kernel only where ``linears_rewritten`` (the graph changes
    anyway: an empty plan leaves it as it was); with ``config.fuse_attention_output``, the quantized linears after
    an fp8 attention read its e4m3 output."""
    decided = decide_attention(gm, config.attention, config.attention_scales, config.fuse_attention_prologue,
                               fuse_16bit_prologue=config.fuse_attention_prologue and linears_rewritten)
    rewritten = rewrite_attention(gm, decided)
    read_in_e4m3 = read_attention_outputs_in_e4m3(gm) if config.fuse_attention_output and rewritten else {}
    for dequantize, decision in rewritten.items():
        n = read_in_e4m3.get(dequantize, 0)
        left = "" if not dequantize.users else "; dequantized for its other users" if n else "dequantized"
        decision.output = (f"e4m3 into {n} rotate+quantize" if n else "") + left
    return [planned.decision for planned in decided], len(rewritten)


def lower(gm: fx.GraphModule, example_inputs: list, quantized: list[QuantizedLinear], rewritten: RewriteResult | None,
          config: ConvRotConfig) -> Callable:
    """The rewritten graph as a callable: compiled by Inductor (default on CUDA) or run as is. The prepared
    weights (and the rotation matrix) are looked up from the weight parameters at every call and passed
    after the graph's own inputs, so the compiled graph holds no weight constants."""
    h = graph_rotation_matrix(config)
    device_h: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def extra_inputs(args) -> list[torch.Tensor]:
        extra = []
        for q in quantized:
            qw = PREPARED.get(args[q.match.weight_index], q.spec)
            extra += qw.graph_tensors()
            if q.row_bounds:
                extra.append(qw.row_bounds())
        if rewritten is not None and rewritten.uses_h:
            # in the weights' (= activations') dtype: the kernel would otherwise cast it on every call
            # (a copy kernel per rotate+quantize); group-Hadamard entries are exact in bf16/fp16
            w = args[quantized[0].match.weight_index]
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

        extra = extra_inputs(example_inputs)
        static_fakes = _fakeify_static(extra)
        with inductor_choices(config):
            inner = compile_fx(gm, list(example_inputs) + extra)
        del static_fakes

    def run(*args):
        return inner(*args, *extra_inputs(args))

    return run


def _fakeify_static(tensors: list[torch.Tensor]) -> list:
    """Give the prepared weights static fake shapes in Dynamo's fake mode before Inductor sees them.

    They are graph inputs Dynamo never saw, so AOTAutograd would fakeify them with fresh dynamic
    sizes that have no guard source; the first Inductor kernel indexing one then fails while building
    guards. The fake mode memoizes per real tensor (weakly: hold the returned fakes until Inductor is
    done), so fakeifying them first, statically, is what AOTAutograd then reuses."""
    ctx = torch._guards.TracingContext.try_get()
    if ctx is None or ctx.fake_mode is None:
        return []
    return [ctx.fake_mode.from_tensor(t, static_shapes=True) for t in tensors]
