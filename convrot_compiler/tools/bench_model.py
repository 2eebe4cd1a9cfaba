"""Model-level benchmark: one denoising forward of a FLUX-architecture transformer per variant.

Variants, each on a fresh model in the same process: bf16 eager, bf16 torch.compile, fp8 row-wise
dynamic (torchao's Float8DynamicActivationFloat8WeightConfig(PerRow) + torch.compile, when torchao is
installed; otherwise reported as skipped), and convrot plans (w8a8, w4a4, mix) compiled with the
convrot backend + Inductor. Per variant: median latency, speedups, weight memory, peak memory,
first-call (compile) time, output relative error vs bf16 eager on the same inputs.
With --profile, a kernel-time breakdown of each w4a4 variant's forward (w4a4, w4a4-dirotq, ...), and of the bf16
torch.compile forward when it runs too (the baseline's parts are what a speedup target can be set against).

    convrot bench --config flux-dev --resolution 1024 --variants bf16,bf16-compile,fp8,w4a4
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from ..compiler.compile_model import compile as convrot_compile
from ..compiler.compile_model import weight_bytes
from ..compiler.weights import model_bytes
from ..families import CONFIGS as FAMILY_CONFIGS
from ..families import example_inputs, image_tokens, sample_output
from ..numerics.pca import needs_calibration
from ..ops import dispatch
from .baselines import swap_fp8_rowwise
from .cli_options import doc_summary
from .demo import resolve_device
from .models import build_model, image_tokens_for, relative_error


def environment() -> dict:
    env = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = p.name
        env["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        env["sms"] = p.multi_processor_count
        env["cuda"] = torch.version.cuda
    else:
        env["gpu"] = None
    return env


def write_results(name: str, payload: dict, markdown: str, out_dir: str | None = None) -> list[str]:
    """Write NAME.json and NAME.md under out_dir (default: $OUT if set, else ./convrot-out/bench)."""
    out_dir = out_dir or os.environ.get("OUT") or os.path.join("convrot-out", "bench")
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md")]
    with open(paths[0], "w") as f:
        json.dump(payload, f, indent=2)
    with open(paths[1], "w") as f:
        f.write(markdown)
    return paths


CONVROT = ("w8a8", "w4a4", "mix")
# "<plan>-<launch>": convrot_compile options and the note each launch suffix adds to the plan's defaults
LAUNCHES = {
    "nograph": ({"cuda_graphs": False}, ""),
    "epilogue": ({"fuse_producers": False}, "GELU in the GEMM epilogue, cat by Inductor"),
    "unfused": ({"fuse_producers": False, "gelu_epilogue": False}, "GELU and cat by Inductor"),
    "flat": ({}, "int8 GEMM one program per tile at every M (not persistent)"),  # run under kernel_choice
    "nows": ({}, "int8 GEMM never warp-specialized (the schedule before it)"),  # likewise
    "unpack": ({}, "packed weights unpacked, then the int8 GEMM (not the sm_90 packed GEMM)"),  # likewise
    "tritonrq": ({}, "rotate+quantize by the Triton kernel (not the sm_90 one)"),  # likewise
    "tile128": ({}, "packed GEMM in 128-token tiles everywhere (not 256 where the last wave allows)"),  # likewise
    "fp8joincall": ({"attention": "fp8"}, "attention in fp8, a fused GEMM's scales and biases joined at every call "
                    "(not once)"),  # likewise
    "whole": ({"regional": False}, "the whole forward as one graph (default: one graph per block class)"),
    "fp8attn": ({"attention": "fp8"}, "attention in fp8 (cuDNN on CUDA; not part of ConvRot)"),
    "fp8norms": ({"attention": "fp8", "fuse_norms": True},
                 "attention in fp8, the adaLN LayerNorm + modulation computed by the rotate+quantize after it"),
    "norms": ({"fuse_norms": True}, "the adaLN LayerNorm + modulation computed by the rotate+quantize after it"),
    "qkinductor": ({"fuse_attention_prologue": False},
                   "Q and K's RMSNorm and RoPE by Inductor (not one kernel)"),
    "fp8inductor": ({"attention": "fp8", "fuse_attention_prologue": False},
                    "attention in fp8, Q and K's RMSNorm, RoPE and e4m3 cast by Inductor (not one kernel)"),
    "fp8dequant": ({"attention": "fp8", "fuse_attention_output": False},
                   "attention in fp8, its output dequantized by Inductor before the next rotate+quantize (not read "
                   "in e4m3)"),
    "fp8looped": ({"attention": "fp8", "persistent_rows": False},
                  "attention in fp8, rows of 1025-4096 values looped by Inductor (not persistent)"),
    "fp8vabsmax": ({"attention": "fp8", "attention_scales": "qk-bound"},
                   "attention in fp8, V scaled by its absmax (not by its projection's operands)"),
    "fp8absmax": ({"attention": "fp8", "attention_scales": "absmax"},
                  "attention in fp8, Q, K and V scaled by their absmax (not by proven bounds)"),
    # calibrated on the measured inputs (prepare): these variants time the method, not its fidelity
    "gptq": ({"weights": "gptq"}, "GPTQ weights"),
    "dirotq": ({"rotation": "pca", "weights": "gptq"}, "DiRotQ: PCA basis, 12.5% bf16, int4 groups of 64, GPTQ"),
}
VARIANTS = ("bf16", "bf16-compile", "bf16-compile-cg", "bf16-compile-regional", "fp8", "fp8-scaled-mm",
            "fp8-scaled-mm-regional", *CONVROT,
            *(f"{p}-{how}" for how in LAUNCHES for p in CONVROT))


@contextlib.contextmanager
def kernel_choice(launch: str) -> Iterator[None]:
    """The kernels a launch suffix compares, chosen by replacing ops.dispatch's choices for the block:
    ``flat``, the one-program-per-tile int8 GEMM at every M (the default is persistent at large M); ``nows``,
    the persistent form without warp specialization; ``unpack``, the int8 GEMM on unpacked weights by the
    usual schedule (each of the three instead of the sm_90 packed GEMM); ``tritonrq``, the Triton
    rotate+quantize kernel where the sm_90 one would run; ``tile128``, the sm_90 packed GEMM in tiles of 128
    tokens where it would take 256; ``fp8joincall``, a fused GEMM's scales and biases joined at every call. Other
    launches change nothing. A CUDA graph
    captured inside the block keeps the kernels it captured."""
    rule = dispatch.gemm_schedule
    choices = {
        "flat": {"use_sm90_packed_gemm": lambda *a: False, "gemm_schedule": lambda m, n, gelu, p: (False, False)},
        "nows": {"use_sm90_packed_gemm": lambda *a: False,
                 "gemm_schedule": lambda m, n, gelu, p: (rule(m, n, True, p)[0], False)},
        "unpack": {"use_sm90_packed_gemm": lambda *a: False},
        "tritonrq": {"use_sm90_rotate": lambda *a: False},
        "tile128": {"packed_gemm_wide_tokens": lambda *a: False},
        "fp8joincall": {"joined_vectors": lambda parts, join: join()},
    }.get(launch, {})
    saved = {name: getattr(dispatch, name) for name in choices}
    try:
        for name, choice in choices.items():
            setattr(dispatch, name, choice)
        yield
    finally:
        for name, original in saved.items():
            setattr(dispatch, name, original)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def parse_variants(spec: str, known: tuple[str, ...]) -> list[str]:
    """The comma-separated variants of ``spec``; an unknown one stops the run before any work."""
    variants = spec.split(",")
    bad = [v for v in variants if v not in known]
    if bad:
        raise SystemExit(f"unknown variant(s) {', '.join(bad)}; choose from {_variant_menu(known)}")
    return variants


def _variant_menu(known: tuple[str, ...]) -> str:
    """The known variants, a launch known with every convrot plan written once as <plan>-<launch>."""
    every_plan = [launch for launch in LAUNCHES if all(f"{plan}-{launch}" in known for plan in CONVROT)]
    others = [v for v in known if v.partition("-")[0] not in CONVROT or v.partition("-")[2] not in every_plan]
    if not every_plan:
        return ", ".join(others)
    return (f"{', '.join(others)}, or <plan>-<launch> with a plan of {', '.join(CONVROT)} and a launch of "
            f"{', '.join(every_plan)}")


def time_interleaved(calls: list[tuple[str, Callable]], kwargs, dev, iters: int) -> list[list[float]]:
    """Milliseconds per forward of each (launch suffix, callable), timed in turns: one warm-up round, then ``iters``
    rounds of one forward each, the order rotated by one every round, so that a drift of the machine (clocks,
    temperature) or a variant's position falls on all of them alike. Each call runs under its launch's kernel
    choice (a CUDA graph captured on the warm-up keeps the kernels it captured)."""
    def one(k: int) -> float:
        launch, fn = calls[k]
        with kernel_choice(launch):
            return _one_forward_ms(fn, kwargs, dev)

    times = [[] for _ in calls]
    with torch.no_grad():
        for k in range(len(calls)):
            one(k)
        sync(dev)
        for r in range(iters):
            for j in range(len(calls)):
                k = (r + j) % len(calls)
                times[k].append(one(k))
    return times


def _one_forward_ms(fn, kwargs, dev) -> float:
    """Milliseconds of one forward: CUDA events on GPU, perf_counter on CPU."""
    if dev.type != "cuda":
        t = time.perf_counter()
        fn(**kwargs)
        return (time.perf_counter() - t) * 1e3
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn(**kwargs)
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def time_forward(fn, kwargs, dev, iters: int) -> list[float]:
    """Milliseconds per forward: CUDA events on GPU, perf_counter on CPU; one warm-up call first."""
    with torch.no_grad():
        fn(**kwargs)
        sync(dev)
        return [_one_forward_ms(fn, kwargs, dev) for _ in range(iters)]


def prepare(variant: str, model, inputs: dict | None = None):
    """(callable, prepared weight bytes beyond the model's own storage, note). The calibrated variants
    (``-gptq``, ``-dirotq``) calibrate on ``inputs``, one forward."""
    if variant == "bf16":
        return model, 0, ""
    if variant == "bf16-compile":
        return torch.compile(model), 0, ""
    if variant == "bf16-compile-regional":
        model.compile_repeated_blocks()
        return model, 0, "diffusers compile_repeated_blocks: one graph per block class"
    if variant == "bf16-compile-cg":
        return torch.compile(model, mode="reduce-overhead"), 0, "Inductor CUDA graphs"
    if variant == "fp8":
        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
        except ImportError as e:
            raise RuntimeError(f"torchao not available ({e})") from e
        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        return torch.compile(model), 0, "torchao fp8 row-wise dynamic"
    if variant in ("fp8-scaled-mm", "fp8-scaled-mm-regional"):
        n = swap_fp8_rowwise(model)
        note = f"fp8 row-wise dynamic on torch._scaled_mm ({n} linears), not torchao"
        if variant.endswith("-regional"):
            model.compile_repeated_blocks()
            return model, 0, note + "; diffusers compile_repeated_blocks"
        return torch.compile(model), 0, note
    plan, _, launch = variant.partition("-")
    options, launch_note = LAUNCHES.get(launch, ({}, ""))
    if needs_calibration(options.get("rotation"), options.get("weights")):
        from ..calibration import calibrate

        if inputs is None:
            raise ValueError(f"variant {variant!r} calibrates on the measured inputs: pass them")
        options = {**options, "calibration": calibrate(model, [inputs], plan=plan, progress=False)}
    convrot_compile(model, plan=plan, progress=False, **options)
    prepared = weight_bytes(model) - model_bytes(model)
    note = "CUDA graph replay" if model.forward.replay else "kernels launched one by one"
    if launch_note:
        note += f"; {launch_note}"
    return model, prepared, note


INDUCTOR_FUSED = "norms, RoPE, pointwise (Inductor)"
KERNEL_GROUPS = {"DiRotQ rotate+quantize": ("_pca_rotate_quantize",), "DiRotQ GEMM": ("_pca_gemm",),
                 "quantized GEMM": ("_int_gemm_kernel", "_int_gemm_tma_kernel", "_packed_gemm_kernel"),
                 INDUCTOR_FUSED: ("triton_poi_", "triton_red_", "triton_per_"),
                 "Q, K RMSNorm+RoPE": ("_rms_rope",),
                 "attention": ("flash", "attention", "fmha", "sdpa"),
                 "rotate+quantize": ("_rotate_quant",), "int4 unpack": ("_unpack_int4",),
                 "weight-only GEMV": ("_w4a16", "_tiles_kernel", "_weight_only_kernel"),
                 "bf16 GEMM (cuBLAS)": ("gemm", "sm90_xmma", "cutlass", "nvjet")}


def kernel_group(name: str) -> str:
    """The breakdown part a CUDA kernel belongs to, by name, in KERNEL_GROUPS order. Inductor's generated kernels are named after every op they fuse, including the custom op or
    SDPA their output feeds (``triton_red_fused__fused_rms_norm__scaled_dot_product_cudnn_attention_...``
    is the RMSNorm + RoPE before attention), so they form their own group instead of matching those."""
    low = name.lower()
    for group, keys in KERNEL_GROUPS.items():
        if any(k.lower() in low for k in keys):
            return group
    return "other"


def kernel_breakdown(fn, kwargs, top: int = 20) -> tuple[dict[str, float], list[dict]]:
    """CUDA kernel time (ms) of one forward, grouped by what the kernel does, and the ``top`` kernels
    by time with their group, so that what lands in each part (and in "other") can be checked."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fn(**kwargs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn(**kwargs)
            torch.cuda.synchronize()
    out = {k: 0.0 for k in (*KERNEL_GROUPS, "other")}
    kernels = []
    for evt in prof.key_averages():
        if evt.device_type.name != "CUDA":
            continue
        group, ms = kernel_group(evt.key), evt.device_time_total / 1e3
        out[group] += ms
        kernels.append({"kernel": evt.key[:90], "group": group, "ms": ms, "calls": evt.count})
    return out, sorted(kernels, key=lambda k: -k["ms"])[:top]


def run(args) -> dict:
    dev = resolve_device(args.device)
    if args.config == "auto":  # the FLUX.1-dev config takes 22 GiB per copy: a GPU's size
        args.config = "flux-dev" if dev.type == "cuda" else "flux-tiny"
    variants = parse_variants(args.variants, VARIANTS)
    for res in args.resolution:
        image_tokens_for(*_height_width(res))
    rows, breakdowns = [], []
    for res in args.resolution:
        torch._dynamo.reset()
        base = build_model(args.config, seed=0, device=dev)
        kwargs, tokens = _inputs(base, res, args, dev)
        with torch.no_grad():
            ref = sample_output(base(**kwargs)).float()
        bf16_bytes = model_bytes(base)
        del base
        held = []  # --interleave: (row, callable, model) of each variant that ran its first call, timed together
        for variant in variants:
            if not held:
                torch._dynamo.reset()
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            row = {"variant": variant, "resolution": res, "batch": args.batch, "tokens": tokens}
            print(f"[{variant} @ {res}] preparing, compiling, first call ...", flush=True)
            model = build_model(args.config, seed=0, device=dev)
            fn = _first_call(variant, model, kwargs, ref, dev, row)
            if fn is not None and args.interleave:
                held.append((row, fn, model))
            elif fn is not None:
                with kernel_choice(_launch(variant)):
                    try:
                        _timed(row, time_forward(fn, kwargs, dev, args.iters), model, dev)
                        if args.profile and dev.type == "cuda" and _profiles(variant, breakdowns):
                            breakdowns.append(_profiled(variant, fn, kwargs, row["ms"]))
                    except (RuntimeError, ValueError) as e:
                        row.update(ms=None, note=f"skipped: {e}".splitlines()[0][:160])
            rows.append(row)
            if not args.interleave:
                print(row, flush=True)
                # a run cut short keeps what it measured
                partial = _result(args, dev, rows, breakdowns, bf16_bytes)
                write_results(args.name, partial, to_markdown(partial), args.out)
            # the compiled callable holds the model (a second copy would not fit a big one), its replay the CUDA graphs'
            # memory: neither may count in the next variant's peak
            del model, fn
        if held:
            times = time_interleaved([(_launch(r["variant"]), fn) for r, fn, _ in held], kwargs, dev, args.iters)
            for (row, fn, model), variant_times in zip(held, times):
                _timed(row, variant_times, model, dev, interleaved=True)
                print(row, flush=True)
                if args.profile and dev.type == "cuda" and _profiles(row["variant"], breakdowns):
                    with kernel_choice(_launch(row["variant"])):
                        breakdowns.append(_profiled(row["variant"], fn, kwargs, row["ms"]))
            del held, fn, model
    return _result(args, dev, rows, breakdowns, bf16_bytes)


def _launch(variant: str) -> str:
    return variant.rsplit("-", 1)[-1]


def _first_call(variant: str, model, kwargs: dict, ref: torch.Tensor, dev: torch.device, row: dict):
    """Prepare and compile ``variant`` on ``model`` and run its first call (under its kernel choice): the row gets
    its first-call time, output error, weight bytes and note. Returns the callable, or None when the variant cannot
    run here (the row then says why)."""
    with kernel_choice(_launch(variant)):
        try:
            t0 = time.perf_counter()
            fn, prepared, note = prepare(variant, model, kwargs)
            with torch.no_grad():
                out = sample_output(fn(**kwargs))
            sync(dev)
        except (RuntimeError, ValueError) as e:  # e.g. torchao missing, a plan regional cannot compile
            row.update(ms=None, note=f"skipped: {e}".splitlines()[0][:160])
            return None
    row["first_call_s"] = time.perf_counter() - t0
    # now: Inductor's CUDA graphs (bf16-compile-cg) overwrite an output on the next call
    row.update(rel_err_vs_bf16=relative_error(out, ref), weight_bytes=model_bytes(model) + prepared, note=note)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    return fn


def _timed(row: dict, times: list[float], model, dev: torch.device, interleaved: bool = False) -> None:
    """The row's median, spread and peak memory from its timed forwards, and the note says how they ran."""
    note = row["note"]
    replay = getattr(getattr(model, "forward", None), "replay", None)
    if replay is not None and replay.unreplayable:  # the note said replay before the first call
        why = next(iter(replay.unreplayable.values()))
        note = note.replace("CUDA graph replay", f"kernels launched one by one: CUDA-graph replay is off, {why}")
    if interleaved:  # every held variant's memory counts in the peak: none is its own
        note = "; ".join(n for n in (note, "timed interleaved with the other variants") if n)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" and not interleaved else None
    row.update(ms=statistics.median(times), ms_spread=max(times) - min(times), note=note, peak_bytes=peak)


def resolution(text: str) -> int | str:
    """A ``--resolution``: ``1024`` (square) or ``480x832`` (height x width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x")) if "x" in text.lower() else (int(text),) * 2
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a size in pixels, 1024 or 480x832") from None
    return h if h == w else f"{h}x{w}"


def _height_width(res: int | str) -> tuple[int, int]:
    if isinstance(res, int):
        return res, res
    h, w = res.split("x")
    return int(h), int(w)


def _inputs(model, res: int | str, args, dev) -> tuple[dict, int]:
    """One forward's inputs at ``res`` (square, or height x width; families.example_inputs) and its tokens per
    sample."""
    h, w = _height_width(res)
    kwargs = example_inputs(model, dev, height=h, width=w, text_tokens=args.text_tokens, frames=args.frames,
                            batch=args.batch)
    return kwargs, image_tokens(model, h, w, args.frames) + args.text_tokens


def _profiles(variant: str, breakdowns: list[dict]) -> bool:
    """Whether ``--profile`` breaks this variant's forward down: bf16 torch.compile (what a speedup target is set
    against) and each variant of the w4a4 plan, once each."""
    return (variant == "bf16-compile" or variant.startswith("w4a4")) and all(
        b["variant"] != variant for b in breakdowns)


def _profiled(variant: str, fn, kwargs, forward_ms: float) -> dict:
    parts, top = kernel_breakdown(fn, kwargs)
    return {"variant": variant, "forward_ms": forward_ms, "kernels_ms": parts, "top_kernels": top}


def _result(args, dev, rows: list[dict], breakdowns: list[dict], bf16_bytes: int) -> dict:
    for r in rows:
        same = {x["variant"]: x for x in rows if x["resolution"] == r["resolution"] and x.get("ms")}
        for b in ("bf16", "bf16-compile", "fp8", "fp8-scaled-mm"):
            # a run of regional compiles only compares against the baselines compiled the same way
            base = same.get(b) or same.get(f"{b}-regional")
            if r.get("ms") and base:
                r[f"speedup_vs_{b}"] = base["ms"] / r["ms"]
        if r.get("ms"):
            r["weight_ratio_vs_bf16"] = r["weight_bytes"] / bf16_bytes
            r["us_per_token"] = r["ms"] * 1e3 / (r["tokens"] * r["batch"])
    return {"env": environment(), "config": args.config, "device": str(dev), "rows": rows, "breakdowns": breakdowns}


def _rows_table(rows: list[dict], with_call: bool = False) -> str:
    from tabulate import tabulate

    gib = 2**30
    return tabulate(
        [[*([r["call"]] if with_call else []), r["variant"], r["resolution"], r.get("batch", 1), r["tokens"],
          f"{r['ms']:.1f}" if r.get("ms") else "-", f"{r.get('ms_spread', 0):.1f}" if r.get("ms") else "-",
          f"{r['us_per_token']:.2f}" if r.get("us_per_token") else "-",
          *(f"{r[k]:.2f}" if r.get(k) else "-" for k in ("speedup_vs_bf16", "speedup_vs_bf16-compile",
                                                         "speedup_vs_fp8", "speedup_vs_fp8-scaled-mm")),
          f"{r['weight_bytes'] / gib:.2f}" if r.get("ms") else "-",
          f"{r['weight_ratio_vs_bf16']:.3f}" if r.get("ms") else "-",
          f"{r['peak_bytes'] / gib:.1f}" if r.get("peak_bytes") else "-",
          f"{r['first_call_s']:.0f}" if r.get("first_call_s") else "-",
          f"{r['rel_err_vs_bf16']:.3f}" if r.get("ms") else "-", r.get("note", "")]
         for r in rows],
        headers=[*(["call"] if with_call else []), "variant", "res", "batch", "tokens", "ms", "spread", "us/token",
                 "x bf16", "x bf16-compile", "x fp8 (torchao)", "x fp8 (_scaled_mm)", "weights GiB",
                 "x bf16 weights", "peak GiB", "first call s", "err vs bf16", "note"], tablefmt="github")


def to_markdown(result: dict) -> str:

    env = result["env"]
    table = _rows_table(result["rows"])
    md = (f"# Model benchmark: {result['config']}, one denoising forward\n\n"
          f"GPU {env.get('gpu')} | torch {env['torch']} | triton {env['triton']} | diffusers {env['diffusers']} | "
          f"{env['date']}\n\n{table}\n")
    for breakdown in result.get("breakdowns", []):
        md += _breakdown_markdown(breakdown)
    md += ("\nOutput error vs bf16 on random weights compounds chaotically through the blocks: not a fidelity "
           "measure.\n")
    return md


def _breakdown_markdown(breakdown: dict) -> str:
    from tabulate import tabulate

    b = breakdown["kernels_ms"]
    total = sum(b.values())
    md = (f"\n{breakdown['variant']}, CUDA kernel time of one forward "
          f"(kernels sum to {total:.1f} ms; the forward took {breakdown['forward_ms']:.1f} ms):\n\n")
    md += tabulate([[k, f"{v:.1f}", f"{v / total:.0%}"] for k, v in sorted(b.items(), key=lambda kv: -kv[1])],
                   headers=["part", "ms", "share"], tablefmt="github") + "\n"
    if breakdown.get("top_kernels"):
        md += "\nThe kernels taking the most time:\n\n" + tabulate(
            [[k["kernel"], k["group"], f"{k['ms']:.2f}", k["calls"]] for k in breakdown["top_kernels"]],
            headers=["kernel", "part", "ms", "calls"], tablefmt="github", disable_numparse=True) + "\n"
    return md


def merge(results: dict[str, dict]) -> str:
    """One markdown report from result files of separate calls ({name: result}): every row with the
    call it came from (speedups are always against baselines of the same call), and the cost growth:
    latency per token of each variant by resolution and batch."""
    from tabulate import tabulate

    rows = [dict(r, call=name) for name, res in results.items() for r in res["rows"]]
    envs = {f"GPU {res['env'].get('gpu')} | torch {res['env']['torch']} | triton {res['env']['triton']} | "
            f"diffusers {res['env']['diffusers']} | {res['env']['date']}" for res in results.values()}
    points = sorted({(r["resolution"], r.get("batch", 1)) for r in rows if r.get("ms")},
                    key=lambda p: (math.prod(_height_width(p[0])), p[1]))
    growth = []
    for variant in dict.fromkeys(r["variant"] for r in rows if r.get("ms")):
        cells = []
        for res, batch in points:
            hits = [r for r in rows if r["variant"] == variant and r["resolution"] == res
                    and r.get("batch", 1) == batch and r.get("ms")]
            cells.append("; ".join(f"{r['us_per_token']:.2f}" + (f" ({r['speedup_vs_bf16-compile']:.2f}x)"
                                                                 if r.get("speedup_vs_bf16-compile") else "")
                                   for r in hits) or "-")
        growth.append([variant, *cells])
    md = "# Model benchmark, merged from separate calls\n\n" + "\n".join(sorted(envs)) + "\n\n"
    md += _rows_table(rows, with_call=True) + "\n\n"
    md += ("Latency per token in microseconds (speedup vs bf16 torch.compile of the same call):\n\n"
           + tabulate(growth, headers=["variant", *(f"{res}² batch {b}" for res, b in points)], tablefmt="github")
           + "\n")
    return md


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="convrot bench", description=doc_summary(__doc__))
    p.add_argument("--config", default="auto", help="a built-in config: FLUX.1's (auto: flux-dev on CUDA, flux-tiny "
                   f"elsewhere) or another family's ({', '.join(FAMILY_CONFIGS)})")
    p.add_argument("--frames", type=int, default=1, help="video frames, for a video model (wan*)")
    p.add_argument("--resolution", type=resolution, nargs="+", default=[1024],
                   help="pixels: 1024 (square) or 480x832 (height x width), one or more")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--interleave", action="store_true", help="keep every variant compiled and time them in turns "
                   "(one forward each, the order rotated every round) instead of one after another: for A/B "
                   "comparisons of a few variants that fit in memory together; peak memory is then not reported")
    p.add_argument("--name", default="model")
    p.add_argument("--out", help="result folder (default $OUT if set, else ./convrot-out/bench)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="instead of running: merge result files of separate "
                   "calls into one report (<name>.md) with the latency per token by resolution and batch")
    args = p.parse_args(argv)
    if args.iters < 1:
        p.error(f"--iters must be at least 1, got {args.iters}")
    if args.merge:
        results = {}
        for path in args.merge:
            with open(path) as f:
                data = json.load(f)
            if "rows" not in data or "env" not in data:
                p.error(f"{path} is not a model benchmark result (no 'rows'/'env')")
            results[os.path.splitext(os.path.basename(path))[0]] = data
        md = merge(results)
        write_results(args.name, {"merged": results}, md, args.out)
        print(md)
        return {"merged": results}
    result = run(args)
    md = to_markdown(result)
    write_results(args.name, result, md, args.out)
    print(md)
    return result
