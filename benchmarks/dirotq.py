"""DiRotQ's linear against ConvRot's and cuBLAS bf16 at FLUX.1-dev token-GEMM shapes, one process.

For each shape: bf16 ``torch.mm``; ConvRot W4A4 as the compiler runs it (rotate+quantize, then the int4 GEMM,
ops/dispatch.py); DiRotQ (kernels/triton/pca.py: the fused basis rotation + split + group-64 quantization, then
the 16-bit + group-scaled int4 GEMM), each part timed alone and the two together. 12.5% of each block's
channels in 16 bits, blocks of at most 3072 inputs (numerics/pca.py). Every time is the median of CUDA-graph
replays with L2 flushed (benchmarks/timing.py). Correctness in the same run: each quantized output's error
against the float product, and DiRotQ's kernels against its reference.

    python benchmarks/dirotq.py [--name STEM] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys

import torch
from timing import bench_graph_ms  # benchmarks/timing.py

from convrot_compiler.numerics.error import relative_error
from convrot_compiler.numerics.pca import block_shape, pca_matmul, pca_quantize_weight, pca_rotate_quantize
from convrot_compiler.numerics.quant import quantize_weight
from convrot_compiler.numerics.rotations import GroupHadamardRotation
from convrot_compiler.ops import dispatch, quantized_linear
from convrot_compiler.tools.bench_model import environment, write_results

SHAPES = [("qkv/out 3072->3072", 3072, 3072), ("ff up 3072->12288", 3072, 12288),
          ("ff down 12288->3072", 12288, 3072), ("single proj_out 15360->3072", 15360, 3072)]


def dit_like(m: int, k: int, device: str) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(k)
    u = torch.randn(k, 64, device=device, generator=g)
    x = (torch.randn(m, 64, device=device, generator=g) * 4) @ u.T / 8 + 0.5 * torch.randn(m, k, device=device,
                                                                                            generator=g)
    x[:, :16] *= 10
    return x.bfloat16()


def bench_shape(name: str, m: int, k: int, n: int) -> dict:
    x = dit_like(m, k, "cuda")
    w = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
    nb, b = block_shape(k)
    xb = x.float().reshape(m, nb, b).transpose(0, 1)
    moments = xb.transpose(1, 2) @ xb / m
    ref = x.float() @ w.float().T
    t_bf16 = bench_graph_ms(lambda: torch.mm(x, w.T))

    rot = GroupHadamardRotation("regular", 256)
    order = dispatch.act_order_for(x.device, x.dtype, 256, True)
    qw = quantize_weight(w, "w4a4", rot, act_order=order)
    h = rot.kernel_matrix().to("cuda", torch.bfloat16)
    convrot = lambda: quantized_linear(x, qw.values, qw.scale, h, None, "w4a4", 256, n, order)  # noqa: E731
    t_convrot = bench_graph_ms(convrot)
    err_convrot = relative_error(convrot(), ref)

    pw = pca_quantize_weight(w, moments, 0.125, 64)
    zqs = dispatch.pca_rotate_quantize(x, pw.basis, None, pw.rank, 64)
    t_rq = bench_graph_ms(lambda: dispatch.pca_rotate_quantize(x, pw.basis, None, pw.rank, 64))
    t_gemm = bench_graph_ms(lambda: dispatch.pca_gemm(*zqs, pw.w_hi, pw.values, pw.scale, None, 64))

    def dirotq():
        return dispatch.pca_gemm(*dispatch.pca_rotate_quantize(x, pw.basis, None, pw.rank, 64), pw.w_hi, pw.values,
                                 pw.scale, None, 64)

    t_dirotq = bench_graph_ms(dirotq)
    out = dirotq()
    z_ref, q_ref, s_ref = pca_rotate_quantize(x, pw.basis, None, pw.rank, 64)
    kernel_vs_ref = relative_error(out, pca_matmul(z_ref, q_ref, s_ref, pw.w_hi, pw.values, pw.scale, None, 64))
    return dict(shape=name, M=m, K=k, N=n, blocks=nb, rank_per_block=pw.rank, bf16_us=t_bf16 * 1e3,
                convrot_us=t_convrot * 1e3, dirotq_us=t_dirotq * 1e3, dirotq_rotate_us=t_rq * 1e3,
                dirotq_gemm_us=t_gemm * 1e3, dirotq_vs_convrot=t_dirotq / t_convrot,
                dirotq_gemm_vs_convrot=t_gemm / t_convrot, err_convrot=err_convrot, err_dirotq=relative_error(out, ref),
                dirotq_kernel_vs_reference=kernel_vs_ref)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--name", default="dirotq")
    p.add_argument("--out", help="result folder (default $OUT if set, else ./convrot-out/bench)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/dirotq.py needs a CUDA GPU")
    from tabulate import tabulate

    env = environment()
    rows = [bench_shape(name, 4608, k, n) for name, k, n in SHAPES]
    table = tabulate([[r["shape"], f"{r['blocks']}x{r['rank_per_block']}", f"{r['bf16_us']:.0f}",
                       f"{r['convrot_us']:.0f}", f"{r['dirotq_us']:.0f}", f"{r['dirotq_rotate_us']:.0f}",
                       f"{r['dirotq_gemm_us']:.0f}", f"{r['dirotq_vs_convrot']:.2f}", f"{r['dirotq_gemm_vs_convrot']:.2f}",
                       f"{r['err_convrot']:.3f}", f"{r['err_dirotq']:.3f}", f"{r['dirotq_kernel_vs_reference']:.1e}"]
                      for r in rows],
                     headers=["shape (M = 4608)", "blocks x r", "bf16 us", "ConvRot us", "DiRotQ us",
                              "DiRotQ rotate+quant us", "DiRotQ GEMM us", "DiRotQ / ConvRot", "DiRotQ GEMM / ConvRot",
                              "err ConvRot", "err DiRotQ", "DiRotQ kernels vs ref"], tablefmt="github")
    md = (f"# DiRotQ vs ConvRot, one linear\n\nGPU {env.get('gpu')} | torch {env['torch']} | triton {env['triton']} | "
          f"{env['date']} | CUDA-graph replays, median, L2 flushed; DiT-like synthetic activations (a rank-64 "
          f"subspace, 16 outlier channels)\n\n{table}\n")
    print(md)
    print("written:", *write_results(args.name, dict(env=env, rows=rows), md, args.out))


if __name__ == "__main__":
    main()
