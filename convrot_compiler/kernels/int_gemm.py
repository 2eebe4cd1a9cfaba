"""Quantized GEMM on int8 tensor cores: C = float(A @ B^T) * sa[:, None] * sb[None, :] (+ bias).

Hopper has no int4 tensor cores (mma s4 is emulated at ~1/20 the int8 rate), so
W4A4 keeps int4 storage and int4 numerics but multiplies on int8 units. Both
operands are packed the same way (value 2j in the low nibble of byte j, 2j+1 in
the high one), so a packed K-tile splits into two plain int8 dots, low nibbles
with low nibbles and high with high, and no register shuffle is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import autotune_configs, check_2d_rows, check_device

_GPU_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BKB": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
    for bm, bn, bk, s, w in [
        (128, 128, 128, 4, 8), (128, 256, 128, 3, 8), (128, 256, 64, 4, 8), (128, 128, 64, 5, 4),
        (64, 128, 128, 4, 4), (256, 128, 128, 3, 8), (128, 64, 128, 4, 4),
    ]
]
_INTERPRETER_CONFIG = triton.Config({"BM": 16, "BN": 16, "BKB": 32, "GROUP_M": 2}, num_warps=4)


@triton.autotune(configs=autotune_configs(_GPU_CONFIGS, _INTERPRETER_CONFIG), key=["M", "N", "KB", "PACKED"])
@triton.jit
def _int_gemm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, KB, stride_am, stride_bn, stride_cm,
                     HAS_BIAS: tl.constexpr, PACKED: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BKB: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % per_group) % size_m)
    pid_n = (pid % per_group) // size_m

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BKB)
    a_ptrs = a_ptr + (rm % M)[:, None].to(tl.int64) * stride_am + rk[None, :]
    b_ptrs = b_ptr + (rn % N)[:, None].to(tl.int64) * stride_bn + rk[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    for _ in range(0, KB, BKB):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        if PACKED:
            a_lo = ((a << 4) >> 4).to(tl.int8)
            b_lo = ((b << 4) >> 4).to(tl.int8)
            acc = tl.dot(a_lo, tl.trans(b_lo), acc, out_dtype=tl.int32)
            acc = tl.dot((a >> 4).to(tl.int8), tl.trans((b >> 4).to(tl.int8)), acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        a_ptrs += BKB
        b_ptrs += BKB

    mmask = rm < M
    nmask = rn < N
    sa = tl.load(sa_ptr + rm, mask=mmask, other=0.0)
    sb = tl.load(sb_ptr + rn, mask=nmask, other=0.0)
    out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def int_gemm(qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor, bias: torch.Tensor | None,
             packed: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """[M, N] = (qa @ qb^T) * sa * sb (+ bias). qa [M, KB], qb [N, KB] int8 (int4 pairs when ``packed``);
    KB must be a multiple of 128 (K a multiple of 256 for int4, as the rotation group guarantees)."""
    check_device(qa, sa, qb, sb)
    check_2d_rows("qa", qa)
    check_2d_rows("qb", qb)
    if qa.dtype != torch.int8 or qb.dtype != torch.int8:
        raise TypeError(f"int_gemm takes int8 operands, got {qa.dtype} and {qb.dtype}")
    m, kb = qa.shape
    n = qb.shape[0]
    if qb.shape[1] != kb:
        raise ValueError(f"K mismatch: activations have {kb} bytes per row, weights {qb.shape[1]}")
    if kb % 128:
        raise ValueError(f"K ({kb} bytes per row) must be a multiple of 128: pad K to the rotation group size")
    if sa.shape != (m,) or sb.shape != (n,) or sa.dtype != torch.float32 or sb.dtype != torch.float32:
        raise ValueError(f"scales must be float32 [M]={m} and [N]={n}, got {tuple(sa.shape)} {sa.dtype} and "
                         f"{tuple(sb.shape)} {sb.dtype}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
    c = torch.empty(m, n, dtype=out_dtype, device=qa.device)
    if m == 0 or n == 0:
        return c
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    _int_gemm_kernel[grid](qa, qb, sa, sb, bias if bias is not None else sb, c, m, n, kb,
                           qa.stride(0), qb.stride(0), c.stride(0), HAS_BIAS=bias is not None, PACKED=packed)
    return c
