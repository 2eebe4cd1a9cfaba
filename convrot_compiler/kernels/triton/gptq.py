"""GPTQ's column loop for one block of columns (numerics/gptq.py's ``quantize_columns``), in float32.

GPTQ quantizes a block's columns one after another, each column's rounding error spread over the columns after
it; done with torch that is about ten kernel launches per input channel, which for the 3072 to 15360 inputs of
a FLUX linear is most of GPTQ's time. The rows are independent, so a program takes BLOCK_N rows of the block,
keeps them in registers and walks the block's columns itself: one launch per block. Every operation is the
reference's, rounded as torch rounds it (division correctly rounded, no fused multiply-add), so the values
and the errors equal ``quantize_columns`` in float32 bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import check_device, interpreting, round_half_even


@triton.jit
def _gptq_columns_kernel(w_ptr, u_ptr, s_ptr, q_ptr, e_ptr, g_ptr, N, M,
                         B: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, B)
    rmask = rows < N
    offs = rows.to(tl.int64)[:, None] * B + cols[None, :]
    wb = tl.load(w_ptr + offs, mask=rmask[:, None], other=0.0)
    if G == 0:
        s = tl.load(s_ptr + rows, mask=rmask, other=0.0)
    else:
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in range(B):
        if G != 0:
            if j % G == 0:
                in_group = (cols >= j) & (cols < j + G)
                s = tl.math.div_rn(tl.max(tl.where(in_group[None, :], tl.abs(wb), 0.0), 1), M * 1.0)
                tl.store(g_ptr + rows.to(tl.int64) * (B // G) + j // G, s, mask=rmask)
        wj = tl.sum(tl.where((cols == j)[None, :], wb, 0.0), 1)
        usable = s > 0.0
        safe = tl.where(usable, s, 1.0)
        q = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(wj, safe)), -M * 1.0), M * 1.0)
        q = tl.where(usable, q, 0.0)
        e = tl.math.div_rn(wj - q * s, tl.load(u_ptr + j * B + j))
        urow = tl.load(u_ptr + j * B + cols, mask=cols >= j, other=0.0)
        wb = wb - e[:, None] * urow[None, :]
        tl.store(q_ptr + rows.to(tl.int64) * B + j, q.to(tl.int8), mask=rmask)
        tl.store(e_ptr + rows.to(tl.int64) * B + j, e, mask=rmask)


def gptq_columns(wb: torch.Tensor, ub: torch.Tensor, m: int, scale: torch.Tensor | None,
                 group_size: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``numerics.gptq.quantize_columns`` for float32 ``wb`` [N, B] and ``ub`` [B, B] (B a power of two), on CUDA
    or under the interpreter. ``wb`` is not updated (nothing reads it after the block)."""
    check_device(wb, ub)
    n, b = wb.shape
    if wb.dtype != torch.float32 or ub.dtype != torch.float32:
        raise ValueError(f"the GPTQ kernel works in float32, got {wb.dtype} weights and a {ub.dtype} factor: "
                         "call gptq_quantize with dtype=torch.float32")
    if b & (b - 1) or ub.shape != (b, b):
        raise ValueError(f"a block of {b} columns with a factor of shape {tuple(ub.shape)}: the kernel takes a "
                         "power-of-two block and its [B, B] factor")
    if (scale is None) == (group_size is None) or (group_size is not None and b % group_size):
        raise ValueError("pass per-channel scales, or a group size dividing the block, not both")
    wb, ub = wb.contiguous(), ub.contiguous()
    q = torch.empty(n, b, dtype=torch.int8, device=wb.device)
    err = torch.empty_like(wb)
    groups = None if group_size is None else torch.empty(n, b // group_size, dtype=torch.float32, device=wb.device)
    block_n = 16 if interpreting() else 32
    _gptq_columns_kernel[(triton.cdiv(n, block_n),)](
        wb, ub, scale.float().contiguous() if scale is not None else wb, q, err,
        groups if groups is not None else err, n, m, B=b, G=group_size or 0, BLOCK_N=block_n, num_warps=4,
        enable_fp_fusion=False)
    return q, err, groups
