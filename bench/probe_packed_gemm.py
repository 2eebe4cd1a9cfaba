"""Probe: the Gluon W4A4 GEMM that unpacks packed weights in registers (kernels/packed_gemm_sm90.py)
against the compiler's W4A4 path (unpack to int8, then the int8 GEMM), its W8A8 GEMM (int8 weights:
the unpack-free ceiling of that path) and cuBLAS bf16, at FLUX.1-dev token-GEMM shapes.

Every packed_gemm result is compared with the library W4A4 call on the same operands in the same run
(bit-equal expected: same integer products, same epilogue arithmetic). The library W4A4 and W8A8
calls run under forced_schedule("unpack"): int_gemm itself runs packed_gemm on sm_90 otherwise.
Timing: CUDA-graph replays (bench_graph_ms), as the model runs them.

    python bench/probe_packed_gemm.py [--m 4608,512] [--configs BN,BM,BKP,STAGES,WARPS;...] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import bench_graph_ms, environment, write_results  # noqa: E402
from convrot_compiler.kernels.int_gemm import forced_schedule, int_gemm, unpack_int4  # noqa: E402
from convrot_compiler.kernels.packed_gemm_sm90 import PackedGemmConfig, packed_gemm  # noqa: E402
from convrot_compiler.quant import pack_int4  # noqa: E402

# (name, K, N, gelu_from)
SHAPES = [("qkv/out 3072->3072", 3072, 3072, None), ("fused qkv 3072->9216", 3072, 9216, None),
          ("ff up 3072->12288 +gelu", 3072, 12288, 0), ("ff down 12288->3072", 12288, 3072, None),
          ("single proj_out 15360->3072", 15360, 3072, None), ("single fused 3072->21504 +gelu", 3072, 21504, 9216)]
CONFIGS = "128,128,64,4,8;128,256,64,3,8;128,128,128,3,8;128,128,64,4,4;64,256,64,4,4;128,64,64,6,8"
EDGE_CASES = [(300, 512, 320), (1, 256, 128), (129, 768, 136)]  # (M, K, N): partial tiles, one row


def _operands(m: int, k: int, n: int, gen: torch.Generator):
    qw = torch.randint(-7, 8, (n, k), generator=gen, dtype=torch.int8).cuda()
    qx = torch.randint(-7, 8, (m, k), generator=gen, dtype=torch.int8).cuda()
    sx = (torch.rand(m, generator=gen) * 0.01 + 0.001).cuda()
    sw = (torch.rand(n, generator=gen) * 0.01 + 0.001).cuda()
    bias = (torch.randn(n, generator=gen) * 0.1).to(torch.bfloat16).cuda()
    return qx, sx, pack_int4(qw, 256).contiguous(), qw, sw, bias


def _compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    return bool(torch.equal(out, ref)), float((out.float() - ref.float()).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", default="4608,512")
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--shapes", default="", help="comma-separated substrings of shape names (default: all)")
    ap.add_argument("--out", default=None, help="results directory (default: $OUT, else bench/results)")
    ap.add_argument("--name", default="packed_gemm")
    args = ap.parse_args()
    configs = [PackedGemmConfig(*[int(v) for v in c.split(",")]) for c in args.configs.split(";") if c]
    gen = torch.Generator().manual_seed(0)

    edge = []
    for m, k, n in EDGE_CASES:
        qx, sx, packed, _, sw, bias = _operands(m, k, n, gen)
        with forced_schedule("unpack"):
            ref = int_gemm(qx, sx, packed, sw, bias, True, 256, torch.bfloat16)
        for cfg in configs:
            out = packed_gemm(qx, sx, [packed], sw, bias, 256, torch.bfloat16, config=cfg)
            equal, diff = _compare(out, ref)
            edge.append(dict(m=m, k=k, n=n, config=cfg.__dict__, bit_equal=equal, max_abs_diff=diff))
            print(f"edge M={m} K={k} N={n} {tuple(cfg.__dict__.values())}: equal={equal} max diff {diff:.3g}",
                  flush=True)

    rows = []
    shapes = [s for s in SHAPES if not args.shapes or any(p in s[0] for p in args.shapes.split(","))]
    for m in [int(v) for v in args.m.split(",")]:
        for name, k, n, gelu_from in shapes:
            qx, sx, packed, qw, sw, bias = _operands(m, k, n, gen)
            xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            w8 = unpack_int4(packed, 256)
            assert torch.equal(w8, qw.cuda())
            t_bf16 = bench_graph_ms(lambda: xb @ wb.T)
            with forced_schedule("unpack"):  # captured graphs keep the form they captured
                ref = int_gemm(qx, sx, packed, sw, bias, True, 256, torch.bfloat16, gelu_from=gelu_from)
                t_w4a4 = bench_graph_ms(lambda: int_gemm(qx, sx, packed, sw, bias, True, 256, torch.bfloat16,
                                                         gelu_from=gelu_from))
                t_w8a8 = bench_graph_ms(lambda: int_gemm(qx, sx, w8, sw, bias, False, 256, torch.bfloat16,
                                                         gelu_from=gelu_from))
            flop = 2 * m * n * k
            row = dict(shape=name, m=m, k=k, n=n, bf16_us=t_bf16 * 1e3, w4a4_lib_us=t_w4a4 * 1e3,
                       w8a8_lib_us=t_w8a8 * 1e3, packed={})
            for cfg in configs:
                key = ",".join(str(v) for v in cfg.__dict__.values())
                try:
                    out = packed_gemm(qx, sx, [packed], sw, bias, 256, torch.bfloat16, gelu_from, config=cfg)
                    equal, diff = _compare(out, ref)
                    t = bench_graph_ms(lambda: packed_gemm(qx, sx, [packed], sw, bias, 256, torch.bfloat16, gelu_from,
                                                           config=cfg))
                    row["packed"][key] = dict(us=t * 1e3, bit_equal=equal, max_abs_diff=diff)
                except Exception as e:  # noqa: BLE001 - a config that fails to compile or run is recorded
                    row["packed"][key] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
            ok = {c: r for c, r in row["packed"].items() if "us" in r}
            best = min(ok, key=lambda c: ok[c]["us"]) if ok else None
            row["best_config"] = best
            if best:
                row["best_us"] = ok[best]["us"]
                row["best_tops"] = flop / ok[best]["us"] * 1e-6
            rows.append(row)
            write_results(args.name, dict(environment=environment(), edge_cases=edge, rows=rows, partial=True),
                          "partial\n", out_dir=args.out)
            print(f"M={m} {name}: bf16 {row['bf16_us']:.1f} us, w4a4 lib {row['w4a4_lib_us']:.1f}, "
                  f"w8a8 {row['w8a8_lib_us']:.1f}, packed {row['packed']}", flush=True)

    from tabulate import tabulate
    table = []
    for r in rows:
        best = r.get("best_config")
        table.append([r["m"], r["shape"], f"{r['bf16_us']:.1f}", f"{r['w4a4_lib_us']:.1f}", f"{r['w8a8_lib_us']:.1f}",
                      f"{r['best_us']:.1f}" if best else "-", best or "-",
                      f"{r['bf16_us'] / r['w4a4_lib_us']:.2f}", f"{r['bf16_us'] / r['best_us']:.2f}" if best else "-",
                      all(v.get("bit_equal", False) for v in r["packed"].values() if "us" in v)])
    headers = ["M", "shape", "bf16 us", "W4A4 lib us", "W8A8 lib us", "packed us", "config BN,BM,BKP,S,W,G",
               "lib x bf16", "packed x bf16", "bit-equal"]
    text = tabulate(table, headers=headers)
    geo = {}
    for m in sorted({r["m"] for r in rows}):
        sel = [r for r in rows if r["m"] == m and r.get("best_config")]
        if sel:
            geo[m] = dict(lib=math.exp(sum(math.log(r["bf16_us"] / r["w4a4_lib_us"]) for r in sel) / len(sel)),
                          packed=math.exp(sum(math.log(r["bf16_us"] / r["best_us"]) for r in sel) / len(sel)))
            text += f"\nM={m}: geomean x bf16: library W4A4 {geo[m]['lib']:.3f}, packed {geo[m]['packed']:.3f}"
    print(text)
    write_results(args.name, dict(environment=environment(), edge_cases=edge, rows=rows, geomean=geo),
                  "# Gluon packed W4A4 GEMM probe\n\n```\n" + text + "\n```\n", out_dir=args.out)


if __name__ == "__main__":
    main()
