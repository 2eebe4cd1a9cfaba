"""Int8 weight-only GEMM (W8A16) for linears that see a few rows per sample: the adaLN modulation and the
time/text embedders, where 4-bit weights cost most of a model's error.

Memory-bound like the W4A16 kernel (weight_only.py): half the bytes of bf16 to read, too little arithmetic
for tensor cores. Each program owns BN output channels and BM rows and walks K a tile of BK weights at a
time, a tile lying within one scale group; products are summed element-wise and reduced once after the
loop, and each group's scale multiplies a tile's products once. Bytes become floats without an int-to-float
conversion (a quarter-rate instruction on Hopper): the byte, its sign bit flipped, is OR-ed into the
mantissa of 2^23, whose exponent and offset are then subtracted (exact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import autotune_configs, check_2d_rows, check_device

# Not yet swept on a GPU: tiles a warp reads as contiguous 16-byte runs of one channel's weights.
_GPU_CONFIGS = [
    triton.Config({"BN": bn, "BK": bk}, num_stages=s, num_warps=w)
    for bn, bk, s, w in [(8, 256, 2, 2), (16, 128, 3, 4), (4, 256, 2, 1)]
]
_INTERPRETER_CONFIG = triton.Config({"BN": 16, "BK": 32}, num_warps=4)


@triton.jit
def _byte_to_float(v):
    """An int8 value v (sign-extended in int32) as float32: (v & 0xFF) ^ 0x80 is v + 128, OR-ed into the
    mantissa of 2^23 (one LOP3 with the exponent) and 2^23 + 128 subtracted."""
    return ((v & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


def _within_a_group(configs, named_args, **kwargs):
    g = kwargs.get("G", named_args.get("G"))
    return [c for c in configs if g % c.kwargs["BK"] == 0] or [triton.Config({"BN": 8, "BK": g}, num_warps=2)]


@triton.autotune(configs=autotune_configs(_GPU_CONFIGS, _INTERPRETER_CONFIG), key=["M", "N", "K", "BM", "G"],
                 prune_configs_by={"early_config_prune": _within_a_group})
@triton.jit
def _w8a16_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, c_ptr, M, N, K, KP, stride_xm, stride_wn, stride_sn, stride_cm,
                  G: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    tl.static_assert(G % BK == 0, "a tile of weights must lie within one scale group")
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mmask = rm < M
    nmask = rn < N
    rn_safe = (rn % N).to(tl.int64)
    w_ptrs = w_ptr + rn_safe[:, None] * stride_wn + rk[None, :]
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros([BM, BN, BK], dtype=tl.float32)
    for k in range(0, KP, BK):
        w = _byte_to_float(tl.load(w_ptrs).to(tl.int32))
        s = tl.load(s_ptr + rn_safe * stride_sn + k // G)
        x = tl.load(x_rows + (k + rk)[None, :], mask=mmask[:, None] & ((k + rk)[None, :] < K), other=0.0)
        acc += x.to(tl.float32)[:, None, :] * (w * s[:, None])[None, :, :]
        w_ptrs += BK
    out = tl.sum(acc, axis=2)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def w8a16_gemm(x: torch.Tensor, qw: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               group_size: int) -> torch.Tensor:
    """[M, N] = x @ dequant(qw)^T (+ bias): qw int8 [N, K'] with float32 scales [N, K'/group_size], K' a
    multiple of group_size (>= 32, a power of two) covering x's K. Meant for M of 1 to 8; larger M works but
    rereads the weights."""
    check_device(x, qw, scale)
    check_2d_rows("x", x)
    check_2d_rows("qw", qw)
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"w8a16_gemm takes bf16, fp16 or fp32 activations, got {x.dtype}")
    if qw.dtype != torch.int8:
        raise TypeError(f"w8a16 weights must be int8, got {qw.dtype}")
    m, k = x.shape
    n, kp = qw.shape
    if kp < k or kp % group_size or group_size < 32 or group_size & (group_size - 1):
        raise ValueError(f"int8 weights ({kp} per row) must cover K={k} in whole groups of a power of two >= 32, "
                         f"got group_size {group_size}")
    if scale.shape != (n, kp // group_size) or scale.dtype != torch.float32:
        raise ValueError(f"scale must be float32 [{n}, {kp // group_size}], got {tuple(scale.shape)} {scale.dtype}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
    c = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return c
    bm = 1 if m == 1 else 2 if m == 2 else 4 if m <= 4 else 8
    grid = lambda meta: (triton.cdiv(n, meta["BN"]), triton.cdiv(m, bm))  # noqa: E731
    _w8a16_kernel[grid](x, qw, scale, bias if bias is not None else scale, c, m, n, k, kp, x.stride(0), qw.stride(0),
                        scale.stride(0), c.stride(0), G=group_size, HAS_BIAS=bias is not None, BM=bm)
    return c
