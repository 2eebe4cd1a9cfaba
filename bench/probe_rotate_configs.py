"""Time rotate+quantize launch configs (BM, warps, stages) of the library kernel at FLUX shapes.

The autotuner's own timings at K = 3072 were noisier than the differences between configs; this
probe chose the configs the kernel keeps (bench/results/rotate_configs.md, timed eagerly). It now
times CUDA-graph replays by default (as the model runs the kernel: --eager for launches from Python,
which at M = 512 take longer than the kernel) and takes the shapes and row counts to sweep
(bench/results/rotate_configs_small_m.md: one row per program at the text stream's M = 512).

    python bench/probe_rotate_configs.py                        # the original sweep
    python bench/probe_rotate_configs.py --shapes 512x3072,512x12288 --bm 1,2,4 --warps 1,2,4 \\
        --stages 2,3 --name rotate_configs_small_m
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import bench_graph_ms, bench_ms, environment, write_results  # noqa: E402
from bench.probe_rotate_forms import launch_library  # noqa: E402
from convrot_compiler.hadamard import hadamard_matrix  # noqa: E402
from convrot_compiler.kernels.rotate_quant import rotate_quantize  # noqa: E402
from convrot_compiler.rotations import GroupHadamardRotation  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4608x3072,4608x12288,512x3072", help="MxK,MxK,...")
    ap.add_argument("--bm", type=_ints, default=[2, 4, 8, 16, 32])
    ap.add_argument("--warps", type=_ints, default=[2, 4, 8])
    ap.add_argument("--stages", type=_ints, default=[1, 2, 3])
    ap.add_argument("--eager", action="store_true", help="time launches from Python instead of graph replays")
    ap.add_argument("--name", default="probe_rotate_cfg")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    from tabulate import tabulate

    timer = bench_ms if args.eager else bench_graph_ms
    h = hadamard_matrix("regular", 16, device="cuda").to(torch.bfloat16)
    h_lib = GroupHadamardRotation("regular", 256).kernel_matrix().cuda()
    rows = []
    for shape in args.shapes.split(","):
        m, k = (int(v) for v in shape.split("x"))
        x = (torch.randn(m, k, device="cuda") * 2 + torch.randn(m, 1, device="cuda") * 4).to(torch.bfloat16)
        q = torch.empty(m, k, dtype=torch.int8, device="cuda")
        s = torch.empty(m, device="cuda")
        q_ref, s_ref = rotate_quantize(x, h_lib, 256, 4)  # the autotuned library call
        nbytes = m * k * 3 + m * 4
        t_lib = timer(lambda: rotate_quantize(x, h_lib, 256, 4), warmup_ms=50, rep_ms=200)
        for bm in args.bm:
            for w in args.warps:
                for st in args.stages:
                    def launch(bm=bm, w=w, st=st):
                        launch_library(x, q, s, h, bm, w, st)
                    launch()
                    mismatch = (q.int() - q_ref.int()).abs().gt(1).float().mean().item()
                    t = timer(launch, warmup_ms=50, rep_ms=200)
                    rows.append(dict(M=m, K=k, BM=bm, warps=w, stages=st, us=t * 1e3, gbs=nbytes / t / 1e6,
                                     autotuned_us=t_lib * 1e3, mismatch_gt1=mismatch,
                                     scale_close=bool(torch.allclose(s, s_ref, rtol=1e-5))))
                    print(rows[-1], flush=True)
    env = environment()
    timing = "launched from Python (--eager)" if args.eager else "CUDA-graph replays, L2 flushed"
    best = []
    for shape in dict.fromkeys((r["M"], r["K"]) for r in rows):
        best += sorted((r for r in rows if (r["M"], r["K"]) == shape), key=lambda r: r["us"])[:4]
    table = tabulate([[r["M"], r["K"], r["BM"], r["warps"], r["stages"], f"{r['us']:.1f}", f"{r['gbs']:.0f}",
                       f"{r['autotuned_us']:.1f}", f"{r['mismatch_gt1']:.1e}", r["scale_close"]] for r in best],
                     headers=["M", "K", "BM", "warps", "stages", "us", "GB/s", "autotuned library us",
                              "values off by > 1", "scales equal"], tablefmt="github")
    md = (f"# rotate+quantize launch configs, four fastest per shape\n\nGPU {env.get('gpu')} | torch {env['torch']} | "
          f"triton {env['triton']} | {env['date']}\n\nKronecker form, W4, bf16 input. Timing: {timing}. Bytes: 2 read "
          f"+ 1 written per activation + 4 per row. Checked against the autotuned library call of the same "
          f"input.\n\n{table}\n")
    print(md)
    write_results(args.name, dict(env=env, timing=timing, rows=rows), md, os.environ.get("OUT"))


if __name__ == "__main__":
    main()
