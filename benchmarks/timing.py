"""Kernel timing for the benchmark scripts: CUDA events, L2 flushed, single and back-to-back graph replays."""

from __future__ import annotations


def bench_ms(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time in ms, CUDA events, L2 flushed between runs (triton.testing.do_bench)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def bench_graph_ms(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time in ms of ``fn`` replayed from a CUDA graph, L2 flushed between replays.

    The model replays its whole forward from one CUDA graph, so the Python and launch path of a kernel's
    wrapper never reaches the GPU's timeline there. Timed eagerly, a kernel shorter than that path (tens
    of us: autotuner dispatch, argument checks, allocations) measures the host instead, and differently
    on every machine. ``fn`` is called once first, outside the capture, so that autotuning and
    compilation happen there."""
    import torch

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return bench_ms(graph.replay, warmup_ms, rep_ms)


def bench_graph_per_call_ms(fns, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time in ms per call of ``fns`` replayed back to back from one CUDA graph, L2 flushed before
    each replay.

    A single replay of a ~20 us kernel carries the replay's own cost (an empty graph replay measured ~5 us on an
    H100) and the write-back of the dirty L2 that the flush leaves; inside the
    model's graph a kernel follows another with neither. Each fn should read its own buffers, so that none
    finds its input in L2 (what the one before it wrote aside)."""
    import torch

    for fn in fns:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    torch.cuda.synchronize()
    return bench_ms(graph.replay, warmup_ms, rep_ms) / len(fns)
