"""The sm_90 packed W4A4 GEMM's token tile at FLUX.1-dev's token GEMMs, as one forward at 1024² runs them.

For each shape (its calls per forward: 19 double blocks, 38 single), in one process: the GEMM in tiles of 128 and of
256 tokens (ops/dispatch.py, ``packed_gemm_config``), and what dispatch picks (``packed_gemm_wide_tokens``); each
result compared bit for bit with the 128-token tiles'. Times are medians of CUDA-graph replays with L2 flushed
(benchmarks/timing.py); the last line sums each column over a forward's calls.

    python benchmarks/gemm_tiles.py [--batch B] [--name STEM] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys

import torch
from timing import bench_graph_ms  # benchmarks/timing.py

from convrot_compiler.numerics.quant import pack_int4
from convrot_compiler.ops import dispatch
from convrot_compiler.tools.bench_model import environment, write_results

IMAGE, TEXT = 4096, 512  # tokens at 1024², batch 1
SHAPES = [  # (name, tokens, K, [N of each fused linear], gelu_from, calls per forward)
    ("double: image QKV", IMAGE, 3072, [3072] * 3, None, 19),
    ("double: image to_out", IMAGE, 3072, [3072], None, 19),
    ("double: image ff up (GELU)", IMAGE, 3072, [12288], 0, 19),
    ("double: image ff down", IMAGE, 12288, [3072], None, 19),
    ("double: text QKV", TEXT, 3072, [3072] * 3, None, 19),
    ("double: text ff down", TEXT, 12288, [3072], None, 19),
    ("single: QKV+MLP (GELU)", IMAGE + TEXT, 3072, [3072] * 3 + [12288], 9216, 38),
    ("single: proj_out", IMAGE + TEXT, 15360, [3072], None, 38),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=1, help="samples: each shape's tokens times this")
    p.add_argument("--name", default="gemm_tiles", help="result file stem")
    p.add_argument("--out", help="result folder (default $OUT if set, else ./convrot-out/bench)")
    args = p.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        sys.exit("benchmarks/gemm_tiles.py times the sm_90 packed GEMM: it needs a Hopper GPU")
    from tabulate import tabulate

    from convrot_compiler.kernels.sm90.packed_gemm import packed_gemm

    narrow, wide = (dispatch.packed_gemm_config(w, torch.bfloat16.itemsize) for w in (False, True))
    programs = torch.cuda.get_device_properties(0).multi_processor_count
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, tokens, k, ns, gelu_from, calls in SHAPES:
        m, n = tokens * args.batch, sum(ns)
        qx = torch.randint(-7, 8, (m, k), device="cuda", dtype=torch.int8, generator=g)
        qws = [pack_int4(torch.randint(-7, 8, (nj, k), device="cuda", dtype=torch.int8, generator=g), 256) for nj in ns]
        sx = torch.rand(m, device="cuda", generator=g) + 0.5
        sw = (torch.rand(n, device="cuda", generator=g) + 0.5) * 1e-3
        bias = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16)
        ref = packed_gemm(qx, sx, qws, sw, bias, 256, torch.bfloat16, gelu_from)
        out = packed_gemm(qx, sx, qws, sw, bias, 256, torch.bfloat16, gelu_from, config=wide)
        picked = dispatch.packed_gemm_wide_tokens(m, n, gelu_from is not None, programs)
        us = {tiles: bench_graph_ms(lambda cfg=cfg: packed_gemm(qx, sx, qws, sw, bias, 256, torch.bfloat16, gelu_from,
                                                                config=cfg)) * 1e3
              for tiles, cfg in ((128, narrow), (256, wide))}
        rows.append(dict(shape=name, M=m, N=n, K=k, calls=calls, us_128=us[128], us_256=us[256],
                         picked=256 if picked else 128, us_picked=us[256] if picked else us[128],
                         bit_equal=torch.equal(out, ref)))
        print(rows[-1], flush=True)
    total = {key: sum(r[key] * r["calls"] for r in rows) / 1e3 for key in ("us_128", "us_256", "us_picked")}
    env = environment()
    table = tabulate([[r["shape"], r["M"], r["N"], r["K"], r["calls"], f"{r['us_128']:.1f}", f"{r['us_256']:.1f}",
                       r["picked"], f"{r['us_128'] / r['us_picked']:.3f}", r["bit_equal"]] for r in rows]
                     + [["a forward's calls, ms", "", "", "", "", f"{total['us_128']:.2f}", f"{total['us_256']:.2f}",
                         "", f"{total['us_128'] / total['us_picked']:.3f}", ""]],
                     headers=["GEMM", "M", "N", "K", "calls", "128 tokens us", "256 tokens us", "dispatch picks",
                              "x 128", "256 bit-equal"], tablefmt="github")
    md = (f"# Packed W4A4 GEMM: tokens per tile\n\nGPU {env.get('gpu')} | torch {env['torch']} | triton "
          f"{env['triton']} | {env['date']} | batch {args.batch} | CUDA-graph replays, median, L2 flushed\n\n{table}\n")
    print(md)
    print("written:", *write_results(args.name, dict(env=env, batch=args.batch, rows=rows, total_ms=total), md,
                                     args.out))


if __name__ == "__main__":
    main()
