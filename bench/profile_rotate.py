"""One rotate+quantize launch, bracketed for ncu --profile-from-start off.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight ... python bench/profile_rotate.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from convrot_compiler.kernels.rotate_quant import rotate_quantize  # noqa: E402
from convrot_compiler.rotations import GroupHadamardRotation  # noqa: E402


def main(m: int = 4608, k: int = 3072, bits: int = 4) -> None:
    x = (torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16)
    h = GroupHadamardRotation("regular", 256).kernel_matrix().cuda()
    rotate_quantize(x, h, 256, bits)  # autotune outside the profiled range
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    rotate_quantize(x, h, 256, bits)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
