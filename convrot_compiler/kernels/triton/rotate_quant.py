"""Fused group-wise Hadamard rotation + per-token symmetric quantization.

One program owns BM rows and walks them CH groups at a time (CH > 1 for the few rows
of FLUX's text stream, where one program's chain of steps is what takes the time).
Pass 1 rotates every group of the rows and keeps the running absmax; pass 2 rotates
again (the rows' input is then in L2) and writes the values as int8 (int4 values in
[-7, 7] also go out in int8 containers: the GEMM then loads them with no unpacking,
see kernels/triton/int_gemm.py). The per-token scale needs the whole rotated row, and a row of K up to 15360 does not
fit on chip, hence two passes over a cached input rather than one over DRAM. On sm_90 rotate_quantize runs
rotate_quant_sm90.py instead where it can (bf16 rows on the 256-group grid): Gluon keeps the row in shared
memory, so it is read from DRAM once.

The rotation of a group of G channels runs one of two ways:
* dense (G <= 64): y = x @ H, one [BM, G] x [G, G] tensor-core product. For
  G = 256 the dense form does not fit: Triton keeps the loop-invariant 128 KB
  H resident in shared memory (280 KB asked on an H100, 227 KB available);
* kron (G = 256 only): H = A (x) A with A the 16 x 16 Hadamard of the same kind,
  so a group viewed as X [16, 16] rotates to A^T X A: two products with K = 16,
  16x fewer flops than dense. The second product takes its fp32 input as a sum
  of two bf16 parts so that nothing is lost to the bf16 operand format.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ...numerics.quant import check_act_order
from .common import autotune_configs, check_2d_rows, check_device, interpreting, round_half_even, round_to_float_grid

METHOD_NONE, METHOD_DENSE, METHOD_KRON = 0, 1, 2


@triton.jit
def _kron_rotate(x, h_ptr, R: tl.constexpr, DOT_F32: tl.constexpr):
    """[R, 16] rows (r, i) x columns j of 16 x 16 blocks X -> rows (r, j') x columns i' of (A^T X A)^T."""
    a_idx = tl.arange(0, 16)
    a = tl.load(h_ptr + a_idx[:, None] * 16 + a_idx[None, :])
    if DOT_F32:
        a32 = a.to(tl.float32)
        z = tl.dot(x.to(tl.float32), a32, input_precision="ieee")
        zt = tl.reshape(tl.permute(tl.reshape(z, (R // 16, 16, 16)), (0, 2, 1)), (R, 16))
        w = tl.dot(zt, a32, input_precision="ieee")
    else:
        z = tl.dot(x, a)
        zt = tl.reshape(tl.permute(tl.reshape(z, (R // 16, 16, 16)), (0, 2, 1)), (R, 16))
        z_hi = zt.to(tl.bfloat16)
        z_lo = (zt - z_hi.to(tl.float32)).to(tl.bfloat16)
        a16 = a.to(tl.bfloat16)
        w = tl.dot(z_hi, a16)
        w = tl.dot(z_lo, a16, w)
    return w


@triton.jit
def _rotate_group(x, h_ptr, BM: tl.constexpr, G: tl.constexpr, METHOD: tl.constexpr, DOT_F32: tl.constexpr):
    """The rotated group in float32: [BM, G] in channel order, except for the Kronecker form,
    which stays in its own order, [BM * 16, 16] with element (r * 16 + j, i) holding channel
    16 i + j of row r (putting it back in order would cost a layout conversion per group)."""
    if METHOD == 0:
        y = x.to(tl.float32)
    elif METHOD == 1:
        hr = tl.arange(0, G)
        h = tl.load(h_ptr + hr[:, None] * G + hr[None, :])
        if DOT_F32:
            y = tl.dot(x.to(tl.float32), h.to(tl.float32), input_precision="ieee")
        else:
            y = tl.dot(x, h)
    else:
        y = _kron_rotate(tl.reshape(x, (BM * 16, 16)), h_ptr, BM * 16, DOT_F32)
    return y


@triton.jit
def _repeat_each(v, N: tl.constexpr, REPS: tl.constexpr):
    """[N] -> [N * REPS], each entry repeated REPS times in a row (per-row values for a tile whose rows
    are REPS sub-rows of each row, as the Kronecker order's 16 rows per group)."""
    return tl.reshape(tl.broadcast_to(v[:, None], (N, REPS)), (N * REPS,))


@triton.jit
def _load_x(ptrs, mask, descale, X_E4M3: tl.constexpr, WIDE: tl.constexpr, GPU_MATH: tl.constexpr):
    """x's values: as stored, or X_E4M3: e4m3 times its descale, rounded to WIDE (dequantize_e4m3's numerics;
    the interpreter's casts to bf16 and fp16 truncate, so there the rounding is spelled out)."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if X_E4M3:
        x = x.to(tl.float32) * descale
        if not GPU_MATH:
            if WIDE == tl.bfloat16:
                x = round_to_float_grid(x, 2.0 ** -7, 2.0 ** -133)
            elif WIDE == tl.float16:
                x = round_to_float_grid(x, 2.0 ** -10, 2.0 ** -24)
        x = x.to(WIDE)
    return x


@triton.jit
def _load_group(x_rows, x2_rows, g, cols, rmask, K, K1, descale, G: tl.constexpr, TWO_SOURCES: tl.constexpr,
                CH: tl.constexpr, X_E4M3: tl.constexpr, WIDE: tl.constexpr, GPU_MATH: tl.constexpr):
    """Step g of the rows: groups g * CH .. g * CH + CH - 1 (cols: arange(CH * G)); channels past K
    read as zeros. TWO_SOURCES: channels [0, K1) from x, channels [K1, K) from x2, so that cat([x, x2])
    (or x2 alone, K1 = 0) is never written to memory; K1 is a multiple of G (a step of several groups
    may straddle it). X_E4M3: x holds e4m3 values, widened as they load (_load_x)."""
    k = g * (CH * G) + cols
    if TWO_SOURCES:
        if CH == 1:
            if g * G < K1:
                x = _load_x(x_rows + k[None, :], rmask[:, None], descale, X_E4M3, WIDE, GPU_MATH)
            else:
                x = tl.load(x2_rows + (k - K1)[None, :], mask=rmask[:, None] & (k[None, :] < K), other=0.0)
        else:
            first = k[None, :] < K1
            xa = _load_x(x_rows + k[None, :], rmask[:, None] & first, descale, X_E4M3, WIDE, GPU_MATH)
            xb = tl.load(x2_rows + (k - K1)[None, :], mask=rmask[:, None] & ~first & (k[None, :] < K), other=0.0)
            x = tl.where(first, xa, xb)
    else:
        x = _load_x(x_rows + k[None, :], rmask[:, None] & (k[None, :] < K), descale, X_E4M3, WIDE, GPU_MATH)
    return x


@triton.jit
def _row_divisor(scale, usable):
    """Per row: (p, s, inv) with p a power of two, s = scale * p in [2^-22, 4) and inv the correctly
    rounded 1 / s; y / scale = (y * p) / s exactly, and s keeps the reciprocal form below in range."""
    safe = tl.where(usable, scale, 1.0)
    e = (safe.to(tl.int32, bitcast=True) >> 23) & 0xFF
    p = (tl.maximum(254 - e, 1) << 23).to(tl.float32, bitcast=True)
    s = safe * p
    return p, s, tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)


@triton.jit
def _quantize_tile(y, p, s, inv, usable, QMAX: tl.constexpr, GPU_MATH: tl.constexpr):
    """round(y / scale) clamped to [-QMAX, QMAX], 0 on unusable rows, as a float tile.

    The quotient must be the correctly rounded y / scale: ties decide the integer. Triton's default
    fp32 '/' is approximate and div.rn costs about a dozen instructions per element, so on the GPU
    the quotient of y' = y * p by s (see _row_divisor) is q0 = y' * inv, then
    q = fma(fma(-q0, s, y'), inv, q0): the correctly rounded quotient (Markstein's theorem: inv
    correctly rounded, q0 within an ulp, the residual exact). The interpreter has no fused
    multiply-add, so it divides."""
    if GPU_MATH:
        yp = y * p[:, None]
        q0 = yp * inv[:, None]
        q = tl.fma(tl.fma(-q0, s[:, None], yp), inv[:, None], q0)
        q = libdevice.rint(tl.minimum(tl.maximum(q, -QMAX), QMAX))
    else:
        q = round_half_even(tl.math.div_rn(y, (s / p)[:, None]))  # s / p: the scale, 1 on unusable rows
        q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
    return tl.where(usable[:, None], q, 0.0)


SMALL_M = 1024  # rows up to which a program takes one row and several groups per step


def _config(bm: int, ch: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BM": bm, "CH": ch}, num_warps=warps, num_stages=stages)


def _prune(configs, named_args, **kwargs):
    """The configs for this call. The dense form's dot has BM * CH rows and needs at least 16; the
    Kronecker form's has BM * CH * 16. Few rows (SMALL_M) in the Kronecker form take the configs with
    several groups per step (CH > 1), all other calls those with one."""
    method = kwargs.get("METHOD", named_args.get("METHOD"))
    if method == METHOD_DENSE:
        return [c for c in configs if c.kwargs["BM"] >= 16 and c.kwargs["CH"] == 1] or [_config(16, 1, 4, 3)]
    wide = bool(kwargs.get("SMALL_M", named_args.get("SMALL_M"))) and method == METHOD_KRON
    fallback = _config(1, 4, 2, 3) if wide else _config(2, 1, 2, 3)
    return [c for c in configs if (c.kwargs["CH"] > 1) == wide] or [fallback]


# Every (BM, warps, stages) in {2..32} x {2, 4, 8} x {1, 2, 3} was timed at 4608 x 3072/12288 and
# 512 x 3072 on an H100: two rows per program, two warps, three
# stages won everywhere (1182-1372 GB/s against 350-373 for the worst). Autotuning over all of them
# picked badly at K = 3072 (candidate timings noisier than their differences), so only the leaders
# are kept, plus BM >= 16 for the dense form. At M <= 1024 (the text stream's 512 rows) a program's
# two passes over its groups are a dependent chain that too few programs cannot hide: one row and
# 4-8 groups per step ran 11.2 us instead of 14.5 at 512 x 3072 and 22.2 instead of 38.7 at 512 x 12288
# (H100, CUDA-graph replays).
@triton.autotune(
    configs=autotune_configs(
        [_config(bm, 1, w, st) for bm, w, st in ((2, 2, 3), (4, 2, 3), (4, 4, 3), (8, 4, 3), (16, 4, 3), (32, 4, 3))]
        + [_config(1, ch, w, 3) for ch, w in ((4, 2), (8, 4), (4, 4), (2, 2))],
        _config(8, 2, 4, 1),  # the interpreter: two groups per step, so that the CPU tests run that path
        quick=_config(2, 1, 2, 3),
    ),
    key=["K", "G", "METHOD", "QMAX", "TWO_SOURCES", "SMALL_M", "X_E4M3"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _rotate_quant_kernel(x_ptr, x2_ptr, h_ptr, q_ptr, s_ptr, descale_ptr, M, K, K1, stride_xm, stride_x2m,
                         stride_qm, G: tl.constexpr, METHOD: tl.constexpr, QMAX: tl.constexpr,
                         TWO_SOURCES: tl.constexpr, DOT_F32: tl.constexpr, GPU_MATH: tl.constexpr,
                         SMALL_M: tl.constexpr, MMA_ORDER: tl.constexpr, X_E4M3: tl.constexpr, WIDE: tl.constexpr,
                         BM: tl.constexpr, CH: tl.constexpr):
    """BM rows per program, CH groups of each per step: a step's tile is [BM * CH, G], tile row r * CH + c
    holding group c of row r. SMALL_M only selects the configs (see _prune). MMA_ORDER (Kronecker form):
    each group's values go out in quant.mma_channel_order. X_E4M3: x is e4m3, times *descale_ptr, in WIDE."""
    pid = tl.program_id(0)
    descale = tl.load(descale_ptr) if X_E4M3 else 1.0
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < M
    cols = tl.arange(0, CH * G)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    x2_rows = x2_ptr + rows[:, None].to(tl.int64) * stride_x2m
    n_groups = tl.cdiv(K, G)
    n_steps = tl.cdiv(n_groups, CH)

    # element-wise running max, reduced across threads once after the loop
    R: tl.constexpr = BM * CH
    KRON_ORDER: tl.constexpr = METHOD == 2
    if KRON_ORDER:
        amax_t = tl.zeros([R * 16, 16], dtype=tl.float32)
    else:
        amax_t = tl.zeros([R, G], dtype=tl.float32)
    for g in range(0, n_steps):
        x = _load_group(x_rows, x2_rows, g, cols, rmask, K, K1, descale, G, TWO_SOURCES, CH, X_E4M3, WIDE, GPU_MATH)
        y = _rotate_group(tl.reshape(x, (R, G)), h_ptr, R, G, METHOD, DOT_F32)
        # a non-finite input rotates to inf or NaN (as in the reference, which checks the rotated
        # row): keep NaN through the max, then one check per element after the loop
        amax_t = tl.maximum(amax_t, tl.abs(y), propagate_nan=tl.PropagateNan.ALL)
    amax_t = tl.reshape(amax_t, (BM, CH * G))
    bad = tl.max((~(amax_t < float("inf"))).to(tl.int32), axis=1)
    amax = tl.max(tl.where(amax_t < float("inf"), amax_t, 0.0), axis=1)

    scale = tl.where(bad > 0, float("nan"), tl.math.div_rn(amax, tl.full([BM], QMAX, tl.float32)))
    usable = (bad == 0) & (scale > 0.0)
    tl.store(s_ptr + rows, scale, mask=rmask)
    p, s, inv = _row_divisor(scale, usable)

    # per tile row (group c of row r), and in the Kronecker order per each of its 16 sub-rows
    SUB: tl.constexpr = 16 if KRON_ORDER else 1
    p_t = _repeat_each(p, BM, CH * SUB)
    s_t = _repeat_each(s, BM, CH * SUB)
    inv_t = _repeat_each(inv, BM, CH * SUB)
    usable_t = _repeat_each(usable, BM, CH * SUB)
    rt = tl.arange(0, R * SUB)
    row_t = pid * BM + rt // (CH * SUB)
    c_t = (rt // SUB) % CH
    if KRON_ORDER:
        # element ((r * CH + c) * 16 + j, i) of the Kronecker order is channel 16 i + j of group c of row r
        i16 = tl.arange(0, 16)
        j16 = rt % 16
        if MMA_ORDER:  # its position in quant.mma_channel_order: a sum of a j part and an i part
            j_pos = 32 * (j16 % 8) + 2 * (j16 // 8)
            i_pos = 8 * ((i16 // 2) % 4) + i16 % 2 + 4 * (i16 // 8)
        else:
            j_pos = j16
            i_pos = 16 * i16
        q_t_ptrs = (q_ptr + row_t[:, None].to(tl.int64) * stride_qm + (c_t * G + j_pos)[:, None]
                    + i_pos[None, :])
    else:
        q_t_ptrs = (q_ptr + row_t[:, None].to(tl.int64) * stride_qm + (c_t * G)[:, None]
                    + tl.arange(0, G)[None, :])
    for g in range(0, n_steps):
        x = _load_group(x_rows, x2_rows, g, cols, rmask, K, K1, descale, G, TWO_SOURCES, CH, X_E4M3, WIDE, GPU_MATH)
        y = _rotate_group(tl.reshape(x, (R, G)), h_ptr, R, G, METHOD, DOT_F32)
        # stored from the Kronecker order through strided addresses: no permute
        q = _quantize_tile(y, p_t, s_t, inv_t, usable_t, QMAX, GPU_MATH).to(q_ptr.dtype.element_ty)
        tl.store(q_t_ptrs + g * (CH * G), q, mask=((row_t < M) & (g * CH + c_t < n_groups))[:, None])


_WIDE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def check_e4m3_rows(x: torch.Tensor, x_descale: torch.Tensor, dtype: torch.dtype | None,
                    x2: torch.Tensor | None) -> torch.dtype:
    """The dtype e4m3 rows ``x`` widen to (``dtype``, or x2's), after checking x is e4m3 and ``x_descale`` one
    float32 value on x's device; raises what to fix otherwise."""
    if x.dtype != torch.float8_e4m3fn:
        raise TypeError(f"x_descale is given, so x must be float8_e4m3fn, got {x.dtype}")
    if x_descale.numel() != 1 or x_descale.dtype != torch.float32 or x_descale.device != x.device:
        raise ValueError(f"x_descale must be one float32 value on {x.device}, got {x_descale.dtype} "
                         f"{tuple(x_descale.shape)} on {x_descale.device}")
    wide = dtype if dtype is not None else None if x2 is None else x2.dtype
    if wide is None or wide not in _WIDE or (x2 is not None and x2.dtype != wide):
        raise ValueError(f"e4m3 x widens to dtype (bf16, fp16 or fp32), x2's dtype if x2 is given; got dtype {dtype} "
                         f"and x2 {None if x2 is None else x2.dtype}")
    return wide


def rotate_quantize(x: torch.Tensor | None, h: torch.Tensor | None, group_size: int, bits: int, *,
                    x2: torch.Tensor | None = None, order: str = "natural", x_descale: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate [M, K] activations group-wise and quantize each row symmetrically.

    ``h``: the [G, G] rotation, its [16, 16] Kronecker square root when G = 256
    (faster), or None for no rotation (K is still zero-padded to a multiple of G).
    Returns (values [M, K'] in [-qmax, qmax] as int8, scale float32 [M]).

    ``x2`` [M, K2]: the activations are cat([x, x2], -1) (x's width a multiple of group_size; x None: x2
    alone), read from both as the kernel loads them: what feeds FLUX's single blocks' proj_out without
    writing the concatenation out first. x2 may be a column slice (row stride larger than its width), e.g.
    of a fused GEMM's output.

    ``x_descale``: x is float8_e4m3fn (fp8 attention's output) and its values are
    ``dequantize_e4m3(x, x_descale, dtype)``, widened as they load; ``dtype`` defaults to x2's.

    ``order``: the values' channel order within each group, ``"natural"`` or ``"mma"``
    (quant.mma_channel_order: what the sm_90 kernel stores with whole sectors; 256-channel groups with
    the Kronecker factor h).
    """
    check_act_order(order, group_size)
    if x_descale is not None and x is None:
        raise ValueError("x_descale scales x, which is None")
    if x2 is not None:
        check_device(x2)
        check_2d_rows("x2", x2)
        if x is None:
            x, x2, k1 = x2, None, 0
        else:
            k1 = x.shape[1]
            if (x.dtype != x2.dtype and x_descale is None) or x.shape[0] != x2.shape[0] or k1 % group_size:
                raise ValueError(f"cat([x, x2]) needs one dtype, as many rows, and x's width a multiple of "
                                 f"group_size={group_size}; got {x.dtype} {tuple(x.shape)} and {x2.dtype} "
                                 f"{tuple(x2.shape)}")
    elif x is None:
        raise ValueError("rotate_quantize needs x (or x2)")
    check_device(x)
    check_2d_rows("x", x)
    act_dtype = x.dtype if x_descale is None else check_e4m3_rows(x, x_descale, dtype, x2)
    if act_dtype not in _WIDE:
        raise TypeError(f"rotate_quantize takes bf16, fp16 or fp32 activations (e4m3 with x_descale), got {x.dtype}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of 2 >= 16, got {group_size}")
    if h is None:
        method = METHOD_NONE
        h = x.new_empty(1)
    elif tuple(h.shape) == (group_size, group_size) and group_size <= 64:
        method = METHOD_DENSE
    elif tuple(h.shape) == (16, 16) and group_size == 256:
        method = METHOD_KRON
    else:
        raise ValueError(f"h must be the [G, G] rotation for G <= 64 or, for G = 256, its [16, 16] Kronecker factor; "
                         f"got {tuple(h.shape)} for G = {group_size}")
    if order == "mma" and method != METHOD_KRON:
        raise ValueError("order='mma' needs the rotation's [16, 16] Kronecker factor h (groups of 256)")
    dot_f32 = interpreting() or act_dtype == torch.float32
    h = h.to(device=x.device, dtype=torch.float32 if dot_f32 else act_dtype).contiguous()
    m = x.shape[0]
    k = x.shape[1] if x2 is None else k1 + x2.shape[1]
    kp = -(-k // group_size) * group_size
    q = torch.empty(m, kp, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    grid = lambda meta: (triton.cdiv(m, meta["BM"]),)  # noqa: E731
    two = x2 is not None
    x2 = x if x2 is None else x2
    _rotate_quant_kernel[grid](x, x2, h, q, scale, scale if x_descale is None else x_descale, m, k,
                               k1 if two else 0, x.stride(0), x2.stride(0), q.stride(0),
                               G=group_size, METHOD=method, QMAX=7 if bits == 4 else 127, TWO_SOURCES=two,
                               DOT_F32=dot_f32, GPU_MATH=not interpreting(), SMALL_M=m <= SMALL_M,
                               MMA_ORDER=order == "mma", X_E4M3=x_descale is not None, WIDE=_WIDE[act_dtype])
    return q, scale
