"""Time W4A16 weight-only GEMM launch configs (BN, BKB, warps, stages) at FLUX's few-row shapes,
against cuBLAS bf16 on the same shape, as CUDA-graph replays (as the model runs them; --eager times
launches from Python, which exceed these kernels' 10-60 us). --kernel row sweeps the one-row kernel
(M = 1) instead of the general one (bench/results/gemv_row.md).

The kernel's autotuned time at M = 1, 3072->18432 moved between 33 and 57 us from run to run; this
probe picks the configs the kernel keeps (bench/results/gemv_configs.md). gemv_configs_wide.md
measured a variant of the kernel whose tiles spanned several groups (BKB 256-1024): slower.

    python bench/probe_gemv_configs.py   # writes gemv_configs.{json,md} under $OUT (or ./)
    python bench/probe_gemv_configs.py --kernel row --name gemv_row
"""

import argparse
import itertools
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import bench_graph_ms, bench_ms, environment, write_results  # noqa: E402
from convrot_compiler import ops  # noqa: E402
from convrot_compiler.kernels import weight_only as wo  # noqa: E402
from convrot_compiler.models import relative_error  # noqa: E402
from convrot_compiler.quant import quantize_weight  # noqa: E402

SHAPES = [(1, 3072, 18432), (1, 3072, 9216), (4, 3072, 18432)]  # (M, K, N)
# BN, BKB, warps, stages; the kernel needs BKB to divide the half group (128 bytes at group size 256)
CONFIGS = list(itertools.product((4, 8, 16, 32), (64, 128), (1, 2, 4, 8), (2, 4)))
ROW_CONFIGS = list(itertools.product((4, 8, 16, 32, 64), (8, 16, 32), (1, 2, 4, 8), (1, 2)))  # BN, BW (words)
MAX_ACC_PER_THREAD = 256  # float32 partial sums per thread; more spill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", choices=("general", "row"), default="general")
    ap.add_argument("--eager", action="store_true", help="time launches from Python instead of graph replays")
    ap.add_argument("--name", default=os.environ.get("PROBE_NAME", "gemv_configs"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    from tabulate import tabulate
    from tqdm.auto import tqdm

    timer = bench_ms if args.eager else bench_graph_ms
    row = args.kernel == "row"
    kern = (wo._w4a16_row_kernel if row else wo._w4a16_kernel).fn  # undecorated: launch each config directly
    shapes = [s for s in SHAPES if s[0] == 1] if row else SHAPES
    configs = ROW_CONFIGS if row else CONFIGS
    rows, best = [], []
    for m, k, n in shapes:
        torch.manual_seed(0)
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        qw = quantize_weight(w, "w4a16", None, group_size=256)
        ref = ops.w4a16_gemm_reference(x.float(), qw.values, qw.scale, None, 256)
        c = torch.empty(m, n, dtype=x.dtype, device="cuda")
        kb = qw.values.shape[1]
        bm = 1 if m == 1 else 2 if m == 2 else 4 if m <= 4 else 8
        wbytes = qw.values.numel() + qw.scale.numel() * 4
        t_bf16 = timer(lambda: torch.mm(x, w.T), warmup_ms=100, rep_ms=400)
        words = qw.values.view(torch.int32)  # the row kernel's operand
        shape_rows = []
        for bn, bkb, warps, stages in tqdm(configs, desc=f"M={m} {k}->{n}"):
            # the row kernel's BKB counts 4-byte words, and it keeps two fp32 tiles: a factor 8 on the same bound
            if bm * bn * bkb * (8 if row else 1) > MAX_ACC_PER_THREAD * 32 * warps:
                continue
            if row:
                def launch():
                    kern[(triton.cdiv(n, bn),)](
                        x, words, qw.scale, qw.scale, c, n, k, kb // 4, words.stride(0), qw.scale.stride(0),
                        HALF=128, HAS_BIAS=False, EVEN_K=True, USE_ASM=True, BN=bn, BW=bkb, num_warps=warps,
                        num_stages=stages)
            else:
                def launch():
                    kern[(triton.cdiv(n, bn), triton.cdiv(m, bm))](
                        x, qw.values, qw.scale, qw.scale, c, m, n, k, kb, x.stride(0), qw.values.stride(0),
                        qw.scale.stride(0), c.stride(0), HALF=128, HAS_BIAS=False, BM=bm, BN=bn, BKB=bkb,
                        num_warps=warps, num_stages=stages)
            try:
                launch()
            except Exception as e:  # out of resources for this config
                print(f"BN={bn} BKB={bkb} warps={warps} stages={stages}: {type(e).__name__}", flush=True)
                continue
            err = relative_error(c, ref)
            t = timer(launch, warmup_ms=25, rep_ms=120)
            shape_rows.append(dict(M=m, K=k, N=n, BN=bn, BKB=bkb, warps=warps, stages=stages, us=t * 1e3,
                                   gbs=wbytes / t / 1e6, vs_bf16=t_bf16 / t, bf16_us=t_bf16 * 1e3, rel_err=err))
        rows += shape_rows
        top = sorted(shape_rows, key=lambda r: r["us"])[:5]
        best += top
    table = tabulate([[f"{r['M']}x{r['K']}->{r['N']}", r["BN"], r["BKB"], r["warps"], r["stages"], f"{r['us']:.1f}",
                       f"{r['gbs']:.0f}", f"{r['bf16_us']:.1f}", f"{r['vs_bf16']:.2f}", f"{r['rel_err']:.1e}"]
                      for r in best],
                     headers=["shape", "BN", "BKB", "warps", "stages", "us", "GB/s", "bf16 us", "x bf16", "err vs ref"],
                     tablefmt="github")
    env = environment()
    timing = "launched from Python (--eager)" if args.eager else "CUDA-graph replays, L2 flushed"
    md = (f"# W4A16 launch configs of the {args.kernel} kernel, five fastest per shape (of {len(configs)})\n\n"
          f"GPU {env.get('gpu')} | torch {env['torch']} | triton {env['triton']} | {env['date']}\n\n"
          f"Timing: {timing}; cuBLAS bf16 timed the same way."
          f"{' BKB: the tile width in 4-byte words (the kernel calls it BW).' if row else ''}\n\n{table}\n")
    print(md)
    write_results(args.name, dict(env=env, kernel=args.kernel, timing=timing, rows=rows), md, os.environ.get("OUT"))


if __name__ == "__main__":
    main()
