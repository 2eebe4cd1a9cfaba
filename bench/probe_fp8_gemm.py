"""The W4A4 GEMM on fp8 vs int8 tensor cores, per launch config and fp8 promotion interval.

Hopper's fp8 MMAs add into a reduced-precision accumulator; Triton's ``max_num_imprecise_acc``
promotes the partial sum into fp32 every so many products (kernels/int_gemm.py, PROMOTE_EVERY).
Operands hold int4 values with all-7 rows, the worst case for the partial sums; the error is
against the int8 GEMM, which is exact. Results: bench/results/gemm_fp8.md.

    python bench/probe_fp8_gemm.py   # writes $OUT/probe_fp8.json (or ./)
"""

import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import bench_ms  # noqa: E402
from convrot_compiler.kernels.int_gemm import _int_gemm_kernel  # noqa: E402

CONFIGS = [(128, 128, 128, 4, 8), (128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 256, 3, 8),
           (128, 256, 256, 2, 8), (256, 128, 256, 2, 8), (128, 128, 64, 5, 4)]  # BN, BM, BK, stages, warps
VARIANTS = [(False, 0), (True, -1), (True, 0), (True, 128), (True, 64)]  # (fp8, promote_every)


def launch(qx, qw, c, cfg, promote, fp8):
    bn, bm, bk, st, w = cfg
    m, k = qx.shape
    n = qw.shape[0]
    ones_m, ones_n = torch.ones(m, device="cuda"), torch.ones(n, device="cuda")
    _int_gemm_kernel.fn[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
        qx, qw, ones_m, ones_n, ones_n, c, m, n, k, qx.stride(0), qw.stride(0), c.stride(0), HAS_BIAS=False,
        FP8=fp8, PROMOTE_EVERY=promote, BN=bn, BM=bm, BK=bk, GROUP_N=8, num_warps=w, num_stages=st)
    return c


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    rows = []
    for m, k, n in [(4608, 3072, 12288), (4608, 15360, 3072), (4608, 3072, 3072)]:
        qx = torch.randint(-7, 8, (m, k), dtype=torch.int8, device="cuda")
        qw = torch.randint(-7, 8, (n, k), dtype=torch.int8, device="cuda")
        qx[:64], qw[:64], qx[64:128] = 7, 7, -7
        xf, wf = qx.to(torch.float8_e4m3fn), qw.to(torch.float8_e4m3fn)
        exact = launch(qx, qw, torch.empty(m, n, device="cuda"), CONFIGS[0], 0, False)
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        t_bf16 = bench_ms(lambda: torch.mm(a, b.T))
        for cfg in CONFIGS:
            c = torch.empty(m, n, device="cuda")
            for fp8, promote in VARIANTS:
                if fp8 and promote > cfg[2]:
                    continue
                ops = (xf, wf) if fp8 else (qx, qw)
                c.fill_(float("nan"))
                err = (launch(*ops, c, cfg, promote, fp8) - exact).abs().max().item()
                t = bench_ms(lambda: launch(*ops, c, cfg, promote, fp8))
                rows.append(dict(M=m, K=k, N=n, cfg=cfg, fp8=fp8, promote=promote, tops=2 * m * n * k / t / 1e9,
                                 x_bf16=t_bf16 / t, max_abs_err=err))
                print(rows[-1], flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "probe_fp8.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
