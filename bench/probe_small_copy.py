"""What a kernel moving K = 3072's bytes can reach in the harness that times rotate+quantize (CUDA-graph replay,
L2 flushed by triton's do_bench, median): an empty graph, a cast bf16 -> int8 of the same [M, K] (the same bytes
read and written as rotate+quantize), the rotate+quantize kernel itself; and the kernel with the L2 flushed by a
read instead of a write (do_bench's flush leaves L2 full of dirty lines) or not at all.

    python bench/probe_small_copy.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import bench_graph_ms, environment, write_results  # noqa: E402
from bench.gemm import copy_bandwidth  # noqa: E402
from convrot_compiler.kernels.rotate_quant_sm90 import rotate_quantize_sm90  # noqa: E402
from convrot_compiler.rotations import GroupHadamardRotation  # noqa: E402


def replay_ms(fn, flush: str, reps: int = 200) -> float:
    """Median of CUDA-graph replays of ``fn``, each after ``flush``: "write" (zero a 256 MB buffer, as do_bench),
    "read" (sum it: L2 left holding clean lines) or "none"."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    buf = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if flush == "write":
            buf.zero_()
        elif flush == "read":
            buf.sum()
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(starts, ends))[reps // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--name", default="small_copy")
    args = p.parse_args()
    env = environment()
    copy_gbs = copy_bandwidth(bench_graph_ms)
    h = GroupHadamardRotation("regular", 256).kernel_matrix().cuda()
    tiny = torch.zeros(1, device="cuda")
    rows = []
    for m, k in ((4608, 3072), (4096, 3072), (4608, 12288)):
        x = (torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16)
        out = torch.empty(m, k, dtype=torch.int8, device="cuda")
        nbytes = m * k * 3
        cases = {
            "empty graph (tiny add)": (lambda: tiny.add_(1.0), 0),
            "cast bf16 -> int8 (same bytes)": (lambda: out.copy_(x), nbytes),
            "rotate+quantize (sm90)": (lambda: rotate_quantize_sm90(x, h, 4), nbytes + m * 4),
            "rotate+quantize (sm90, mma order)": (lambda: rotate_quantize_sm90(x, h, 4, order="mma"),
                                                   nbytes + m * 4),
        }
        for name, (fn, nb) in cases.items():
            r = dict(M=m, K=k, case=name, do_bench_us=bench_graph_ms(fn) * 1e3)
            for flush in ("write", "read", "none"):
                r[f"{flush}_us"] = replay_ms(fn, flush) * 1e3
            r["frac_copy"] = nb / r["do_bench_us"] / 1e3 / copy_gbs if nb else None
            rows.append(r)
    table = tabulate([[r["M"], r["K"], r["case"], f"{r['do_bench_us']:.1f}", f"{r['write_us']:.1f}", f"{r['read_us']:.1f}",
                       f"{r['none_us']:.1f}", "" if r["frac_copy"] is None else f"{r['frac_copy']:.0%}"] for r in rows],
                     headers=["M", "K", "case", "do_bench us", "flush by write us", "flush by read us", "no flush us",
                              "of copy (do_bench)"], tablefmt="github")
    head = (f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | {env['date']} | copy {copy_gbs:.0f} GB/s "
            "(256 MB, read+write) | CUDA-graph replays, median\n")
    print(table)
    print("written:", *write_results(args.name, dict(env=env, copy_gbs=copy_gbs, rows=rows),
                                     f"# What the harness costs a kernel of K = 3072's size\n\n{head}\n{table}\n", args.out))


if __name__ == "__main__":
    main()
