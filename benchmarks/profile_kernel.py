"""One launch of a convrot kernel, bracketed for ncu --profile-from-start off (autotuning runs before).

    ncu --clock-control none --profile-from-start off --section SpeedOfLight ... python benchmarks/profile_kernel.py rotate
                                                       # rotate+quantize as the model runs it (ops/dispatch.py)
    ... python benchmarks/profile_kernel.py rotate-mma   # the sm_90 kernel storing each group in the mma channel order
    ... python benchmarks/profile_kernel.py gemv     # W4A16 at M = 1, 3072 -> 18432
    ... python benchmarks/profile_kernel.py gemm     # persistent warp-specialized int8 GEMM, 4608 x 3072 -> 12288
    ... python benchmarks/profile_kernel.py packed   # the sm_90 packed W4A4 GEMM as FLUX.1-dev's single blocks run
                                                     # it: 4608 x 3072 -> Q, K, V and MLP in (21504), GELU on the MLP
"""

from __future__ import annotations

import sys

import torch

from convrot_compiler.kernels.triton.int_gemm import int_gemm
from convrot_compiler.kernels.triton.weight_only import w4a16_gemm
from convrot_compiler.numerics.quant import quantize_weight
from convrot_compiler.numerics.rotations import GroupHadamardRotation
from convrot_compiler.ops.dispatch import rotate_quantize


def rotate(m: int = 4608, k: int = 3072, bits: int = 4):
    x = (torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16)
    h = GroupHadamardRotation("regular", 256).kernel_matrix().cuda()
    return lambda: rotate_quantize(x, h, 256, bits)


def rotate_mma(m: int = 4608, k: int = 3072, bits: int = 4):
    from convrot_compiler.kernels.sm90.rotate_quant import rotate_quantize_sm90

    x = (torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16)
    h = GroupHadamardRotation("regular", 256).kernel_matrix().cuda()
    return lambda: rotate_quantize_sm90(x, h, bits, order="mma")


def gemv(m: int = 1, k: int = 3072, n: int = 18432):
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    qw = quantize_weight((torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16), "w4a16", None, group_size=256)
    return lambda: w4a16_gemm(x, qw.values, qw.scale, None, 256)


def gemm(m: int = 4608, k: int = 3072, n: int = 12288):
    x = torch.randint(-7, 8, (m, k), dtype=torch.int8, device="cuda")
    w = torch.randint(-7, 8, (n, k), dtype=torch.int8, device="cuda")
    sx = torch.rand(m, device="cuda") + 0.5
    sw = torch.rand(n, device="cuda") + 0.5
    return lambda: int_gemm(x, sx, w, sw, None, False, 256, torch.bfloat16, persistent=True,
                            warp_specialize=True)


def packed(m: int = 4608, k: int = 3072):
    from convrot_compiler.numerics.quant import pack_int4
    from convrot_compiler.ops import dispatch

    ns = (3072, 3072, 3072, 12288)
    x = torch.randint(-7, 8, (m, k), dtype=torch.int8, device="cuda")
    ws = [pack_int4(torch.randint(-7, 8, (n, k), dtype=torch.int8, device="cuda"), 256) for n in ns]
    sx = torch.rand(m, device="cuda") + 0.5
    sws = [(torch.rand(n, device="cuda") + 0.5) * 1e-3 for n in ns]
    return lambda: dispatch.int_gemm(x, sx, ws, sws, [None] * 4, True, 256, torch.bfloat16, gelu_from=9216)


KERNELS = {"rotate": rotate, "rotate-mma": rotate_mma, "gemv": gemv, "gemm": gemm, "packed": packed}


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "rotate"
    if name not in KERNELS:
        sys.exit(f"usage: python benchmarks/profile_kernel.py {'|'.join(KERNELS)}")
    launch = KERNELS[name]()
    launch()  # autotune outside the profiled range
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    launch()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
