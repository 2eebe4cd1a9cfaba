"""Probe: does Triton's automatic warp specialization (Hopper autoWS, ``tl.range(warp_specialize=True)``)
speed up the int8 GEMM behind W4A4/W8A8 at FLUX.1-dev token-GEMM shapes?

Variants, one process, int8 operands (no unpack, no rotation), bf16 out with token x channel scales:
* ``flat``, ``persistent``, ``persistent-ws``: kernels/int_gemm.py's one-program-per-tile form, its
  persistent form with the flattened tile loop, and with the warp-specialized one, each autotuned over
  its own config list as the compiler runs them;
* ``dev-desc``: a copy of the persistent loop with device-side descriptors (``tl.make_tensor_descriptor``),
  not specialized (isolates the descriptor change; the first version of int_gemm's kernel used host-side
  descriptors);
* ``ws-persistent``: that copy with the tile loop warp-specialized (Hopper autoWS does not flatten, so
  flatten=False);
* ``ws-flat``: one program per tile, its K loop warp-specialized.
The copies run each config of CONFIGS compiled and timed on its own (no autotuner noise) and keep the
best per shape. Every result is checked against the reference GEMM in the same run. cuBLAS bf16 for scale.

    python bench/probe_ws_gemm.py [--m 4608[,512,...]] [--variants ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import bench_ms, environment, write_results  # noqa: E402
from convrot_compiler import ops  # noqa: E402
from convrot_compiler.kernels.int_gemm import _store_scaled, _tile_of, int_gemm  # noqa: E402

SHAPES = [("qkv/out 3072->3072", 3072, 3072), ("fused qkv 3072->9216", 3072, 9216),
          ("ff up 3072->12288", 3072, 12288), ("ff down 12288->3072", 12288, 3072),
          ("single proj_out 15360->3072", 15360, 3072), ("single fused 3072->21504", 3072, 21504)]
# (BN, BM, BK, stages, warps)
CONFIGS = [(128, 128, 128, 3, 4), (128, 128, 128, 4, 4), (128, 256, 64, 3, 8), (128, 256, 128, 3, 8),
           (128, 128, 64, 4, 4), (256, 128, 64, 3, 8), (128, 128, 128, 3, 8), (128, 64, 128, 4, 4),
           (64, 128, 128, 4, 4)]
# variant -> int_gemm keyword arguments (the compiler's own kernels, autotuned)
LIBRARY = {"flat": dict(persistent=False), "persistent": dict(persistent=True, warp_specialize=False),
           "persistent-ws": dict(persistent=True, warp_specialize=True)}
COPIES = ("dev-desc", "ws-persistent", "ws-flat")


@triton.jit
def _dev_desc_kernel(w_ptr, x_ptr, sx_ptr, sw_ptr, bias_ptr, c_ptr, M, N, K, stride_cm, gelu_from,
                     HAS_BIAS: tl.constexpr, HAS_GELU: tl.constexpr,
                     NUM_PROGRAMS: tl.constexpr, WS: tl.constexpr, PERSISTENT: tl.constexpr,
                     BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, GROUP_N: tl.constexpr):
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    num_n = tl.cdiv(N, BN)
    num_m = tl.cdiv(M, BM)
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), num_n * num_m, NUM_PROGRAMS, flatten=not WS, warp_specialize=WS):
            pid_n, pid_m = _tile_of(tile, num_n, num_m, GROUP_N)
            acc = tl.zeros([BN, BM], dtype=tl.int32)
            for kb in range(0, K, BK):
                acc = tl.dot(w_desc.load([pid_n * BN, kb]), x_desc.load([pid_m * BM, kb]).T, acc, out_dtype=tl.int32)
            _store_scaled(acc, pid_n, pid_m, sx_ptr, sw_ptr, bias_ptr, c_ptr, M, N, stride_cm, gelu_from,
                          HAS_BIAS, HAS_GELU, True, BN, BM)
    else:
        pid_n, pid_m = _tile_of(tl.program_id(0), num_n, num_m, GROUP_N)
        acc = tl.zeros([BN, BM], dtype=tl.int32)
        for kb in tl.range(0, K, BK, warp_specialize=WS):
            acc = tl.dot(w_desc.load([pid_n * BN, kb]), x_desc.load([pid_m * BM, kb]).T, acc, out_dtype=tl.int32)
        _store_scaled(acc, pid_n, pid_m, sx_ptr, sw_ptr, bias_ptr, c_ptr, M, N, stride_cm, gelu_from,
                      HAS_BIAS, HAS_GELU, True, BN, BM)


def run_variant(variant, cfg, x, w, sx, sw, sms, bias=None, gelu_from=None):
    bn, bm, bk, stages, warps = cfg
    m, k = x.shape
    n = w.shape[0]
    c = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    persistent = variant != "ws-flat"
    grid = (min(sms, tiles),) if persistent else (tiles,)

    def launch():
        _dev_desc_kernel[grid](w, x, sx, sw, sw if bias is None else bias, c, m, n, k, c.stride(0), gelu_from or 0,
                               HAS_BIAS=bias is not None, HAS_GELU=gelu_from is not None, NUM_PROGRAMS=sms,
                               WS=variant.startswith("ws"), PERSISTENT=persistent,
                               BN=bn, BM=bm, BK=bk, GROUP_N=8, num_stages=stages, num_warps=warps)
        return c
    return launch


def bench_m(m, variants, sms, rows, best):
    from tqdm.auto import tqdm

    for name, k, n in tqdm(SHAPES, desc=f"M={m}"):
        torch.manual_seed(0)
        x = torch.randint(-7, 8, (m, k), dtype=torch.int8, device="cuda")
        w = torch.randint(-7, 8, (n, k), dtype=torch.int8, device="cuda")
        sx = torch.rand(m, device="cuda") * 0.01 + 1e-3
        sw = torch.rand(n, device="cuda") * 0.01 + 1e-3
        ref = ops.int_gemm_reference(x, sx, w, sw, None, False, 256, torch.float32)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        t_bf16 = bench_ms(lambda: torch.mm(xb, wb.T))
        flop = 2 * m * n * k
        for variant in variants:
            if variant in LIBRARY:
                kw = LIBRARY[variant]
                cases = [("autotuned", lambda kw=kw: int_gemm(x, sx, w, sw, None, False, 256, torch.bfloat16, **kw))]
            else:
                cases = [(str(cfg), run_variant(variant, cfg, x, w, sx, sw, sms)) for cfg in CONFIGS]
            for config, launch in cases:
                row = dict(M=m, shape=name, variant=variant, config=config)
                try:
                    out = launch()
                    torch.cuda.synchronize()
                    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                    t = bench_ms(launch)
                except Exception as e:  # a config that does not compile (shared memory, WS limits) is reported
                    rows.append(dict(row, us=float("nan"), tops=0.0, x_bf16=0.0, err=float("nan"),
                                     error=f"{type(e).__name__}: {str(e)[:160]}"))
                    continue
                rows.append(dict(row, us=t * 1e3, tops=flop / t / 1e9, x_bf16=t_bf16 / t, err=err))
                key = (m, name, variant)
                if err < 1e-2 and (key not in best or t * 1e3 < best[key]["us"]):
                    best[key] = rows[-1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", default="4608", help="comma-separated token counts")
    p.add_argument("--variants", default=",".join(list(LIBRARY) + list(COPIES)))
    p.add_argument("--out")
    args = p.parse_args()
    from tabulate import tabulate

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    env = environment()
    variants = args.variants.split(",")
    if unknown := set(variants) - set(LIBRARY) - set(COPIES):
        sys.exit(f"unknown variants {sorted(unknown)}")
    ms = [int(v) for v in args.m.split(",")]
    rows, best = [], {}
    for m in ms:
        bench_m(m, variants, sms, rows, best)
    table = []
    for m in ms:
        for name, _, _ in SHAPES:
            line = [m, name]
            for v in variants:
                r = best.get((m, name, v))
                line.append("-" if r is None else f"{r['tops']:.0f} ({r['x_bf16']:.2f}x) {r['config']}")
            table.append(line)
        gm = [m, "geomean x bf16"]
        for v in variants:
            xs = [best[(m, s, v)]["x_bf16"] for s, _, _ in SHAPES if (m, s, v) in best]
            gm.append(f"{math.exp(sum(map(math.log, xs)) / len(xs)):.3f} over {len(xs)}" if xs else "-")
        table.append(gm)
    md = ("# int8 GEMM with Hopper automatic warp specialization\n\n"
          f"GPU {env.get('gpu')} | torch {env['torch']} | triton {env['triton']} | {env['date']}\n\n"
          "Best config per variant: TOPS (x cuBLAS bf16) (BN, BM, BK, stages, warps); every row checked "
          "against the reference GEMM (max error < 1e-2 of max |C|).\n\n"
          + tabulate(table, headers=["M", "shape"] + variants, tablefmt="github") + "\n")
    errors = [r for r in rows if "error" in r]
    if errors:
        md += f"\n{len(errors)} config(s) failed to compile or run; first: {errors[0]['variant']} " \
              f"{errors[0]['config']}: {errors[0]['error']}\n"
    print(md)
    print("written:", *write_results("ws_gemm_m" + "_".join(map(str, ms)), dict(env=env, rows=rows), md, args.out))


if __name__ == "__main__":
    main()
