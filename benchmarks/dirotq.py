"""DiRotQ's linear against ConvRot's and cuBLAS bf16 at FLUX.1-dev token-GEMM shapes, one process.

For each shape: bf16 ``torch.mm``; ConvRot W4A4 as the compiler runs it (rotate+quantize, then the int4 GEMM,
ops/dispatch.py), and its GEMM alone; DiRotQ as the compiler runs it (kernels/triton/pca.py: the fused basis
rotation + split + group-64 quantization; then the 16-bit + group-scaled int4 GEMM, on sm_90 kernels/sm90/pca_gemm.py,
also timed in Triton's form), each part timed alone and the two together. 12.5% of each block's
channels in 16 bits, blocks of at most 3072 inputs (numerics/pca.py). Every time is the median of CUDA-graph
replays with L2 flushed (benchmarks/timing.py). Correctness in the same run: each quantized output's error
against the float product, and DiRotQ's kernels against its reference.

    python benchmarks/dirotq.py [--name STEM] [--out DIR]
"""

from __future__ import annotations

import torch
from args import gpu_benchmark_args  # benchmarks/args.py
from timing import bench_graph_ms  # benchmarks/timing.py

from convrot_compiler.kernels.triton.pca import pca_gemm as triton_pca_gemm
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
    qx, sx = dispatch.rotate_quantize(x, h, 256, 4, order=order)
    t_convrot_gemm = bench_graph_ms(lambda: dispatch.int_gemm(qx, sx, [qw.values], [qw.scale], [None], True, 256,
                                                              torch.bfloat16))

    pw = pca_quantize_weight(w, moments, 0.125, 64)
    zqs = dispatch.pca_rotate_quantize(x, pw.basis, None, pw.rank, 64)
    t_rq = bench_graph_ms(lambda: dispatch.pca_rotate_quantize(x, pw.basis, None, pw.rank, 64))
    t_gemm = bench_graph_ms(lambda: dispatch.pca_gemm(*zqs, pw.w_hi, pw.values, pw.scale, None, 64))
    t_gemm_triton = bench_graph_ms(lambda: triton_pca_gemm(*zqs, pw.w_hi, pw.values, pw.scale, None, 64))
    gemm_vs_triton = relative_error(dispatch.pca_gemm(*zqs, pw.w_hi, pw.values, pw.scale, None, 64),
                                    triton_pca_gemm(*zqs, pw.w_hi, pw.values, pw.scale, None, 64).float())

    def dirotq():
        return dispatch.pca_gemm(*dispatch.pca_rotate_quantize(x, pw.basis, None, pw.rank, 64), pw.w_hi, pw.values,
                                 pw.scale, None, 64)

    t_dirotq = bench_graph_ms(dirotq)
    out = dirotq()
    z_ref, q_ref, s_ref = pca_rotate_quantize(x, pw.basis, None, pw.rank, 64)
    kernel_vs_ref = relative_error(out, pca_matmul(z_ref, q_ref, s_ref, pw.w_hi, pw.values, pw.scale, None, 64))
    return dict(shape=name, M=m, K=k, N=n, blocks=nb, rank_per_block=pw.rank, bf16_us=t_bf16 * 1e3,
                convrot_us=t_convrot * 1e3, dirotq_us=t_dirotq * 1e3, dirotq_rotate_us=t_rq * 1e3,
                dirotq_gemm_us=t_gemm * 1e3, dirotq_gemm_triton_us=t_gemm_triton * 1e3,
                convrot_gemm_us=t_convrot_gemm * 1e3, dirotq_vs_convrot=t_dirotq / t_convrot,
                dirotq_gemm_vs_convrot_gemm=t_gemm / t_convrot_gemm, err_convrot=err_convrot,
                err_dirotq=relative_error(out, ref), dirotq_kernel_vs_reference=kernel_vs_ref,
                gemm_vs_triton_gemm=gemm_vs_triton)


# the linear inputs of one FLUX.1-dev forward at 1024² (4096 image + 512 text tokens): (tokens, width, inputs)
FORWARD_INPUTS = [(4096, 3072, 19 * 3), (4096, 12288, 19), (512, 3072, 19 * 3), (512, 12288, 19),
                  (4608, 3072, 38), (4608, 15360, 38)]


