"""DiRotQ's kernels: the basis rotation fused with the subspace split and the group quantization, and the GEMM
that adds the 16-bit subspace's product to the group-scaled int4 one. Reference: numerics/pca.py.

rotate+split+quantize: a program computes a [BM, BN] tile of z_j = x_j B_j on tensor cores (float32
accumulation, over the b inputs of its block j, operands loaded by TMA), BN up to 256 columns of whole
quantization groups. Its columns in the block's first r are stored in 16 bits; the others are multiplied group by
group by the Hadamard (optional) and quantized with one scale per row and group: a group needs no other tile, so
the rotation and the quantization are one kernel and z never goes to memory. (One group per program re-read the
activations once per 64 columns: 2.9x cuBLAS's time for the same product on an H100, against 1.5x now.)

GEMM: a program owns a [BM, BN] output tile. It multiplies the 16-bit subspace (bf16 x bf16 -> float32), then
each group of the rest: two int8 products of G/2 inputs (the packed bytes' low and high nibbles, quant.pack_int4)
into one int32 tile, scaled by the rows' and channels' scales of that group into the float32 accumulator.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...numerics.pca import int4_pack
from .common import autotune_configs, check_2d_rows, check_dense_vector, check_device, interpreting, round_half_even

_QUANT_GPU_CONFIGS = [triton.Config({"BM": bm, "BK": bk}, num_stages=st, num_warps=w)
                      for bm, bk, st, w in [(128, 64, 4, 8), (128, 64, 3, 8), (64, 64, 4, 4)]]
_QUANT_INTERPRETER = triton.Config({"BM": 16, "BK": 32}, num_warps=4)
_GEMM_GPU_CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BKH": bk}, num_stages=s, num_warps=w)
                     for bm, bn, bk, s, w in [(128, 128, 64, 3, 8), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]]
_GEMM_INTERPRETER = triton.Config({"BM": 16, "BN": 16, "BKH": 32}, num_warps=4)


@triton.jit
def _dot16(a, b, acc, EXACT: tl.constexpr):
    """acc + a @ b: on tensor cores for 16-bit a, b; EXACT in IEEE float32 (float32 operands, which tensor cores
    would round to TF32, and the interpreter, whose 16-bit dot is wrong)."""
    if EXACT:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.autotune(configs=autotune_configs(_QUANT_GPU_CONFIGS, _QUANT_INTERPRETER),
                 key=["M", "K", "R", "BLOCK", "BN", "HAS_H"])
@triton.jit
def _pca_rotate_quantize_kernel(x_ptr, b_ptr, h_ptr, zhi_ptr, q_ptr, s_ptr, M, K, R, BLOCK,
                                stride_xm, stride_zm, stride_qm, stride_sm,
                                G: tl.constexpr, BN: tl.constexpr, HAS_H: tl.constexpr, EXACT: tl.constexpr,
                                BM: tl.constexpr, BK: tl.constexpr):
    GROUPS: tl.constexpr = BN // G
    pid_m = tl.program_id(0)
    c0 = tl.program_id(1) * BN
    j = c0 // BLOCK                # the block of inputs these columns lie in
    o = c0 - j * BLOCK             # their first column within the block
    rm = pid_m * BM + tl.arange(0, BM)
    rn = tl.arange(0, BN)
    mmask = rm < M
    rm64 = rm.to(tl.int64)
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BM, BK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, BLOCK], strides=[BLOCK, 1], block_shape=[BK, BN])
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k in range(j * BLOCK, (j + 1) * BLOCK, BK):
        acc = _dot16(x_desc.load([pid_m * BM, k]), b_desc.load([k, o]), acc, EXACT)
    col = o + rn
    if o < R:
        tl.store(zhi_ptr + rm64[:, None] * stride_zm + (j * R + col)[None, :], acc.to(zhi_ptr.dtype.element_ty),
                 mask=mmask[:, None] & (col < R)[None, :])
    if o + BN > R:
        lo_vals = acc
        if HAS_H:
            h = tl.load(h_ptr + tl.arange(0, G)[:, None] * G + tl.arange(0, G)[None, :]).to(tl.float32)
            lo_vals = tl.reshape(tl.dot(tl.reshape(acc, [BM * GROUPS, G]), h, input_precision="ieee"), [BM, BN])
        grouped = tl.reshape(lo_vals, [BM, GROUPS, G])
        absmax = tl.max(tl.abs(grouped), axis=2)
        scale = tl.math.div_rn(absmax, tl.full(absmax.shape, 7.0, tl.float32))  # IEEE division, as the reference
        usable = scale > 0
        safe = tl.where(usable, scale, 1.0)
        ratio = tl.math.div_rn(grouped, tl.broadcast_to(safe[:, :, None], grouped.shape))
        q = tl.minimum(tl.maximum(round_half_even(ratio), -7.0), 7.0)
        q = tl.reshape(tl.where(usable[:, :, None], q, 0.0), [BM, BN])
        lo = j * (BLOCK - R) + col - R
        tl.store(q_ptr + rm64[:, None] * stride_qm + lo[None, :], q.to(tl.int8),
                 mask=mmask[:, None] & (col >= R)[None, :])
        rg = tl.arange(0, GROUPS)
        tl.store(s_ptr + rm64[:, None] * stride_sm + ((j * (BLOCK - R) + o - R) // G + rg)[None, :], scale,
                 mask=mmask[:, None] & (o + rg * G >= R)[None, :])


def _column_tile(block: int, group_size: int) -> int:
    """Output columns per program: the widest of 256, 128 and one group that splits the block into whole groups."""
    return next(bn for bn in (256, 128, group_size) if bn % group_size == 0 and block % bn == 0)


def pca_rotate_quantize(x: torch.Tensor, basis: torch.Tensor, h: torch.Tensor | None, rank: int,
                        group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """numerics.pca.pca_rotate_quantize on the GPU (or the interpreter): x [M, K] in 16 bits, basis [n, b, b]
    (n b = K) in x's dtype, ``rank`` 16-bit columns per block, h [G, G] float32 or None."""
    check_device(x, basis)
    check_2d_rows("x", x)
    m, k = x.shape
    if basis.dim() != 3 or basis.shape[0] * basis.shape[1] != k or basis.shape[1] != basis.shape[2] or \
            basis.dtype != x.dtype:
        raise ValueError(f"basis must be blocks [n, b, b] with n b = {k} in {x.dtype}, got {tuple(basis.shape)} "
                         f"{basis.dtype}")
    nb, b = basis.shape[:2]
    if b % group_size or rank % group_size or not 0 <= rank < b:
        raise ValueError(f"the block width {b} and rank {rank} must be multiples of the group size {group_size}, "
                         "rank < block")
    if h is not None and h.shape != (group_size, group_size):
        raise ValueError(f"h must be [{group_size}, {group_size}], got {tuple(h.shape)}")
    basis = basis.contiguous()
    if (x.stride(0) * x.element_size()) % 16 or x.data_ptr() % 16:  # TMA: 16-byte aligned rows
        x = x.clone(memory_format=torch.contiguous_format)
    z_hi = torch.empty(m, nb * rank, dtype=x.dtype, device=x.device)
    q = torch.empty(m, nb * (b - rank), dtype=torch.int8, device=x.device)
    s = torch.empty(m, nb * (b - rank) // group_size, dtype=torch.float32, device=x.device)
    if m == 0:
        return z_hi, q, s
    hf = h.float().contiguous() if h is not None else s
    bn = _column_tile(b, group_size)
    # scratch for the device-side TMA descriptors, on the operands' device
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=x.device))
    grid = lambda meta: (triton.cdiv(m, meta["BM"]), k // bn)  # noqa: E731
    _pca_rotate_quantize_kernel[grid](x, basis, hf, z_hi, q, s, m, k, rank, b, x.stride(0),
                                      max(z_hi.stride(0), 1), q.stride(0), s.stride(0), G=group_size, BN=bn,
                                      HAS_H=h is not None, EXACT=interpreting() or x.dtype == torch.float32)
    return z_hi, q, s


@triton.autotune(configs=autotune_configs(_GEMM_GPU_CONFIGS, _GEMM_INTERPRETER), key=["M", "N", "R", "L"])
@triton.jit
def _pca_gemm_kernel(zhi_ptr, q_ptr, sa_ptr, whi_ptr, qw_ptr, sw_ptr, bias_ptr, c_ptr, M, N, R, L,
                     stride_zm, stride_qm, stride_sam, stride_whn, stride_qwn, stride_swn, stride_cm,
                     G: tl.constexpr, PACK: tl.constexpr, HAS_BIAS: tl.constexpr, EXACT: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BKH: tl.constexpr):
    HALF: tl.constexpr = PACK // 2
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mmask = rm < M
    nmask = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    rk = tl.arange(0, BKH)
    for k in range(0, R, BKH):
        kk = k + rk
        a = tl.load(zhi_ptr + rm64[:, None] * stride_zm + kk[None, :], mask=mmask[:, None] & (kk[None, :] < R),
                    other=0.0)
        b = tl.load(whi_ptr + rn64[None, :] * stride_whn + kk[:, None], mask=nmask[None, :] & (kk[:, None] < R),
                    other=0.0)
        acc = _dot16(a, b, acc, EXACT)
    rh = tl.arange(0, HALF)
    for c in range(0, L // PACK):  # a chunk of PACK values: one group (PACK = G) or two (PACK = 2 G)
        qa_lo = tl.load(q_ptr + rm64[:, None] * stride_qm + (c * PACK + rh)[None, :], mask=mmask[:, None], other=0)
        qa_hi = tl.load(q_ptr + rm64[:, None] * stride_qm + (c * PACK + HALF + rh)[None, :], mask=mmask[:, None],
                        other=0)
        packed = tl.load(qw_ptr + rn64[None, :] * stride_qwn + (c * HALF + rh)[:, None], mask=nmask[None, :], other=0)
        w_lo = (packed << 4).to(tl.int8) >> 4
        w_hi = packed >> 4
        if PACK == G:
            exact = tl.dot(qa_lo, w_lo, out_dtype=tl.int32) + tl.dot(qa_hi, w_hi, out_dtype=tl.int32)
            acc = _scaled(acc, exact, sa_ptr, sw_ptr, rm64, rn64, mmask, nmask, stride_sam, stride_swn, c)
        else:
            acc = _scaled(acc, tl.dot(qa_lo, w_lo, out_dtype=tl.int32), sa_ptr, sw_ptr, rm64, rn64, mmask, nmask,
                          stride_sam, stride_swn, 2 * c)
            acc = _scaled(acc, tl.dot(qa_hi, w_hi, out_dtype=tl.int32), sa_ptr, sw_ptr, rm64, rn64, mmask, nmask,
                          stride_sam, stride_swn, 2 * c + 1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm64[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _scaled(acc, exact, sa_ptr, sw_ptr, rm64, rn64, mmask, nmask, stride_sam, stride_swn, g):
    """acc + group g's exact int32 product scaled by its token and channel scales."""
    sa = tl.load(sa_ptr + rm64 * stride_sam + g, mask=mmask, other=0.0)
    sw = tl.load(sw_ptr + rn64 * stride_swn + g, mask=nmask, other=0.0)
    return acc + exact.to(tl.float32) * sa[:, None] * sw[None, :]


def check_gemm_operands(z_hi: torch.Tensor, q: torch.Tensor, sa: torch.Tensor, w_hi: torch.Tensor, qw: torch.Tensor,
                        sw: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> None:
    """pca_gemm's operands agree with one another and lie as the kernels read them (rows with a contiguous last
    dimension, float32 scales, a contiguous bias [N]), whichever kernel runs them."""
    for name, t in (("z_hi", z_hi), ("q", q), ("sa", sa), ("w_hi", w_hi), ("qw", qw), ("sw", sw)):
        check_2d_rows(name, t)
    m, lo = q.shape
    n, rank = w_hi.shape
    if z_hi.shape != (m, rank) or qw.shape != (n, lo // 2) or sa.shape != (m, lo // group_size) or \
            sw.shape != (n, lo // group_size) or lo % group_size:
        raise ValueError(f"pca_gemm shapes disagree: z_hi {tuple(z_hi.shape)}, q {tuple(q.shape)}, "
                         f"sa {tuple(sa.shape)}, w_hi {tuple(w_hi.shape)}, qw {tuple(qw.shape)}, sw {tuple(sw.shape)}, "
                         f"group {group_size}")
    if sa.dtype != torch.float32 or sw.dtype != torch.float32:
        raise ValueError(f"pca_gemm's scales must be float32, got {sa.dtype} and {sw.dtype}")
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
        check_dense_vector("bias", bias)


def pca_gemm(z_hi: torch.Tensor, q: torch.Tensor, sa: torch.Tensor, w_hi: torch.Tensor, qw: torch.Tensor,
             sw: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """numerics.pca.pca_matmul on the GPU (or the interpreter): [M, N] in z_hi's dtype; ``qw`` packed as
    numerics.pca.int4_pack says."""
    check_device(z_hi, q, sa, w_hi, qw, sw, bias)
    check_gemm_operands(z_hi, q, sa, w_hi, qw, sw, bias, group_size)
    m, lo = q.shape
    n, rank = w_hi.shape
    c = torch.empty(m, n, dtype=z_hi.dtype, device=q.device)
    if m == 0 or n == 0:
        return c
    grid = lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"]))  # noqa: E731
    _pca_gemm_kernel[grid](z_hi, q, sa, w_hi, qw, sw, bias if bias is not None else sw, c, m, n, rank, lo,
                           max(z_hi.stride(0), 1), q.stride(0), sa.stride(0), w_hi.stride(0), qw.stride(0),
                           sw.stride(0), c.stride(0), G=group_size, PACK=int4_pack(lo, group_size),
                           HAS_BIAS=bias is not None,
                           EXACT=interpreting() or z_hi.dtype == torch.float32)
    return c
