"""Shared helpers for the benchmarks: environment stamp, timing, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform

import torch


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


def bench_ms(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time in ms, CUDA events, L2 flushed between runs (triton.testing.do_bench)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def write_results(name: str, payload: dict, markdown: str, out_dir: str | None = None) -> list[str]:
    """Write NAME.json and NAME.md under out_dir (default: $OUT if set, else bench/results)."""
    out_dir = out_dir or os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md")]
    with open(paths[0], "w") as f:
        json.dump(payload, f, indent=2)
    with open(paths[1], "w") as f:
        f.write(markdown)
    return paths
