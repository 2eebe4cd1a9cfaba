"""Probe: the tensor-core W4A16 kernel (kernels/weight_only_sm90.py) against the CUDA-core one
(kernels/weight_only.py) and cuBLAS bf16, over launch configs, at FLUX.1-dev's few-row shapes.
Every timing is a CUDA-graph replay with the L2 flushed (bench_graph_ms); every kernel output is
checked against the float reference in the same run. Writes markdown + JSON to --out.

    python bench/probe_w4a16_tiles.py --out bench/results/w4a16_tiles
"""
import argparse
import json
import os
import sys

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._common import bench_graph_ms  # noqa: E402
from convrot_compiler.kernels.weight_only import w4a16_gemm  # noqa: E402
from convrot_compiler.kernels.weight_only_sm90 import w4a16_gemm_tiles  # noqa: E402
from convrot_compiler.quant import pack_int4_tiles, quantize_weight, unpack_int4, weight_only_gemm  # noqa: E402

# (name, K, N): adaLN of the double blocks (x2 per block), of the single blocks, norm_out, the embedders
SHAPES = [("adaLN double 3072->18432", 3072, 18432), ("adaLN single 3072->9216", 3072, 9216),
          ("norm_out 3072->6144", 3072, 6144), ("embedder 3072->3072", 3072, 3072),
          ("pooled text 768->3072", 768, 3072), ("timestep 256->3072", 256, 3072)]
CONFIGS = [(u, w, p) for u in (1, 2, 4) for w in (2, 4, 8) for p in (False, True)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--m", default="1,4,8")
    ap.add_argument("--quick", action="store_true", help="first shape, M = 1, configs of U <= 2 only")
    args = ap.parse_args()
    ms_list = [1] if args.quick else [int(v) for v in args.m.split(",")]
    shapes = SHAPES[:1] if args.quick else SHAPES
    configs = [c for c in CONFIGS if c[0] <= 2] if args.quick else CONFIGS
    gpu = torch.cuda.get_device_name()
    rows, best_rows = [], []
    for name, k, n in shapes:
        torch.manual_seed(0)
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        qw = quantize_weight(w, "w4a16", None, group_size=256)
        tiles = pack_int4_tiles(unpack_int4(qw.values, 256))
        for m in ms_list:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            ref = weight_only_gemm(x.float(), qw.values, qw.scale, None, 256)
            t_bf16 = bench_graph_ms(lambda: torch.mm(x, w.T)) * 1e3
            t_row = bench_graph_ms(lambda: w4a16_gemm(x, qw.values, qw.scale, None, 256)) * 1e3
            err_row = rel_err(w4a16_gemm(x, qw.values, qw.scale, None, 256), ref)
            timings = []
            for u, warps, pre in configs:
                out = w4a16_gemm_tiles(x, tiles, qw.scale, None, 256, config=(u, warps, pre))
                err = rel_err(out, ref)
                t = bench_graph_ms(lambda: w4a16_gemm_tiles(x, tiles, qw.scale, None, 256, config=(u, warps, pre))) * 1e3
                timings.append((t, u, warps, pre, err))
                rows.append(dict(shape=name, M=m, U=u, warps=warps, prefetch=pre, us=t, rel_err=err))
            t, u, warps, pre, err = min(timings)
            wbytes = tiles.numel() * 4 + qw.scale.numel() * 4
            best_rows.append(dict(shape=name, M=m, bf16_us=t_bf16, cuda_core_us=t_row, tiles_us=t,
                                  x_bf16=t_bf16 / t, x_cuda_core=t_row / t, tiles_gbs=wbytes / t / 1e3,
                                  config=f"U={u} w={warps} pre={int(pre)}", err_tiles=err, err_cuda_core=err_row))
            print(best_rows[-1], flush=True)
    head = (f"GPU {gpu} | torch {torch.__version__} | CUDA-graph replays, L2 flushed (bench_graph_ms), median | "
            "error: relative Frobenius vs the float32 reference")
    table = tabulate(best_rows, headers="keys", floatfmt=".3g", tablefmt="github")
    configs_table = tabulate(rows, headers="keys", floatfmt=".3g", tablefmt="github")
    print(head)
    print(table)
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write(f"# W4A16: tensor-core tiles kernel vs CUDA-core kernel vs cuBLAS bf16\n\n{head}\n\n"
                    f"Best config per shape:\n\n{table}\n\nEvery config:\n\n{configs_table}\n")
        with open(args.out + ".json", "w") as f:
            json.dump(dict(gpu=gpu, torch=torch.__version__, best=best_rows, configs=rows), f, indent=1)


if __name__ == "__main__":
    main()
