"""Shared helpers for the benchmark scripts: environment stamp, timing, result files."""

from __future__ import annotations

from convrot_compiler.benchmark import environment, write_results  # noqa: F401


def bench_ms(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time in ms, CUDA events, L2 flushed between runs (triton.testing.do_bench)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
