"""Fused rotate + quantize for Hopper in Gluon: each row read from DRAM once, kept in shared memory.

The per-token scale needs the absmax of the whole rotated row before any value can be written, so
the Triton kernel (rotate_quant.py) walks each row twice and reads it twice: Triton cannot keep a
row of up to 30 KB on chip. At K >= 12288 the second read misses L2,
and the kernel moves ~4.8 bytes per element where 3 are needed. Gluon exposes shared memory and
TMA, so here:

* one program owns one row: it issues TMA loads for all of the row's 256-channel groups at once
  (one mbarrier per step of NB groups), so the whole row is in flight from the start;
* pass 1 rotates each group as it lands and keeps the running absmax; pass 2 writes the quantized
  values, in the "mma" channel order (quant.mma_channel_order) one 8-byte store per lane and step
  where the natural order takes eight byte stores (K = 12288: 75% -> 81% of copy bandwidth,
  H100). A row of up to 16 groups (K <= 4096: FLUX's 3072) keeps
  its rotated values in registers between the passes (KEEP, 8 floats a thread per step) and, unless it is a concatenation, is loaded
  by one TMA box (a power of two of groups, zeros past the row) with one mbarrier, where each step's
  box costs Triton 3.6's barriers around its issue; a longer row is rotated again in pass 2, from
  shared memory (not DRAM). At K = 3072 the kernel is bound by instruction issue (ncu: 62% of issue
  slots busy, 724 instructions per warp and row), and these took it from 55% to 66% of copy
  bandwidth;
* a group X [16, 16] (channel 16 i + j) rotates to Y = h^T X h (h the 16 x 16 Kronecker factor of
  the 256-point Hadamard) with two mma.sync products per group, batched over the step's NB groups
  (a 3-D dot, one group per warp): C1 = h^T X^T takes X^T straight from shared memory as the B
  operand, and C1's accumulator registers are already the A-operand layout of the second product
  W = C1 h = Y^T, so nothing moves between threads. The second product takes C1 as a sum of two
  bf16 parts, as the Triton kernel's Kronecker form does, so its numerics are the same.

A DiT block's adaLN normalization can be computed as the row lands (``rotate_quantize_adaln_sm90``, option
``fuse_norms``): the row, a token of one of two tensors, comes in one box; its LayerNorm statistics are taken from
the registers that feed the first product, then each value is modulated by its sample's scale and shift and
rounded to bf16 before the rotation, so the normalized rows are never written.

The quantizer's arithmetic (correctly rounded quotient by the scale through a row reciprocal, ties
to even) is the Triton kernel's, written again because a Gluon function cannot call a Triton one;
the GPU tests hold both to the reference. Runs on sm_90 only (Gluon has no CPU interpreter).

The kernel is bound by instruction issue as much as by memory (1.5x fewer
instructions per element took K = 12288 from 65% to 76% of copy bandwidth), so the per-element work is
kept small: no clamp (the absmax scale bounds every quotient), the rounding and the conversion to an
integer done by one float add, |y| folded into the NaN-propagating max, one row reduction, and a row
without a usable scale branching once to zeros instead of a select per element. A persistent version
(several rows per program, row buffers double-buffered, values leaving through shared memory by TMA)
was slower at every shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ...numerics.quant import check_act_order
from .gluon_common import smem_reinterpret, thread_barrier, tma_load

GROUP_SIZE = 256
WARPS = 4
STEP_GROUPS = WARPS  # groups per step: one per warp
GROUP = gl.constexpr(GROUP_SIZE)
GROUPS_PER_STEP = gl.constexpr(STEP_GROUPS)
SMEM_LIMIT = 227 * 1024
KEEP_MAX_STEPS = 4  # rows of at most this many steps keep their rotated values in registers (KEEP: y0 .. y3)


@gluon.jit
def _load_step(xs, step, layout: gl.constexpr):
    """The step's NB groups as the first product's B operand X^T [NB, 16 (j), 16 (i)]."""
    return xs.index(step).permute((0, 2, 1)).load(layout)


@gluon.jit
def _rotate(xt, h_a, h_b, layout: gl.constexpr):
    """W = (h^T X h)^T for each group of the step, in float32: W[b, j, i] is channel 16 i + j."""
    zero = gl.zeros([GROUPS_PER_STEP, 16, 16], gl.float32, layout)
    c1 = mma_v2(h_a, xt, zero)
    a_layout: gl.constexpr = h_a.type.layout
    hi = c1.to(gl.bfloat16)
    lo = (c1 - hi.to(gl.float32)).to(gl.bfloat16)
    w = mma_v2(gl.convert_layout(hi, a_layout), h_b, zero)
    return mma_v2(gl.convert_layout(lo, a_layout), h_b, w)


@gluon.jit
def _index3(NB: gl.constexpr, R: gl.constexpr, C: gl.constexpr, layout: gl.constexpr):
    """(b, r, c) index tensors [NB, 1, 1], [1, R, 1], [1, 1, C] in ``layout``."""
    b = gl.arange(0, NB, layout=gl.SliceLayout(1, gl.SliceLayout(2, layout)))
    r = gl.arange(0, R, layout=gl.SliceLayout(0, gl.SliceLayout(2, layout)))
    c = gl.arange(0, C, layout=gl.SliceLayout(0, gl.SliceLayout(1, layout)))
    return (gl.expand_dims(gl.expand_dims(b, 1), 2), gl.expand_dims(gl.expand_dims(r, 0), 2),
            gl.expand_dims(gl.expand_dims(c, 0), 1))


@gluon.jit
def _mma_order(v, lanes: gl.constexpr):
    """[NB, 16, 16] in the mma accumulator layout (W[b, r, c]) -> [NB, 32, 8] in ``lanes`` (dim 1 the lane, dim 2
    its eight registers) with no data movement (the conversion is asserted trivial): r = 8 r8 + g and
    c = 8 c8 + 2 t + c0 go to lane 4 g + t, register c0 + 2 r8 + 4 c8, the group's position 8 lane + register
    in quant.mma_channel_order."""
    NB: gl.constexpr = v.shape[0]
    v = gl.reshape(gl.permute(gl.reshape(v, [NB, 2, 8, 2, 4, 2]), (0, 2, 4, 3, 1, 5)), [NB, 32, 8])
    return gl.convert_layout(v, lanes, assert_trivial=True)


@gluon.jit
def _row_divisor(scale, usable):
    """rotate_quant._row_divisor: (p, -s, inv), p a power of two, s = scale * p, inv = 1 / s rounded."""
    safe = gl.where(usable, scale, 1.0)
    e = (safe.to(gl.int32, bitcast=True) >> 23) & 0xFF
    p = (gl.maximum(254 - e, 1) << 23).to(gl.float32, bitcast=True)
    s = safe * p
    return p, -s, gl.div_rn(1.0, s)


ROUNDER = gl.constexpr(12582912.0)  # 1.5 * 2^23


@gluon.jit
def _quantize(y, p, neg_s, inv):
    """rotate_quant._quantize_tile's GPU form for a row with a usable scale: the correctly rounded y / scale
    (Markstein), rounded to nearest even and returned plus ROUNDER. No clamp: the scale is absmax / qmax rounded,
    so |y / scale| <= qmax (1 + 2^-23), which rounds to at most qmax. Adding 1.5 * 2^23 rounds to an integer
    (ties to even) in one full-rate FADD and leaves it in the low bits of the sum, where a byte store takes it
    (rint and the conversion compiled to one F2I, a conversion-pipe instruction, after a two-instruction clamp)."""
    yp = y * p
    q0 = yp * inv
    return gl.fma(gl.fma(q0, neg_s, yp), inv, q0) + ROUNDER


@gluon.jit
def _max_abs_nan(acc, y):
    """max(acc, |y|) per element, NaN-propagating: one FMNMX.NAN with an |operand| (gl.abs added a LOP3)."""
    return gl.inline_asm_elementwise("{ .reg .f32 t; abs.f32 t, $2; max.NaN.f32 $0, $1, t; }", "=f,f,f", [acc, y],
                                     dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _max_nan(a, b):
    return gl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@gluon.jit
def _load_x_box(x_desc, xs_tma, x8s, bar, i, g, X_E4M3: gl.constexpr):
    """Box i (from group g) of x: into the row, or X_E4M3: into x8s, in e4m3, to be widened (_widen_box)."""
    BOX: gl.constexpr = xs_tma.shape[2]
    row = gl.program_id(0)
    if X_E4M3:
        mbarrier.expect(bar, BOX * GROUP)
        tma_load(x_desc, [row, g, 0], bar, x8s.index(i))
    else:
        mbarrier.expect(bar, BOX * GROUP * 2)
        tma_load(x_desc, [row, g, 0], bar, xs_tma.index(i))


@gluon.jit
def _load_row(x_desc, x2_desc, xs_tma, x8s, bars, LOADS: gl.constexpr, BOX: gl.constexpr, GROUPS1: gl.constexpr,
              ALL_X: gl.constexpr, X_E4M3: gl.constexpr):
    """TMA loads of the whole row, LOADS boxes [1, BOX, 256], each with its mbarrier (one elected thread issues
    them; a box never straddles GROUPS1). ALL_X: every box is x's (x2_desc is not read: it may be x's e4m3)."""
    row = gl.program_id(0)
    for i in range(LOADS):
        bar = bars.index(i)
        g = i * BOX
        if ALL_X:
            _load_x_box(x_desc, xs_tma, x8s, bar, i, g, X_E4M3)
        elif g < GROUPS1:
            _load_x_box(x_desc, xs_tma, x8s, bar, i, g, X_E4M3)
        else:
            mbarrier.expect(bar, BOX * GROUP * 2)
            tma_load(x2_desc, [row, g - GROUPS1, 0], bar, xs_tma.index(i))


@gluon.jit
def _widen_box(x8s, xs_tma, i, descale, num_warps: gl.constexpr):
    """Box i of e4m3 values, times the descale, into the bf16 row in shared memory (dequantize_e4m3's numerics:
    e4m3 to float32 is exact, one product and one rounding), behind a CTA barrier."""
    layout: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 1, 32], [1, num_warps, 1], [2, 1, 0])
    v = x8s.index(i).load(layout)
    xs_tma.index(i).store((v.to(gl.float32) * descale).to(gl.bfloat16))
    thread_barrier()


@gluon.jit
def _box_landed(bars, box, step, wide, num_warps: gl.constexpr):
    """Wait for a box; widen it where it holds e4m3 x (``wide``: (x8s, xs_tma, descale, GROUPS1), or None)."""
    mbarrier.wait(bars.index(box), 0)
    if wide is not None:
        x8s, xs_tma, descale, GROUPS1 = wide
        if step * GROUPS_PER_STEP < GROUPS1:
            _widen_box(x8s, xs_tma, box, descale, num_warps)


@gluon.jit
def _sum_all(v):
    return gl.sum(gl.sum(gl.sum(v, 2), 1), 0)


@gluon.jit
def _modulate(d, step, scale_row, shift_row, rstd, layout: gl.constexpr):
    """One step's centred groups d = x - mean (float32, the first product's B operand: channel 16 i + j at
    [b, j, i]) to d * rstd * (1 + scale) + shift, rounded once to bf16."""
    b, j, i = _index3(GROUPS_PER_STEP, 16, 16, layout)
    c = (step * GROUPS_PER_STEP + b) * GROUP + i * 16 + j
    one_plus = 1.0 + gl.load(scale_row + c).to(gl.float32)
    return (d * rstd * one_plus + gl.load(shift_row + c).to(gl.float32)).to(gl.bfloat16)


@gluon.jit
def _adaln_steps(xs, norm, STEPS: gl.constexpr, layout: gl.constexpr):
    """The landed row's STEPS steps (at most 4) as the first product's B operands, normalized by numerics.adaln:
    the LayerNorm statistics in float32 from the same registers (the mean first, then the squared deviations from
    it: no E[x^2] - E[x]^2 cancellation), then ``_modulate``. ``norm``: (scale row, shift row, eps). Returns four
    steps; those past STEPS repeat the first."""
    scale_row, shift_row, eps = norm
    n: gl.constexpr = STEPS * GROUPS_PER_STEP * GROUP
    x0 = _load_step(xs, 0, layout).to(gl.float32)
    x1 = x0
    x2 = x0
    x3 = x0
    acc = x0
    if STEPS > 1:
        x1 = _load_step(xs, 1, layout).to(gl.float32)
        acc += x1
    if STEPS > 2:
        x2 = _load_step(xs, 2, layout).to(gl.float32)
        acc += x2
    if STEPS > 3:
        x3 = _load_step(xs, 3, layout).to(gl.float32)
        acc += x3
    mean = _sum_all(acc) / n
    x0 -= mean
    acc = x0 * x0
    if STEPS > 1:
        x1 -= mean
        acc += x1 * x1
    if STEPS > 2:
        x2 -= mean
        acc += x2 * x2
    if STEPS > 3:
        x3 -= mean
        acc += x3 * x3
    rstd = gl.rsqrt(_sum_all(acc) / n + eps)
    y0 = _modulate(x0, 0, scale_row, shift_row, rstd, layout)
    y1 = y0
    y2 = y0
    y3 = y0
    if STEPS > 1:
        y1 = _modulate(x1, 1, scale_row, shift_row, rstd, layout)
    if STEPS > 2:
        y2 = _modulate(x2, 2, scale_row, shift_row, rstd, layout)
    if STEPS > 3:
        y3 = _modulate(x3, 3, scale_row, shift_row, rstd, layout)
    return y0, y1, y2, y3


@gluon.jit
def _landed_step(xs, bars, step, h_a, h_b, amax_t, wide, xt, BOX: gl.constexpr, layout: gl.constexpr,
                 b_layout: gl.constexpr, num_warps: gl.constexpr):
    """Pass 1 on one step: wait for its groups' box (and widen it, where it is e4m3), rotate them, fold |y| into
    the running max. ``wide``: (x8s, xs_tma, descale, GROUPS1) of an e4m3 x, or None; ``xt``: the step's groups
    already in registers (normalized by ``_adaln_steps``), or None to load them. Returns (y, max)."""
    if BOX == GROUPS_PER_STEP:
        _box_landed(bars, step, step, wide, num_warps)
    elif (step * GROUPS_PER_STEP) % BOX == 0:  # the box's first step; a wait per step costs a CTA barrier
        _box_landed(bars, (step * GROUPS_PER_STEP) // BOX, step, wide, num_warps)
    if xt is None:
        xt = _load_step(xs, step, b_layout)
    y = _rotate(xt, h_a, h_b, layout)
    # NaN rides through the max; one finiteness check after the loop
    return y, _max_abs_nan(amax_t, y)


@gluon.jit
def _store_step(y, xs, step, h_a, h_b, usable, p, neg_s, inv, q_ptrs, starts, kp, ROTATE: gl.constexpr,
                MASKED: gl.constexpr, MMA_ORDER: gl.constexpr, layout: gl.constexpr, b_layout: gl.constexpr,
                out_layout: gl.constexpr):
    """Pass 2 on one step: quantize the rotated groups (y, or ROTATE: the step's groups rotated again from
    shared memory) and store them; zeros for a row without a usable scale."""
    NB: gl.constexpr = GROUPS_PER_STEP
    if usable:  # uniform over the row
        if ROTATE:
            y = _rotate(_load_step(xs, step, b_layout), h_a, h_b, layout)
        q = _quantize(y, p, neg_s, inv)
    else:
        q = gl.full([NB, 16, 16], ROUNDER, gl.float32, layout)
    v = q.to(gl.int32, bitcast=True).to(gl.int8)
    if MMA_ORDER:  # a lane's 8 values to 8 adjacent bytes: one store
        v = _mma_order(v, out_layout)
    if MASKED:
        gl.store(q_ptrs + step * (NB * GROUP), v, mask=(step * (NB * GROUP) + starts) < kp)
    else:
        gl.store(q_ptrs + step * (NB * GROUP), v)


@gluon.jit
def _quantize_row(xs, bars, wide, norm, h_ptr, q_ptr, s_ptr, stride_qm, kp, STEPS: gl.constexpr, BOX: gl.constexpr,
                  QMAX: gl.constexpr, MASKED: gl.constexpr, KEEP: gl.constexpr, MMA_ORDER: gl.constexpr,
                  num_warps: gl.constexpr):
    """Pass 1 (absmax of the rotated row) as the groups land, the row's scale, pass 2 (quantize, store).
    KEEP (STEPS <= 4): the rotated groups stay in registers between the passes (8 floats a thread per
    step), so pass 2 does not rotate them again; longer rows rotate each step twice. ``norm``: (scale row,
    shift row, eps) of a row loaded as one box, normalized (adaLN) once it has landed, or None."""
    NB: gl.constexpr = GROUPS_PER_STEP
    row = gl.program_id(0)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1, 1],
                                                  instr_shape=[1, 16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    # loaded straight into the operand layouts: no shuffles
    ba, ra, ca = _index3(NB, 16, 16, a_layout)
    h_a = gl.load(h_ptr + ca * 16 + ra + ba * 0).to(gl.bfloat16)  # h^T
    bb, rb, cb = _index3(NB, 16, 16, b_layout)
    h_b = gl.load(h_ptr + rb * 16 + cb + bb * 0).to(gl.bfloat16)  # h

    amax_t = gl.zeros([NB, 16, 16], gl.float32, mma)
    if norm is not None:
        gl.static_assert(KEEP and BOX >= STEPS * NB, "adaLN rows are one box, kept in registers")
        mbarrier.wait(bars.index(0), 0)
        n0, n1, n2, n3 = _adaln_steps(xs, norm, STEPS, b_layout)
    else:
        n0 = None
        n1 = None
        n2 = None
        n3 = None
    if KEEP:
        gl.static_assert(STEPS <= 4, "KEEP holds at most 4 steps")
        y0, amax_t = _landed_step(xs, bars, 0, h_a, h_b, amax_t, wide, n0, BOX, mma, b_layout, num_warps)
        if STEPS > 1:
            y1, amax_t = _landed_step(xs, bars, 1, h_a, h_b, amax_t, wide, n1, BOX, mma, b_layout, num_warps)
        if STEPS > 2:
            y2, amax_t = _landed_step(xs, bars, 2, h_a, h_b, amax_t, wide, n2, BOX, mma, b_layout, num_warps)
        if STEPS > 3:
            y3, amax_t = _landed_step(xs, bars, 3, h_a, h_b, amax_t, wide, n3, BOX, mma, b_layout, num_warps)
    else:
        for step in range(STEPS):
            _, amax_t = _landed_step(xs, bars, step, h_a, h_b, amax_t, wide, None, BOX, mma, b_layout, num_warps)

    # each warp's max, then across warps through shared memory behind one barrier (the generic reduction
    # over the warps' axis took two)
    per_warp = gl.reduce(gl.reduce(amax_t, 2, _max_nan), 1, _max_nan)
    maxes = gl.allocate_shared_memory(gl.float32, [NB], gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1,
                                                                                   order=[0]))
    maxes.store(per_warp)
    thread_barrier()
    every: gl.constexpr = gl.BlockedLayout([NB], [32], [num_warps], [0])
    amax = gl.reduce(maxes.load(every), 0, _max_nan)
    finite = amax < float("inf")
    scale = gl.where(finite, gl.div_rn(amax, QMAX * 1.0), float("nan"))
    usable = finite & (scale > 0.0)
    gl.store(s_ptr + row, scale)
    p, neg_s, inv = _row_divisor(scale, usable)

    if MMA_ORDER:
        out_layout: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 32, 1], [num_warps, 1, 1], [2, 1, 0])
        bi, li, ei = _index3(NB, 32, 8, out_layout)
        offs = li * 8 + ei
    else:
        out_layout: gl.constexpr = mma
        bi, ri, ci = _index3(NB, 16, 16, mma)
        offs = ci * 16 + ri
    starts = bi * GROUP
    q_ptrs = q_ptr + row.to(gl.int64) * stride_qm + (starts + offs)
    if KEEP:
        _store_step(y0, xs, 0, h_a, h_b, usable, p, neg_s, inv, q_ptrs, starts, kp, False, MASKED, MMA_ORDER, mma,
                    b_layout, out_layout)
        if STEPS > 1:
            _store_step(y1, xs, 1, h_a, h_b, usable, p, neg_s, inv, q_ptrs, starts, kp, False, MASKED, MMA_ORDER,
                        mma, b_layout, out_layout)
        if STEPS > 2:
            _store_step(y2, xs, 2, h_a, h_b, usable, p, neg_s, inv, q_ptrs, starts, kp, False, MASKED, MMA_ORDER,
                        mma, b_layout, out_layout)
        if STEPS > 3:
            _store_step(y3, xs, 3, h_a, h_b, usable, p, neg_s, inv, q_ptrs, starts, kp, False, MASKED, MMA_ORDER,
                        mma, b_layout, out_layout)
    else:
        for step in range(STEPS):  # y is rotated again inside (ROTATE): amax_t only fills the argument
            _store_step(amax_t, xs, step, h_a, h_b, usable, p, neg_s, inv, q_ptrs, starts, kp, True, MASKED, MMA_ORDER,
                        mma, b_layout, out_layout)


@gluon.jit
def _load_token_row(x_desc, x2_desc, xs_tma, bars, tokens, tokens1, TWO: gl.constexpr):
    """The row as one box, for the adaLN normalization: row r is token t = r % tokens of sample r // tokens, from
    x_desc for t < tokens1, else (TWO) from x2_desc."""
    BOX: gl.constexpr = xs_tma.shape[2]
    row = gl.program_id(0)
    bar = bars.index(0)
    mbarrier.expect(bar, BOX * GROUP * 2)
    if TWO:
        sample = row // tokens
        t = row - sample * tokens
        if t < tokens1:
            tma_load(x_desc, [sample * tokens1 + t, 0, 0], bar, xs_tma.index(0))
        else:
            tma_load(x2_desc, [sample * (tokens - tokens1) + t - tokens1, 0, 0], bar, xs_tma.index(0))
    else:
        tma_load(x_desc, [row, 0, 0], bar, xs_tma.index(0))


@gluon.jit
def _rotate_quant_sm90_kernel(x_desc, x2_desc, h_ptr, q_ptr, s_ptr, descale_ptr, stride_qm, kp,
                              scale_ptr, shift_ptr, stride_scale, stride_shift, tokens, tokens1, eps,
                              STEPS: gl.constexpr, BOX: gl.constexpr, GROUPS1: gl.constexpr, QMAX: gl.constexpr,
                              MASKED: gl.constexpr, KEEP: gl.constexpr, MMA_ORDER: gl.constexpr,
                              X_E4M3: gl.constexpr, ADALN: gl.constexpr, ADALN_TWO: gl.constexpr,
                              num_warps: gl.constexpr):
    """One row per program. Groups [0, GROUPS1) come from x_desc, the rest from x2_desc; STEPS steps of NB
    groups cover the padded row (TMA reads zeros past either tensor's end;
    MASKED: the last step reaches past the row's padded width kp, whose groups are not stored).
    X_E4M3: x_desc's rows are e4m3, widened to bf16 by *descale_ptr in shared memory as their boxes land.
    ADALN: the rows are tokens (``_load_token_row``; ADALN_TWO: of x_desc, then x2_desc, per sample) normalized
    by numerics.adaln with their sample's scale and shift rows before the rotation."""
    NB: gl.constexpr = GROUPS_PER_STEP
    LOADS: gl.constexpr = (STEPS * NB + BOX - 1) // BOX
    row_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=3)
    xs_tma = gl.allocate_shared_memory(gl.bfloat16, [LOADS, 1, BOX, GROUP], row_layout)
    if X_E4M3:
        x8s = gl.allocate_shared_memory(gl.float8e4nv, [(GROUPS1 + BOX - 1) // BOX, 1, BOX, GROUP], x_desc.layout)
        wide = (x8s, xs_tma, gl.load(descale_ptr), GROUPS1)
    else:
        x8s = xs_tma
        wide = None
    bars = gl.allocate_shared_memory(gl.int64, [LOADS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(LOADS):
        mbarrier.init(bars.index(i), count=1)
    plain: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[2, 1, 0])
    xs = smem_reinterpret(xs_tma, gl.bfloat16, [LOADS * BOX // NB, NB, 16, 16], plain)  # step slots
    fence_async_shared()
    thread_barrier()  # the barriers are initialized before any warp waits on one
    if ADALN:
        _load_token_row(x_desc, x2_desc, xs_tma, bars, tokens, tokens1, ADALN_TWO)
        sample = gl.program_id(0) // tokens
        norm = (scale_ptr + sample * stride_scale, shift_ptr + sample * stride_shift, eps)
    else:
        _load_row(x_desc, x2_desc, xs_tma, x8s, bars, LOADS, BOX, GROUPS1, GROUPS1 >= STEPS * NB, X_E4M3)
        norm = None
    _quantize_row(xs, bars, wide, norm, h_ptr, q_ptr, s_ptr, stride_qm, kp, STEPS, BOX, QMAX, MASKED, KEEP, MMA_ORDER,
                  num_warps)
    # Triton's liveness analysis does not follow the reinterpreted view: without these, the reductions'
    # scratch is placed over the row and the barriers while pass 2 and slower warps still use them
    xs_tma._keep_alive()
    x8s._keep_alive()
    bars._keep_alive()


def supported(x: torch.Tensor | None, x2: torch.Tensor | None, h: torch.Tensor | None, group_size: int,
              e4m3_to: torch.dtype | None = None) -> str | None:
    """None when rotate_quantize_sm90 can take these activations (rotate_quant.rotate_quantize's
    x, x2, h and group_size; ``e4m3_to``: the dtype an e4m3 x widens to, None for 16-bit x), else why not."""
    srcs = [t for t in (x, x2) if t is not None]
    if any(t.device.type != "cuda" for t in srcs):
        return "not a CUDA tensor"
    if torch.cuda.get_device_capability(srcs[0].device) != (9, 0):
        return "the Gluon kernel is for sm_90 only"
    if group_size != GROUP_SIZE or h is None or tuple(h.shape) != (16, 16):
        return "only the 256-channel groups' Kronecker form is implemented"
    if e4m3_to is not None and e4m3_to != torch.bfloat16:
        return f"e4m3 activations widen to bf16 here, not {e4m3_to}"
    if any(t.dtype != torch.bfloat16 for t in srcs if t is not x or e4m3_to is None):
        return "activations are not bf16"
    if any(t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16 for t in srcs):
        return "rows not 16-byte aligned with unit column stride (TMA)"
    if any(t.shape[1] % GROUP_SIZE for t in srcs):
        return f"a width is not a multiple of {GROUP_SIZE} (the TMA boxes are whole groups)"
    k1 = x.shape[1] if x is not None and x2 is not None else 0
    if (k1 // GROUP_SIZE) % STEP_GROUPS:
        return f"the first part of the concatenation is not a multiple of {STEP_GROUPS * GROUP_SIZE} channels"
    k = sum(t.shape[1] for t in srcs)
    steps = triton.cdiv(triton.cdiv(k, GROUP_SIZE), STEP_GROUPS)
    e4m3_bytes = x.shape[1] if e4m3_to is not None else 0
    if steps * STEP_GROUPS * GROUP_SIZE * 2 + e4m3_bytes + 8 * steps > SMEM_LIMIT:
        return f"a row of {k} channels does not fit in shared memory"
    return None


def _group_descriptor(t: torch.Tensor, box: int) -> TensorDescriptor:
    """TMA descriptor of rows [M, K] (bf16, or e4m3) viewed as [M, K / 256, 256], boxes of ``box`` groups."""
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8 * t.element_size(), rank=3)
    groups = t.unflatten(1, (t.shape[1] // GROUP_SIZE, GROUP_SIZE))
    return TensorDescriptor.from_tensor(groups, [1, box, GROUP_SIZE], layout)


def rotate_quantize_sm90(x: torch.Tensor | None, h: torch.Tensor, bits: int, *, x2: torch.Tensor | None = None,
                         keep: bool | None = None, one_box: bool | None = None, order: str = "natural",
                         x_descale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """rotate_quant.rotate_quantize for 256-channel groups (``h`` the [16, 16] Kronecker factor) of
    bf16 rows, on sm_90: same arguments, same numerics. Check ``supported`` first (ops/dispatch.py does, and
    runs the Triton kernel where this one cannot).
    ``x_descale``: x is e4m3 (fp8 attention's output), widened to bf16 by it in shared memory as it lands: the
    16-bit copy is never written to memory.
    ``order``: the values' channel order within each group, "natural" or "mma" (quant.mma_channel_order: each
    lane's 8 values of a step go out in one 8-byte store instead of 8 byte stores 16 bytes apart, a quarter
    of a sector each; what the compiler picks on sm_90, dispatch.act_order_for).
    ``keep``: hold the rotated row in registers between the passes (default: rows of at most
    KEEP_MAX_STEPS steps); ``one_box``: load a row that is not a concatenation with one TMA box of a power
    of two of groups (zeros past its end) instead of one per step (default: with ``keep``, for a row that is
    not a concatenation); for comparisons."""
    check_act_order(order, GROUP_SIZE)
    first = x if x is not None else x2
    m = first.shape[0]
    k = sum(t.shape[1] for t in (x, x2) if t is not None)
    groups = k // GROUP_SIZE
    steps = triton.cdiv(groups, STEP_GROUPS)
    q = torch.empty(m, k, dtype=torch.int8, device=first.device)
    scale = torch.empty(m, dtype=torch.float32, device=first.device)
    if m == 0:
        return q, scale
    keep = steps <= KEEP_MAX_STEPS if keep is None else keep
    if keep and steps > KEEP_MAX_STEPS:
        raise ValueError(f"keep=True holds at most {KEEP_MAX_STEPS} steps of {STEP_GROUPS} groups in registers; "
                         f"this row has {steps}")
    concatenation = x is not None and x2 is not None
    one_box = keep and not concatenation if one_box is None else one_box
    if one_box and (concatenation or groups > 16):
        raise ValueError("one_box=True takes a row that is not a concatenation, of at most 16 groups")
    box = max(STEP_GROUPS, triton.next_power_of_2(groups)) if one_box else STEP_GROUPS
    desc1 = _group_descriptor(first, box)
    desc2 = _group_descriptor(x2, box) if concatenation else desc1
    if x2 is None:
        groups1 = steps * STEP_GROUPS  # every group from x
    else:
        groups1 = x.shape[1] // GROUP_SIZE if x is not None else 0
    # any float dtype (its entries, +-1/4, are exact in each; the kernel casts on load): the compiler's constant
    # is already on the device in the activations' dtype, so nothing is copied per call
    h = h.to(device=first.device).contiguous()
    _rotate_quant_sm90_kernel[(m,)](
        desc1, desc2, h, q, scale, scale if x_descale is None else x_descale, q.stride(0), k, scale, scale, 0, 0, 1,
        1, 0.0, STEPS=steps, BOX=box, GROUPS1=groups1, QMAX=7 if bits == 4 else 127,
        MASKED=steps * STEP_GROUPS != groups, KEEP=keep, MMA_ORDER=order == "mma", X_E4M3=x_descale is not None,
        ADALN=False, ADALN_TWO=False, num_warps=WARPS)
    return q, scale


def adaln_row_reason(k: int, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot normalize rows of ``k`` channels in ``dtype`` (adaLN), or None: it takes bf16 rows
    of whole steps that fit one box (at most 16 groups), so the row's statistics cover exactly its channels and
    the row stays in registers between the passes."""
    if dtype != torch.bfloat16:
        return "activations are not bf16"
    widest = KEEP_MAX_STEPS * STEP_GROUPS * GROUP_SIZE
    if k % (STEP_GROUPS * GROUP_SIZE) or k > widest:
        return f"adaLN rows must be a multiple of {STEP_GROUPS * GROUP_SIZE} channels, at most {widest}"
    return None


def adaln_supported(x: torch.Tensor, x2: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor,
                    h: torch.Tensor | None, group_size: int) -> str | None:
    """None when ``rotate_quantize_adaln_sm90`` can take these tensors (``dispatch.rotate_quantize_adaln``'s), else
    why not."""
    for t in (x, x2):
        why = supported(t.flatten(0, 1), None, h, group_size) if t is not None else None
        if why is not None:
            return why
    if x2 is not None and (x2.shape[0], x2.shape[-1]) != (x.shape[0], x.shape[-1]):
        return "x and x2 differ in samples or channels"
    why = adaln_row_reason(x.shape[-1], x.dtype)
    if why is not None:
        return why
    if any(v.shape != (x.shape[0], x.shape[-1]) or v.dtype != x.dtype or v.stride(-1) != 1 or v.device != x.device
           for v in (scale, shift)):
        return "scale and shift are not [B, K] rows of x's dtype with unit column stride"
    return None


def rotate_quantize_adaln_sm90(x: torch.Tensor, x2: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor,
                               eps: float, h: torch.Tensor, bits: int, *,
                               order: str = "natural") -> tuple[torch.Tensor, torch.Tensor]:
    """ops.rotate_quantize_adaln on sm_90: rows of x [B, T1, K] then x2 [B, T2, K] (or None) per sample, each
    normalized by numerics.adaln with its sample's scale and shift [B, K] as it lands, then rotated and quantized
    as ``rotate_quantize_sm90`` does (check ``adaln_supported`` first)."""
    check_act_order(order, GROUP_SIZE)
    if x2 is not None and 0 in (x.shape[1], x2.shape[1]):  # one part without tokens: the other's rows alone
        x, x2 = (x2 if x.shape[1] == 0 else x), None
    b, t1, k = x.shape
    tokens = t1 + (0 if x2 is None else x2.shape[1])
    m = b * tokens
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    row_scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, row_scale
    steps = k // (STEP_GROUPS * GROUP_SIZE)
    box = triton.next_power_of_2(k // GROUP_SIZE)
    desc1 = _group_descriptor(x.flatten(0, 1), box)
    desc2 = _group_descriptor(x2.flatten(0, 1), box) if x2 is not None else desc1
    h = h.to(device=x.device).contiguous()
    _rotate_quant_sm90_kernel[(m,)](
        desc1, desc2, h, q, row_scale, row_scale, q.stride(0), k, scale, shift, scale.stride(0), shift.stride(0),
        tokens, t1, float(eps), STEPS=steps, BOX=box, GROUPS1=steps * STEP_GROUPS, QMAX=7 if bits == 4 else 127,
        MASKED=False, KEEP=True, MMA_ORDER=order == "mma", X_E4M3=False, ADALN=True, ADALN_TWO=x2 is not None,
        num_warps=WARPS)
    return q, row_scale