def forward_rotation() -> dict:
    """The basis rotations of one FLUX.1-dev forward at 1024² (one per linear input: Q, K and V share theirs),
    each shape timed once and counted: as the fused kernel runs them, and as cuBLAS runs the same bf16 products
    alone (no split, no quantization), a floor for a bf16 rotation."""
    rows, ours, cublas = [], 0.0, 0.0
    for m, k, count in FORWARD_INPUTS:
        nb, b = block_shape(k)
        x = torch.randn(m, k, device="cuda").bfloat16()
        basis = torch.linalg.qr(torch.randn(nb, b, b, device="cuda"))[0].bfloat16()
        rank = 384 * b // 3072
        t_ours = bench_graph_ms(lambda: dispatch.pca_rotate_quantize(x, basis, None, rank, 64))
        xb = x.view(m, nb, b).transpose(0, 1)
        t_cublas = bench_graph_ms(lambda: torch.bmm(xb, basis))
        rows.append(dict(M=m, K=k, count=count, ours_us=t_ours * 1e3, cublas_us=t_cublas * 1e3,
                         tflops=2 * m * k * b / t_ours / 1e9))
        ours += count * t_ours
        cublas += count * t_cublas
    return dict(rows=rows, ours_ms=ours, cublas_ms=cublas)


def main() -> None:
    args = gpu_benchmark_args("dirotq", __doc__.splitlines()[0])
    from tabulate import tabulate

    env = environment()
    rows = [bench_shape(name, 4608, k, n) for name, k, n in SHAPES]
    table = tabulate([[r["shape"], f"{r['blocks']}x{r['rank_per_block']}", f"{r['bf16_us']:.0f}",
                       f"{r['convrot_us']:.0f}", f"{r['convrot_gemm_us']:.0f}", f"{r['dirotq_us']:.0f}",
                       f"{r['dirotq_rotate_us']:.0f}", f"{r['dirotq_gemm_us']:.0f}",
                       f"{r['dirotq_gemm_triton_us']:.0f}",
                       f"{r['dirotq_vs_convrot']:.2f}", f"{r['dirotq_gemm_vs_convrot_gemm']:.2f}",
                       f"{r['err_convrot']:.3f}", f"{r['err_dirotq']:.3f}", f"{r['dirotq_kernel_vs_reference']:.1e}",
                       f"{r['gemm_vs_triton_gemm']:.1e}"]
                      for r in rows],
                     headers=["shape (M = 4608)", "blocks x r", "bf16 us", "ConvRot us", "ConvRot GEMM us", "DiRotQ us",
                              "DiRotQ rotate+quant us", "DiRotQ GEMM us", "Triton DiRotQ GEMM us", "DiRotQ / ConvRot",
                              "DiRotQ GEMM / ConvRot GEMM", "err ConvRot", "err DiRotQ", "DiRotQ kernels vs ref",
                              "GEMM vs Triton's"], tablefmt="github")
    fwd = forward_rotation()
    fwd_table = tabulate([[r["M"], r["K"], r["count"], f"{r['ours_us']:.0f}", f"{r['tflops']:.0f}",
                           f"{r['cublas_us']:.0f}"] for r in fwd["rows"]],
                         headers=["tokens", "width", "per forward", "rotate+quant us", "TFLOP/s", "cuBLAS bf16 us"],
                         tablefmt="github")
    md = (f"# DiRotQ vs ConvRot, one linear\n\nGPU {env.get('gpu')} | torch {env['torch']} | triton {env['triton']} | "
          f"{env['date']} | CUDA-graph replays, median, L2 flushed; DiT-like synthetic activations (a rank-64 "
          f"subspace, 16 outlier channels)\n\n{table}\n\n"
          f"## The rotations of one FLUX.1-dev forward at 1024²\n\nOne per linear input, blocks of at most 3072: "
          f"**{fwd['ours_ms']:.1f} ms** as the fused kernel runs them; the bf16 products alone in cuBLAS: "
          f"**{fwd['cublas_ms']:.1f} ms**.\n\n{fwd_table}\n")
    print(md)
    print("written:", *write_results(args.name, dict(env=env, rows=rows, forward_rotation=fwd), md, args.out))


if __name__ == "__main__":
    main()
