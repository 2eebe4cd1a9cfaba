"""``convrot_compiler.compile``: a model, or a diffusers pipeline, in; the same object out, compiled.

model -> plan every linear -> prepare (rotate, quantize, pack) its weight once -> release the float
weights -> torch.compile with the convrot backend, one graph per repeated block class (regional) or
one for the whole forward -> the module's ``forward`` replaced by a ``CompiledForward`` that replays
each input signature as one CUDA graph on CUDA.

The module keeps its class, config, device, dtype, hooks and attention processors, so code that holds
it (a diffusers pipeline's ``transformer``) runs it compiled without knowing.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable

import torch
from torch import nn

from ..config import ConvRotConfig
from ..numerics.pca import PCA_ROTATIONS, PCAWeight
from ..numerics.quant import WEIGHT_ONLY
from ..plans import LayerDecision, decide_linears, warn_if_ineffective
from .backend import CompileReport, model_backend
from .cudagraphs import CUDAGraphReplay
from .input_checks import input_check
from .regional import CompileUnit, block_classes, block_instances, compiled_units, repeated_block_classes, unit_plans
from .roles import decide_model
from .weights import (
    PREPARED,
    is_released,
    model_bytes,
    placeholder,
    prepare_weight,
    record_spec,
    release,
    release_storage,
)


class CompiledForward:
    """A convrot-compiled module's ``forward``: the compiled callable, replayed as CUDA graphs on CUDA.

    ``inner`` is the compiled forward without replay (kernels launched one by one); ``replay`` the
    CUDA-graph replay of it, or None."""

    def __init__(self, inner: Callable, original: Callable, cuda_graphs: bool, max_graphs: int,
                 units: list[CompileUnit]):
        self.check = input_check(original.__self__)
        self.model_name = type(original.__self__).__name__
        self.inner = inner
        self.replay = CUDAGraphReplay(inner, max_graphs=max_graphs) if cuda_graphs else None
        self.units = units
        functools.update_wrapper(self, original)  # the signature pipelines inspect, the name, the docstring

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled():
            raise RuntimeError("a convrot-compiled model is inference-only: call it under torch.no_grad() or "
                               "torch.inference_mode(), as diffusers pipelines do")
        if self.check is not None:
            self.check(args, kwargs)
        try:
            return (self.replay or self.inner)(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit as e:
            limit = getattr(torch._dynamo.config, "recompile_limit", None)
            raise RuntimeError(
                f"torch.compile's recompile limit ({limit}) is reached: every new input shape compiles the "
                "graphs again (dynamic=False), and a regional compile has one or two graphs per block class and "
                "shape. Raise torch._dynamo.config.recompile_limit before compiling for more shapes") from e
        except torch._dynamo.exc.Unsupported as e:
            if self.units:
                raise
            raise RuntimeError(
                f"torch.compile cannot take {self.model_name}'s whole forward as one graph "
                f"({str(e).splitlines()[0]}): compile it regionally (regional=None, the default: one graph per "
                "repeated block class), or pass fullgraph=False to let Dynamo split it") from e

    def __deepcopy__(self, memo):
        raise TypeError("a convrot-compiled model cannot be copied (its float weights are released and its "
                        "graphs hold device memory): copy the model before convrot_compiler.compile")

    def __reduce__(self):
        raise TypeError("a convrot-compiled model cannot be pickled: save the original model, or its weights "
                        "before convrot_compiler.compile")


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` was compiled by ``convrot_compiler.compile``."""
    return isinstance(model.__dict__.get("forward"), CompiledForward)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's weights as it runs: its parameters and buffers (released weights count as the
    one element they keep), plus the prepared weights of a convrot-compiled model."""
    prepared = sum(d.extra.get("prepared_bytes", 0) for d in getattr(model, "convrot_decisions", []))
    return model_bytes(model) + prepared


def pipeline_transformers(pipeline) -> dict[str, nn.Module]:
    """A pipeline's transformers by component name: ``transformer``, and ``transformer_2`` where one denoises
    part of the steps (Wan 2.2's low-noise expert)."""
    return {name: m for name in ("transformer", "transformer_2") if isinstance(m := getattr(pipeline, name, None),
                                                                           nn.Module)}


def _target(obj) -> tuple[object | None, nn.Module]:
    """(the pipeline or None, the module to compile)."""
    from diffusers import DiffusionPipeline

    if isinstance(obj, DiffusionPipeline):
        transformers = pipeline_transformers(obj)
        if not transformers:
            raise ValueError(f"{type(obj).__name__} has no transformer to compile (its components: "
                             f"{sorted(obj.components)}); convrot compiles diffusion transformers")
        return obj, next(iter(transformers.values()))
    if not isinstance(obj, nn.Module):
        raise TypeError(f"convrot_compiler.compile takes an nn.Module or a diffusers pipeline, got "
                        f"{type(obj).__name__}")
    return None, obj


def _regions(model: nn.Module, regional: bool | tuple[str, ...] | None) -> list[str]:
    """The block classes to compile one graph each for; empty for a whole-model compile."""
    if regional is None:
        return repeated_block_classes(model)
    if regional is False:
        return []
    return block_classes(model, regional)


def compile(model, config: ConvRotConfig | None = None, **overrides):
    """Compile ``model`` with the convrot backend, in place, and return it.

    ``model`` is an ``nn.Module`` (returned, the same object, its forward compiled) or a diffusers
    pipeline (its ``transformer`` compiled in place, and its ``transformer_2`` where it has one; the pipeline
    returned). The options are a
    ``ConvRotConfig`` (default: ``ConvRotConfig()``) with ``overrides`` by field name, e.g.
    ``compile(model, plan="mix", attention="fp8")``. The layer decisions are ``model.convrot_decisions``,
    the compile report of each graph ``model.convrot_reports``. Inference only: call the model under
    ``torch.no_grad()`` or ``torch.inference_mode()``.

    ``regional`` (default: when the model has repeated blocks, its ``_repeated_blocks`` or a ``ModuleList``
    of one block class) compiles one graph per block class, and each other top-level module holding a
    quantized linear alone (regional.py); ``False`` compiles the whole forward as one graph; class names
    pick the blocks.

    With ``release_weights`` the float storage of every quantized weight is freed (the parameter keeps
    its shape, dtype and device as a stride-0 view), so the model's resident weight memory drops to the
    quantized size.

    ``cuda_graphs`` (default: when the model is on CUDA) replays each input signature's forward as one
    CUDA graph (cudagraphs.py), keeping at most ``max_graphs`` (least recently used dropped first);
    outputs are fresh tensors. Turn it off if the forward must see changes to anything but its arguments."""
    pipeline, module = _target(model)
    if is_compiled(module):
        raise RuntimeError(f"this {type(module).__name__} is already compiled by convrot_compiler.compile; "
                           "compile a fresh model")
    if config is not None and not isinstance(config, ConvRotConfig):
        raise TypeError(f"config must be a ConvRotConfig, got {type(config).__name__}")
    experts = pipeline_transformers(pipeline) if pipeline is not None else {}
    if len(experts) > 1:  # each denoises its own steps: both quantized, or the pipeline runs half of them in bf16
        options = (config or ConvRotConfig()).replace(**overrides)
        if options.calibration is not None:
            raise ValueError(f"{type(pipeline).__name__} has {len(experts)} transformers ({', '.join(experts)}), and "
                             "a calibration describes one of them: compile each with its own calibration "
                             "(compile(pipe.transformer, ...), compile(pipe.transformer_2, ...))")
        for expert in experts.values():
            compile(expert, config, **overrides)
        return pipeline
    config = _checkpoint_config(module, config, overrides)
    if config.calibration is not None:
        if config.release_weights:  # its moments are let go once every weight is prepared: not the caller's
            config = config.replace(calibration=config.calibration.shallow_copy())
        config.calibration.bind(module)
    reports: list[CompileReport] = []

    def collect(r: CompileReport) -> None:
        reports.append(r)
        _add_functional_linears(module, r, decisions, units, config.release_weights)
        if config.report is not None:
            config.report(r)

    graph_config = config.replace(report=collect)
    if any(t.is_meta for t in module.parameters()):
        raise ValueError(f"this {type(module).__name__} is on the meta device (shapes, no weights): load its weights "
                         "before compiling it; convrot inspect traces a meta model without them")
    if config.prepared:
        decisions, roles = decide_linears(module, config.plan, config.group_size), "decided by the checkpoint"
    else:
        decisions, plan, roles = decide_model(module, config.plan, config.group_size)
        config, graph_config = config.replace(plan=plan), graph_config.replace(plan=plan)
    if not decisions:
        raise ValueError(f"{type(module).__name__} has no nn.Linear: there is nothing for convrot to quantize")
    warn_if_ineffective(decisions, config.plan.name, config.group_size)
    check_calibrated_plan(decisions, config)
    classes = _regions(module, config.regional)
    units: list[CompileUnit] = []
    if classes:
        blocks, eager = compiled_units(module, block_instances(module, classes), decisions)
        units = unit_plans(config.plan, decisions, blocks, eager)
    _prepare(module, decisions, config)
    if config.calibration is not None and config.release_weights:
        # the weights are prepared and their float storage is gone: the compiled model need not pin the second
        # moments (17 GiB for FLUX.1-dev) or the bases the prepared weights hold
        config.calibration.release_moments()
    if config.device is not None:
        module.to(config.device)
    cuda_graphs = config.cuda_graphs
    if cuda_graphs is None:
        cuda_graphs = any(p.is_cuda for p in module.parameters())
    original = module.forward
    if units:
        for unit in units:
            # one options dict per unit: Dynamo reuses a graph across the unit's modules, not beyond
            options = {"config": graph_config.replace(plan=unit.plan)}
            for name in unit.modules:
                module.get_submodule(name).compile(backend=model_backend, options=options,
                                                   fullgraph=config.fullgraph, dynamic=config.dynamic)
        inner = original
    else:
        inner = torch.compile(original, backend=model_backend, options={"config": graph_config},
                              fullgraph=config.fullgraph, dynamic=config.dynamic)
    module.forward = CompiledForward(inner, original, cuda_graphs, config.max_graphs, units)
    if config.release_weights:
        guard_released(module, {d.name: module.get_submodule(d.name) for d in decisions if d.precision != "bf16"})
    module.convrot_decisions = decisions
    module.convrot_roles = roles
    module.convrot_reports = reports
    return module if pipeline is None else pipeline


def check_calibrated_plan(decisions: list[LayerDecision], config: ConvRotConfig) -> None:
    """Every linear that a calibrated method quantizes (DiRotQ, GPTQ) has a second moment in the calibration,
    of its width; and DiRotQ's rotations meet only w4a4 linears among those quantizing activations. Checked
    before any weight is prepared."""
    if config.rotation in PCA_ROTATIONS:
        for d in decisions:
            if d.precision not in ("bf16", "w4a4", *WEIGHT_ONLY):
                raise ValueError(f"{d.name}: rotation {config.rotation!r} (DiRotQ) is a W4A4 method and the plan "
                                 f"puts this linear at {d.precision}: use a plan whose activation-quantized linears "
                                 "are w4a4")
    if config.needs_calibration and not config.prepared:
        config.calibration.check_covers(decisions)


def _add_functional_linears(model: nn.Module, report: CompileReport, decisions: list[LayerDecision],
                            units: list[CompileUnit], release_weights: bool) -> None:
    """Add to ``decisions`` the linears of a traced graph whose weight is a parameter no nn.Linear owns
    (``F.linear(x, self.weight)``). They are found only at trace time. In a whole-model compile a quantized
    one is handled like the others: its float storage is freed as soon as its graph is compiled
    (``release_storage``, which leaves what Dynamo guards unchanged), unless the graph still reads it or
    another tensor shares its storage, which keeps it resident with a warning. In a regional compile they
    stay bf16, since a block's plan names its nn.Linear modules. Each decision says which."""
    owners = {id(model.get_submodule(d.name).weight) for d in decisions if "functional" not in d.extra}
    names = {id(p): n for n, p in model.named_parameters()}
    known = {d.name for d in decisions}
    for d in report.decisions:
        ref = d.extra.get("parameter")
        param = ref() if ref is not None else None
        if param is None or id(param) in owners or id(param) not in names:
            continue
        name = names[id(param)]
        module = next((m for u in units for m in u.modules if name.startswith(m + ".")), None)
        unit = next((u for u in units if module in u.modules), None)
        found = [name] if unit is None else [f"{m}.{name[len(module) + 1:]}" for m in unit.modules]
        if any(full in known for full in found):
            continue
        why = f"{d.reason}; a functional linear (F.linear on a parameter)"
        if unit is not None:
            why += (" in a regionally compiled block, whose plan names its nn.Linear modules only: compile with "
                    "regional=False to quantize it")
        elif d.precision != "bf16" and release_weights:
            resident = ("the compiled graph also reads it" if d.extra.get("graph_reads_weight") else
                        None if _owns_storage(model, param) else "another tensor shares its storage")
            if resident is None:
                release_storage(param)
                why += ", quantized when its graph was traced: its float storage was freed then"
            else:
                why += f": its float weight stays resident ({resident})"
                warnings.warn(f"{name}: quantized as a functional linear (F.linear on a parameter); its float "
                              f"weight stays resident: {resident}", stacklevel=2)
        for full in found:
            known.add(full)
            decisions.append(dataclasses.replace(d, name=full, reason=why, extra={
                "functional": True, "prepared_bytes": d.bytes_after if d.precision != "bf16" else 0}))


def _owns_storage(model: nn.Module, param: torch.Tensor) -> bool:
    """Whether ``param`` alone holds its storage: no other parameter or buffer of the model shares it, and
    it spans the whole storage."""
    storage = param.untyped_storage()
    if storage.nbytes() != param.numel() * param.element_size() or storage.data_ptr() == 0:
        return False
    tensors = [t for _, t in (*model.named_parameters(remove_duplicate=False),
                              *model.named_buffers(remove_duplicate=False))]
    return sum(t.untyped_storage().data_ptr() == storage.data_ptr() for t in tensors) == 1


def _checkpoint_config(module: nn.Module, config: ConvRotConfig | None, overrides: dict) -> ConvRotConfig:
    """The config to compile with: ``config`` (default ``ConvRotConfig()``) with ``overrides``, and for a model
    loaded from a checkpoint (``convrot_compiler.load``) the checkpoint's plan, group size and rotation,
    which its prepared weights were made with: naming others is an error."""
    merged = (config or ConvRotConfig()).replace(**overrides)
    checkpoint = getattr(module, "convrot_checkpoint", None)
    if checkpoint is None:
        return merged
    fixed = checkpoint.config_fields()
    default = ConvRotConfig()
    named = set(overrides) | ({f for f in fixed if getattr(config, f) != getattr(default, f)} if config else set())
    conflicts = [f for f in fixed if f in named and getattr(merged, f) != fixed[f]]
    if conflicts:
        raise ValueError(f"this model was loaded from {checkpoint.path}, quantized with plan {fixed['plan'].name!r}, "
                         f"group_size {fixed['group_size']} and rotation {fixed['rotation']!r}; compile it without "
                         f"{conflicts}, or quantize the model again with them")
    return merged.replace(**fixed)


def guard_released(model: nn.Module, released: dict[str, nn.Module]) -> None:
    """Released weights are placeholders: a linear holding one refuses to run outside the compiled graphs,
    and saving or loading a state dict that holds them raises, instead of either working on placeholders.
    The model's own hooks look at call time, so they also cover weights released when a graph is traced.
    A module is guarded once, however often this is called."""
    released = {name: m for name, m in released.items() if not getattr(m, "_convrot_guarded", False)}

    def refuse_save(module, prefix, keep_vars):
        n = sum(is_released(p) for p in module.parameters())
        if n:
            raise RuntimeError(f"the float weights of {n} linears of this model were released (by "
                               "convrot_compiler.compile, or never loaded from a quantized checkpoint), so its "
                               "state_dict would hold placeholders, not weights: save the model (state_dict, "
                               "save_pretrained) before compiling it, or compile with release_weights=False; a "
                               "quantized model is saved by convrot quantize")

    def refuse_load(module, state_dict, prefix, *args):
        if any(is_released(p) for p in module.parameters()):
            raise RuntimeError("weights loaded into a convrot-compiled model would not reach its prepared (quantized) "
                               "weights: load them into a fresh model, then compile it")

    def refuse_eager(name: str):
        def hook(module, args):
            if not torch.compiler.is_compiling():  # traced away inside the compiled graphs
                raise RuntimeError(f"{name}: its float weight was released (by convrot_compiler.compile, or never "
                                   "loaded from a quantized checkpoint), so it runs only inside the compiled model; "
                                   "compile the model with convrot_compiler.compile and call it, not this module")
        return hook

    for m in [model, *released.values()]:
        if not getattr(m, "_convrot_guarded", False):
            m.register_state_dict_pre_hook(refuse_save)
            m.register_load_state_dict_pre_hook(refuse_load)
    for name, m in released.items():
        m.register_forward_pre_hook(refuse_eager(name))
        m._convrot_guarded = True
    model._convrot_guarded = True


def _prepare(model: nn.Module, decisions: list[LayerDecision], config: ConvRotConfig) -> None:
    """Prepare every quantized weight once (the compiled graphs look them up) and free its float storage
    right away, so that the peak is the float model plus one layer's prepared weight, not plus all of them.
    With ``config.device``, each weight goes to that device alone to be prepared there, and its parameter
    becomes a placeholder on it: the device never holds the float model. A weight prepared already (a
    model loaded from a checkpoint) is found, not prepared again."""
    from tqdm.auto import tqdm

    target = None if config.device is None else torch.device(config.device)
    todo = [d for d in decisions if d.precision != "bf16"]
    bases: set[int] = set()  # DiRotQ bases counted so far: linears reading one input share one
    for d in tqdm(todo, desc="preparing weights", unit="layer", disable=not config.progress):
        lin = model.get_submodule(d.name)
        if target is not None and lin.weight.device != target:
            param = placeholder(tuple(lin.weight.shape), lin.weight.dtype, target)
            if config.calibration is not None:
                config.calibration.bind_weight(param, d.name)
            spec = config.spec_for(d.precision, param)
            qw = prepare_weight(lin.weight.to(target), spec, layer=d.name)
            PREPARED.put(param, spec, qw)
            lin.weight = param
        else:
            spec = config.spec_for(d.precision, lin.weight)
            qw = PREPARED.get(lin.weight, spec)
            if config.release_weights and not is_released(lin.weight):
                release(lin.weight)
        record_spec(d, spec, qw)
        nbytes = qw.nbytes()
        if isinstance(qw, PCAWeight):
            nbytes = qw.nbytes(include_basis=id(qw.basis) not in bases)
            bases.add(id(qw.basis))
        d.extra["prepared_bytes"] = nbytes
        d.bytes_after = nbytes + (0 if lin.bias is None else lin.bias.numel() * lin.bias.element_size())
