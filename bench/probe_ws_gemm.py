"""Probe: does Triton's automatic warp specialization (Hopper autoWS, ``tl.range(warp_specialize=True)``)
speed up the int8 GEMM behind W4A4/W8A8 at FLUX.1-dev token-GEMM shapes?

Variants, one process, int8 operands (no unpack, no rotation), bf16 out with token x channel scales:
* ``flat``, ``persistent``, ``persistent-ws``: kernels/int_gemm.py's one-program-per-tile form, its
  persistent form with the flattened tile loop, and with the warp-specialized one, each autotuned over
  its own config list as the compiler runs them;
* ``dev-desc``: int_gemm's persistent kernel (device-side descriptors, ``tl.make_tensor_descriptor``),
  not specialized, per config (the descriptor change alone: its first version used host-side descriptors;
  ws_gemm_m4608.md was measured with a copy of this loop, equal to it but for the strides);
* ``ws-persistent``: the same kernel with its tile loop warp-specialized (Hopper autoWS does not flatten,
  so flatten=False), per config;
* ``ws-flat``: one program per tile, its K loop warp-specialized (a kernel of this probe's own).
The per-config variants run each config of CONFIGS compiled and timed on its own (no autotuner noise) and
keep the best per shape. Every result is checked against the reference GEMM in the same run. cuBLAS bf16 for scale.

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
from convrot_compiler.kernels.int_gemm import _int_gemm_tma_kernel, _store_scaled, _tile_of, int_gemm  # noqa: E402

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
def _ws_flat_kernel(w_ptr, x_ptr, sx_ptr, sw_ptr, bias_ptr, c_ptr, M, N, K, stride_cm, gelu_from,
                    HAS_BIAS: tl.constexpr, HAS_GELU: tl.constexpr,
                    BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, GROUP_N: tl.constexpr):
    """One program per tile, device-side descriptors, the K loop warp-specialized."""
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    pid_n, pid_m = _tile_of(tl.program_id(0), tl.cdiv(N, BN), tl.cdiv(M, BM), GROUP_N)
    acc = tl.zeros([BN, BM], dtype=tl.int32)
    for kb in tl.range(0, K, BK, warp_specialize=True):
        acc = tl.dot(w_desc.load([pid_n * BN, kb]), x_desc.load([pid_m * BM, kb]).T, acc, out_dtype=tl.int32)
    _store_scaled(acc, pid_n, pid_m, sx_ptr, sw_ptr, bias_ptr, c_ptr, M, N, stride_cm, gelu_from,
                  HAS_BIAS, HAS_GELU, True, BN, BM)


def int8_operands(m: int, k: int, n: int):
    """Seeded int4-valued int8 activations and weights [M, K], [N, K] with token and channel scales."""
    torch.manual_seed(0)
    x = torch.randint(-7, 8, (m, k), dtype=torch.int8, device="cuda")
    w = torch.randint(-7, 8, (n, k), dtype=torch.int8, device="cuda")
    return x, w, torch.rand(m, device="cuda") * 0.01 + 1e-3, torch.rand(n, device="cuda") * 0.01 + 1e-3


def checked_time(launch, ref: torch.Tensor) -> dict:
    """{err: max error / max |ref|, us} of one launch, or {error} when it does not compile or run
    (shared memory, warp-specialization limits): reported, not fatal."""
    try:
        out = launch()
        torch.cuda.synchronize()
        err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        return dict(err=err, us=bench_ms(launch) * 1e3)
    except Exception as e:
        return dict(error=f"{type(e).__name__}: {str(e)[:160]}")


def run_variant(variant, cfg, x, w, sx, sw, sms, bias=None, gelu_from=None):
    """A launcher of ``variant`` (one of COPIES) with one config (BN, BM, BK, stages, warps)."""
    bn, bm, bk, stages, warps = cfg
    m, k = x.shape
    n = w.shape[0]
    c = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    common = dict(HAS_BIAS=bias is not None, HAS_GELU=gelu_from is not None, BN=bn, BM=bm, BK=bk, GROUP_N=8,
                  num_stages=stages, num_warps=warps)
    b = sw if bias is None else bias

    def launch():
        if variant == "ws-flat":
            _ws_flat_kernel[(tiles,)](w, x, sx, sw, b, c, m, n, k, c.stride(0), gelu_from or 0, **common)
        else:
            _int_gemm_tma_kernel.fn[(min(sms, tiles),)](
                w, x, sx, sw, b, c, m, n, k, w.stride(0), x.stride(0), c.stride(0), gelu_from or 0,
                FAST_GELU=True, NUM_PROGRAMS=sms, WARP_SPECIALIZE=variant == "ws-persistent", **common)
        return c
    return launch


def bench_m(m, variants, sms, rows, best):
    from tqdm.auto import tqdm

    for name, k, n in tqdm(SHAPES, desc=f"M={m}"):
        x, w, sx, sw = int8_operands(m, k, n)
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
                r = checked_time(launch, ref)
                if "error" in r:
                    rows.append(dict(M=m, shape=name, variant=variant, config=config, us=float("nan"), tops=0.0,
                                     x_bf16=0.0, err=float("nan"), error=r["error"]))
                    continue
                t = r["us"] / 1e3
                rows.append(dict(M=m, shape=name, variant=variant, config=config, us=r["us"], tops=flop / t / 1e9,
                                 x_bf16=t_bf16 / t, err=r["err"]))
                key = (m, name, variant)
                if r["err"] < 1e-2 and (key not in best or r["us"] < best[key]["us"]):
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
