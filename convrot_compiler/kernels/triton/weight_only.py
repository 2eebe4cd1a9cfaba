"""Weight-only GEMMs for linears that see a few rows per sample: int4 (W4A16) and int8 (W8A16) weights.

Memory-bound: the cost is reading the weights, 4x fewer bytes than bf16. There is
too little arithmetic for tensor cores to matter, so each program multiplies on
CUDA cores and reduces: it owns BN output channels and BM rows and walks K, a
tile of packed bytes at a time. Weights use the per-group layout of
quant.pack_int4, so the low and high nibbles of a byte tile meet two contiguous
tiles of the input. A small BN gives many programs and many loads in flight. The kernel is bound by
instruction issue as much as by memory (60% issue slots busy, 29% of DRAM
bandwidth), so nibbles become floats through bit tricks, and each group's scale multiplies the
partial products of a tile once rather than every weight. Int8 weights (BITS = 8) take the same kernel,
each byte one value; bytes also become floats through the mantissa of 2^23.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from .common import autotune_configs, check_2d_rows, check_dense_vector, check_device, interpreting

# The fastest launch configs of a sweep at FLUX's shapes (H100: M = 1
# 3072->18432 30.2 us (1.80x bf16; 33.4 us before the nibble and scale tricks),
# M = 1 3072->9216 18.8 us, M = 4 3072->18432 48.3 us). A longer list let the autotuner's noise pick
# configs 1.6x slower. Tiles spanning several groups, with the scales gathered per byte, were slower
# still (53.5 us at M = 1 3072->18432).
_GPU_CONFIGS = [
    triton.Config({"BN": bn, "BKB": bk}, num_stages=s, num_warps=w)
    for bn, bk, s, w in [(8, 128, 2, 1), (8, 128, 4, 2), (8, 128, 2, 2)]
]
_INTERPRETER_CONFIG = triton.Config({"BN": 16, "BKB": 32}, num_warps=4)


@triton.jit
def _nibble_to_float(u):
    """A two's-complement nibble u (0..15, int32) as its float value -8..7, without an int-to-float
    conversion (a quarter-rate instruction on Hopper): u ^ 8 is the value + 8, OR-ed into the mantissa
    of 2^23 (one LOP3 together with the mask) and the exponent's 2^23 + 8 subtracted (exact)."""
    return (u ^ 0x4B000008).to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def _byte_to_float(v):
    """An int8 value v (sign-extended in int32) as float32: (v & 0xFF) ^ 0x80 is v + 128, OR-ed into the
    mantissa of 2^23 (one LOP3 with the exponent) and 2^23 + 128 subtracted."""
    return ((v & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.autotune(configs=autotune_configs(_GPU_CONFIGS, _INTERPRETER_CONFIG), key=["M", "N", "K", "BM", "BITS"])
@triton.jit
def _weight_only_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, c_ptr, M, N, K, KB, stride_xm, stride_wn, stride_sn, stride_cm,
                        HALF: tl.constexpr, HAS_BIAS: tl.constexpr, BITS: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BKB: tl.constexpr):
    """BITS = 4: a tile of packed bytes meets two tiles of the input (quant.pack_int4); BITS = 8: one. A tile
    lies within one scale group (2 * HALF inputs) either way."""
    tl.static_assert(HALF % BKB == 0, "a tile of packed bytes must lie within one group's half")
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rkb = tl.arange(0, BKB)
    mmask = rm < M
    nmask = rn < N
    rn_safe = (rn % N).to(tl.int64)
    w_ptrs = w_ptr + rn_safe[:, None] * stride_wn + rkb[None, :]
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    # element-wise partial sums, reduced across threads once after the loop
    acc = tl.zeros([BM, BN, BKB], dtype=tl.float32)
    for kb in range(0, KB, BKB):
        wi = tl.load(w_ptrs).to(tl.int32)
        if BITS == 4:
            s = tl.load(s_ptr + rn_safe * stride_sn + kb // HALF)
            k_lo = (kb // HALF) * (2 * HALF) + (kb % HALF) + rkb
            k_hi = k_lo + HALF
            x_lo = tl.load(x_rows + k_lo[None, :], mask=mmask[:, None] & (k_lo[None, :] < K), other=0.0).to(tl.float32)
            x_hi = tl.load(x_rows + k_hi[None, :], mask=mmask[:, None] & (k_hi[None, :] < K), other=0.0).to(tl.float32)
            w_lo = _nibble_to_float(wi & 0xF)
            w_hi = _nibble_to_float((wi >> 4) & 0xF)
            part = x_lo[:, None, :] * w_lo[None, :, :] + x_hi[:, None, :] * w_hi[None, :, :]
        else:
            s = tl.load(s_ptr + rn_safe * stride_sn + kb // (2 * HALF))
            k = kb + rkb
            x = tl.load(x_rows + k[None, :], mask=mmask[:, None] & (k[None, :] < K), other=0.0).to(tl.float32)
            part = x[:, None, :] * _byte_to_float(wi)[None, :, :]
        acc += part * s[None, :, None]
        w_ptrs += BKB
    out = tl.sum(acc, axis=2)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


# One activation row (M = 1: the adaLN modulation and the embedders at batch 1). The fastest configs of a
# sweep of 120 (H100, CUDA-graph replays): 25.7 us at 3072->18432 (2.12x cuBLAS
# bf16; the general kernel 30.8 us), 17.6 us at 3072->9216 (1.84x). What limits it: ncu_gemv_row.txt.
_ROW_GPU_CONFIGS = [
    triton.Config({"BN": bn, "BW": bw}, num_stages=s, num_warps=w)
    for bn, bw, s, w in [(32, 32, 1, 4), (4, 32, 2, 2), (16, 32, 1, 2)]
]
_ROW_INTERPRETER_CONFIG = triton.Config({"BN": 16, "BW": 8}, num_warps=4)


@triton.jit
def _nibble_at_19(w, SHIFT: tl.constexpr, USE_ASM: tl.constexpr):
    """The nibble u at bits SHIFT..SHIFT+3 of each uint32 word w as the float 1 + (u ^ 8) / 16: the nibble,
    its sign bit flipped, becomes the top four mantissa bits of 1.0. Two instructions on the GPU (a funnel
    shift and one LOP3 for the mask and the exponent; PTX through inline assembly, which the interpreter
    lacks, so it runs the same bits as plain shifts)."""
    if USE_ASM:
        bits = tl.inline_asm_elementwise(
            "{ .reg .b32 t; shf.l.wrap.b32 t, $1, $1, $2; lop3.b32 $0, t, 7864320, 1069547520, 0x6a; }",
            "=r,r,r", [w, tl.full(w.shape, (19 - SHIFT) % 32, tl.uint32)], dtype=tl.uint32, is_pure=True, pack=1)
    else:
        if SHIFT <= 19:
            moved = w << (19 - SHIFT)
        else:
            moved = w >> (SHIFT - 19)
        bits = (moved & 0x780000) ^ 0x3FC00000
    return bits.to(tl.float32, bitcast=True)


@triton.autotune(configs=autotune_configs(_ROW_GPU_CONFIGS, _ROW_INTERPRETER_CONFIG), key=["N", "K"])
@triton.jit
def _w4a16_row_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, c_ptr, N, K, KW, stride_wn, stride_sn,
                      HALF: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, USE_ASM: tl.constexpr,
                      BN: tl.constexpr, BW: tl.constexpr):
    """_w4a16_kernel for one row, with the weights read as uint32 words (four packed bytes: the low nibbles
    meet inputs k .. k+3 of a group's first half, the high nibbles the same places of its second half).

    Fewer instructions per weight byte than the general kernel, which is bound by instruction issue
    it: 2-D tiles only (its 3-D [BM, BN, BKB] tile moved every weight tile
    through shared memory); each nibble becomes f = 1 + (u ^ 8) / 16 in two instructions and meets its input
    in one FMA; sum x (u ^ 8 - 8) = 16 sum x f - 24 sum x, the last sum taken once per input, not per
    output channel. f x and x have the same magnitude, so nothing cancels catastrophically."""
    HALF_W: tl.constexpr = HALF // 4
    tl.static_assert(HALF_W % BW == 0, "a tile of words must lie within one group's half")
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rw = tl.arange(0, BW)
    nmask = rn < N
    rn_safe = (rn % N).to(tl.int64)
    w_ptrs = w_ptr + rn_safe[:, None] * stride_wn + rw[None, :]
    acc = tl.zeros([BN, BW], dtype=tl.float32)
    for kw in range(0, KW, BW):
        w = tl.load(w_ptrs).to(tl.uint32, bitcast=True)
        s = tl.load(s_ptr + rn_safe * stride_sn + kw // HALF_W)
        k0 = (kw // HALF_W) * (2 * HALF) + (kw % HALF_W) * 4 + rw * 4
        x0 = x_ptr + k0
        t = tl.zeros([BN, BW], dtype=tl.float32)
        xs = tl.zeros([BW], dtype=tl.float32)
        for j in tl.static_range(4):
            if EVEN_K:
                x_lo = tl.load(x0 + j).to(tl.float32)
                x_hi = tl.load(x0 + (j + HALF)).to(tl.float32)
            else:
                x_lo = tl.load(x0 + j, mask=k0 + j < K, other=0.0).to(tl.float32)
                x_hi = tl.load(x0 + (j + HALF), mask=k0 + (j + HALF) < K, other=0.0).to(tl.float32)
            t += _nibble_at_19(w, 8 * j, USE_ASM) * x_lo[None, :]
            t += _nibble_at_19(w, 8 * j + 4, USE_ASM) * x_hi[None, :]
            xs += x_lo + x_hi
        acc += s[:, None] * (16.0 * t - 24.0 * xs[None, :])
        w_ptrs += BW
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    tl.store(c_ptr + rn, out.to(c_ptr.dtype.element_ty), mask=nmask)


def _check(x: torch.Tensor, qw: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, group_size: int,
           bits: int) -> tuple[int, int, int, int]:
    """(m, k, n, bytes per weight row) of a weight-only GEMM's operands, checked."""
    name = f"w{bits}a16_gemm"
    check_device(x, qw, scale, bias)
    check_2d_rows("x", x)
    check_2d_rows("qw", qw)
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"{name} takes bf16, fp16 or fp32 activations, got {x.dtype}")
    if qw.dtype != torch.int8:
        raise TypeError(f"{name}: weights must be int8 bytes, got {qw.dtype}")
    m, k = x.shape
    n, kb = qw.shape
    per_byte = 2 if bits == 4 else 1
    if per_byte * kb < k or (per_byte * kb) % group_size:
        raise ValueError(f"{name}: weights ({kb} bytes per row) must cover K={k} in whole groups of {group_size}")
    if group_size % 256:
        raise ValueError(f"{name} needs group_size a multiple of 256, got {group_size}")
    if scale.shape != (n, per_byte * kb // group_size) or scale.dtype != torch.float32:
        raise ValueError(f"scale must be float32 [{n}, {per_byte * kb // group_size}], got {tuple(scale.shape)} "
                         f"{scale.dtype}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
    check_2d_rows("scale", scale)
    if bias is not None:
        check_dense_vector("bias", bias)
    return m, k, n, kb


def _launch_general(x, qw, scale, bias, c, group_size: int, bits: int) -> torch.Tensor:
    m, k = x.shape
    n, kb = qw.shape
    bm = 1 if m == 1 else 2 if m == 2 else 4 if m <= 4 else 8
    grid = lambda meta: (triton.cdiv(n, meta["BN"]), triton.cdiv(m, bm))  # noqa: E731
    _weight_only_kernel[grid](x, qw, scale, bias if bias is not None else scale, c, m, n, k, kb, x.stride(0),
                              qw.stride(0), scale.stride(0), c.stride(0), HALF=group_size // 2,
                              HAS_BIAS=bias is not None, BITS=bits, BM=bm)
    return c


def w4a16_gemm(x: torch.Tensor, qw: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               group_size: int, row_kernel: bool = True) -> torch.Tensor:
    """[M, N] = x @ dequant(qw)^T (+ bias): qw packed int4 [N, K'/2] (per-group layout of quant.pack_int4)
    with float32 scales [N, K'/group_size]. Meant for M of 1 to 8; larger M works but rereads weights.
    M = 1 runs the one-row kernel unless ``row_kernel`` is False (the general kernel, for comparisons)."""
    m, k, n, kb = _check(x, qw, scale, bias, group_size, 4)
    c = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return c
    aligned = qw.stride(0) % 4 == 0 and qw.data_ptr() % 4 == 0
    if m == 1 and row_kernel and not aligned:
        warnings.warn("w4a16_gemm: the packed weights' rows are not 4-byte aligned, so M = 1 runs the general "
                      "kernel (same result, slower); pass a contiguous weight tensor for the one-row kernel")
    if m == 1 and row_kernel and aligned:
        words = qw.view(torch.int32)  # kb is a multiple of group_size // 2, itself of 128
        grid = lambda meta: (triton.cdiv(n, meta["BN"]),)  # noqa: E731
        _w4a16_row_kernel[grid](x, words, scale, bias if bias is not None else scale, c, n, k, kb // 4,
                                qw.stride(0) // 4, scale.stride(0), HALF=group_size // 2, HAS_BIAS=bias is not None,
                                EVEN_K=k == 2 * kb, USE_ASM=not interpreting())
        return c
    return _launch_general(x, qw, scale, bias, c, group_size, 4)


def w8a16_gemm(x: torch.Tensor, qw: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               group_size: int) -> torch.Tensor:
    """[M, N] = x @ dequant(qw)^T (+ bias): qw int8 [N, K'] with float32 scales [N, K'/group_size]. Meant for M
    of 1 to 8; larger M works but rereads the weights."""
    m, k, n, kb = _check(x, qw, scale, bias, group_size, 8)
    c = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return c
    return _launch_general(x, qw, scale, bias, c, group_size, 8)
