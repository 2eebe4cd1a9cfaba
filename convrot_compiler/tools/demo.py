"""The main job: quantize a FLUX-architecture transformer (or another family's built-in config) and compare it
with bf16."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch

from ..compiler.compile_model import compile as convrot_compile
from ..compiler.compile_model import weight_bytes
from ..compiler.weights import model_bytes
from ..families import CONFIGS as FAMILY_CONFIGS
from ..families import example_inputs, image_tokens, sample_output
from ..plans import summarize
from .models import build_family, build_flux, load_flux, make_flux_inputs, relative_error

DEMO_GATE_BIAS = 0.5  # so that the built-in model's output depends on its linears (models.build_flux)
YARDSTICK = "w8a8"     # the error of the same measure under 8-bit linears, in the same run


@dataclass
class DemoResult:
    model: str
    device: str
    tokens: str
    plan: str
    rotation: str
    group_size: int
    layers: dict
    weight_bytes_bf16: int
    weight_bytes_quantized: int
    linear_bytes_bf16: int
    linear_bytes_quantized: int
    rel_error: float
    bf16_ms: float
    quantized_ms: float
    quantize_s: float
    first_call_s: float
    inductor: bool
    regional: bool = False
    attention: str = "keep"
    yardstick_plan: str = "w8a8"
    yardstick_error: float | None = None  # the same measure for the yardstick plan, same model and inputs


def _timed_forward(model, kwargs, device: torch.device) -> tuple[torch.Tensor, float]:
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = sample_output(model(**kwargs))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return out, (time.perf_counter() - start) * 1e3


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return dev


def run_demo(model_path: str | None = None, config: str = "auto", device: str = "auto", plan: str = "w4a4",
             rotation: str = "regular", group_size: int = 256, height: int | None = None, width: int | None = None,
             text_tokens: int | None = None, seed: int = 0, progress: bool = True,
             whole_model: bool = False, attention: str = "keep", frames: int = 1) -> DemoResult:
    """``config``: a FLUX.1 config, or another family's (``families.CONFIGS``; ``frames`` for a video model)."""
    dev = resolve_device(device)
    if config == "auto":
        config = "flux-dev" if dev.type == "cuda" else "flux-tiny"
    family = config in FAMILY_CONFIGS
    if family and model_path:
        raise ValueError(f"--model loads a FLUX.1 checkpoint; --config {config} builds a random {config} instead: "
                         "pass one of them")
    small = config.endswith("-tiny")
    height = height or (128 if family and small else 256 if small else 1024)
    width = width or height
    text_tokens = text_tokens or (16 if family and small else 64 if small else 512)

    def load():
        if family:
            return build_family(config, seed=seed, device=dev)
        return load_flux(model_path, device=dev) if model_path else build_flux(config, seed=seed, device=dev,
                                                                               gate_bias=DEMO_GATE_BIAS)

    model = load()
    if family:
        name = f"{config} (random weights, seed {seed})"
        kwargs = example_inputs(model, dev, height=height, width=width, text_tokens=text_tokens, frames=frames,
                                seed=seed)
        tokens = f"{image_tokens(model, height, width, frames)} image + {text_tokens} text"
    else:
        name = model_path or f"{config} (random weights, seed {seed}, adaLN gates {DEMO_GATE_BIAS})"
        inputs = make_flux_inputs(model, height, width, text_tokens, seed=seed, device=dev)
        kwargs, tokens = inputs.kwargs, f"{inputs.image_tokens} image + {inputs.text_tokens} text"
    _timed_forward(model, kwargs, dev)  # warm-up
    ref, bf16_ms = _timed_forward(model, kwargs, dev)
    bytes_before = model_bytes(model)
    inductor = dev.type == "cuda"
    start = time.perf_counter()
    convrot_compile(model, plan=plan, group_size=group_size, rotation=rotation, inductor=inductor,
                    progress=progress, regional=False if whole_model else None, attention=attention)
    quantize_s = time.perf_counter() - start
    decisions = model.convrot_decisions
    start = time.perf_counter()
    _timed_forward(model, kwargs, dev)
    first_call_s = time.perf_counter() - start
    out, q_ms = _timed_forward(model, kwargs, dev)
    regional = bool(model.forward.units)
    rel_error = relative_error(out, ref)
    weight_bytes_quantized = weight_bytes(model)
    yardstick_error = None
    if plan != YARDSTICK:
        del model, out
        torch._dynamo.reset()
        yardstick = convrot_compile(load(), plan=YARDSTICK, group_size=group_size, rotation=rotation,
                                    inductor=inductor, progress=False, regional=False if whole_model else None)
        yardstick_error = relative_error(_timed_forward(yardstick, kwargs, dev)[0], ref)
        del yardstick
    return DemoResult(
        model=name, device=str(dev), tokens=tokens,
        plan=plan, rotation=rotation, group_size=group_size, layers=summarize(decisions),
        weight_bytes_bf16=bytes_before, weight_bytes_quantized=weight_bytes_quantized,
        linear_bytes_bf16=sum(d.bytes_before for d in decisions),
        linear_bytes_quantized=sum(d.bytes_after for d in decisions),
        rel_error=rel_error, bf16_ms=bf16_ms, quantized_ms=q_ms, quantize_s=quantize_s,
        first_call_s=first_call_s, inductor=inductor, regional=regional, attention=attention,
        yardstick_plan=YARDSTICK, yardstick_error=yardstick_error,
    )


def format_demo(r: DemoResult) -> str:
    from tabulate import tabulate

    mib = 1 / 2**20
    layers = ", ".join(f"{v} {k}" for k, v in r.layers.items() if v)
    rows = [
        ["bf16", "-", f"{r.weight_bytes_bf16 * mib:,.1f}", f"{r.linear_bytes_bf16 * mib:,.1f}", "0", f"{r.bf16_ms:,.1f}"],
        [f"convrot {r.plan}" + (" + fp8 attention" if r.attention == "fp8" else ""), layers, f"{r.weight_bytes_quantized * mib:,.1f}",
         f"{r.linear_bytes_quantized * mib:,.1f}", f"{r.rel_error:.4f}", f"{r.quantized_ms:,.1f}"],
    ]
    compiler = "convrot backend + Inductor" if r.inductor else "convrot backend (rewritten graph, no Inductor)"
    if r.regional:
        compiler += ", regional (one graph per repeated block class)"
    head = (f"model: {r.model} | device: {r.device} | tokens: {r.tokens} | rotation: {r.rotation}, "
            f"group {r.group_size}\n"
            f"compiled with torch.compile: {compiler}; weights prepared in {r.quantize_s:.2f} s, "
            f"first call (compile) {r.first_call_s:.1f} s\n"
            "forward time: bf16 eager vs compiled, one forward after one warm-up\n")
    table = tabulate(rows, headers=["variant", "linears", "weights MiB", "linear weights MiB",
                                    "output error", "forward ms"], tablefmt="github")
    ratio = r.weight_bytes_quantized / r.weight_bytes_bf16
    note = ("output error: ||out - ref|| / ||ref|| over the whole output, ref = the bf16 model on the same inputs"
            + (f"; yardstick, the same measure with the {r.yardstick_plan} plan in this run: {r.yardstick_error:.4f}"
               if r.yardstick_error is not None else ""))
    return f"{head}{table}\n{note}\nweight memory: {ratio:.3f}x bf16"


def demo_json(r: DemoResult) -> str:
    return json.dumps(asdict(r), indent=2)
