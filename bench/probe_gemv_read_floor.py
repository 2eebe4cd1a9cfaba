"""Probe: what bounds the W4A16 GEMV at 3072->18432 (M = 1): bare reads of its 28.3 MB of packed weights in the kernel's
pattern (row tiles) and contiguous per program, the library kernel and cuBLAS bf16, all timed as CUDA-graph replays
with the L2 flushed (bench_graph_ms). Prints a table; results of session 13: bench/results/gemv_read_floor.md.

    python bench/probe_gemv_read_floor.py
"""
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._common import bench_graph_ms  # noqa: E402
from convrot_compiler.kernels.weight_only import w4a16_gemm  # noqa: E402


@triton.jit
def strided_read(w_ptr, out_ptr, KW, BN: tl.constexpr, BW: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rw = tl.arange(0, BW)
    p = w_ptr + rn[:, None].to(tl.int64) * KW + rw[None, :]
    acc = tl.zeros([BN, BW], dtype=tl.int32)
    for kw in range(0, KW, BW):
        acc ^= tl.load(p)
        p += BW
    tl.store(out_ptr + rn, tl.sum(acc, axis=1))


@triton.jit
def contiguous_read(w_ptr, out_ptr, CHUNK, B: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * CHUNK
    r = tl.arange(0, B)
    acc = tl.zeros([B], dtype=tl.int32)
    for off in range(0, CHUNK, B):
        acc ^= tl.load(w_ptr + base + off + r)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def main() -> None:
    N, K = 18432, 3072
    KW = K // 8
    w = torch.randint(-2**31, 2**31 - 1, (N, KW), dtype=torch.int32, device="cuda")
    out = torch.empty(N, dtype=torch.int32, device="cuda")
    nbytes = w.numel() * 4
    rows = []
    for bn, bw, warps in [(32, 32, 4), (16, 32, 2), (4, 128, 4), (8, 128, 4), (16, 128, 8), (2, 128, 2), (64, 32, 8)]:
        ms = bench_graph_ms(lambda: strided_read[(N // bn,)](w, out, KW, BN=bn, BW=bw, num_warps=warps))
        rows.append((f"strided BN={bn} BW={bw} w={warps}", ms * 1e3, nbytes / ms / 1e6))
    for chunk_rows, b, warps in [(32, 1024, 4), (16, 1024, 4), (8, 512, 4), (64, 2048, 8), (128, 2048, 8)]:
        chunk = chunk_rows * KW
        ms = bench_graph_ms(lambda: contiguous_read[(N // chunk_rows,)](w, out, chunk, B=b, num_warps=warps))
        rows.append((f"contiguous {chunk_rows} rows/program B={b} w={warps}", ms * 1e3, nbytes / ms / 1e6))
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    qw = torch.randint(-128, 127, (N, K // 2), dtype=torch.int8, device="cuda")
    sc = torch.rand(N, K // 256, device="cuda") + 0.5
    ms = bench_graph_ms(lambda: w4a16_gemm(x, qw, sc, None, 256))
    rows.append(("w4a16_gemm (library)", ms * 1e3, (nbytes + sc.numel() * 4) / ms / 1e6))
    wb = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    ms = bench_graph_ms(lambda: torch.mm(x, wb.t()))
    rows.append(("cuBLAS bf16 torch.mm", ms * 1e3, wb.numel() * 2 / ms / 1e6))
    big = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    ms = bench_graph_ms(lambda: big.view(torch.int32).max())
    rows.append(("torch max over 256 MB", ms * 1e3, big.numel() / ms / 1e6))
    for r in rows:
        print(f"{r[0]:48s} {r[1]:8.1f} us {r[2]:8.0f} GB/s")


if __name__ == "__main__":
    main()
