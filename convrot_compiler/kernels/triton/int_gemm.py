"""Quantized GEMM on int8 tensor cores: C = float(X @ W^T) * sx[:, None] * sw[None, :] (+ bias).

Hopper has no int4 tensor cores (mma s4 is emulated at ~1/20 the int8 rate), so
W4A4 keeps int4 weights in memory and int4 numerics but multiplies on int8
units. Measured on an H100: unpacking *both* operands
from packed int4 in the K loop ran at 313-378 TOPS, 0.43-0.53x cuBLAS bf16,
while the same kernel on int8 operands reached 865-1001 TOPS. Unpacked values
must go back to shared memory before a wgmma can read its B operand. So:

* activations are int8 containers (values in [-7, 7]) and load straight into
  shared memory;
* the kernel computes C^T = W X^T (the weights are wgmma's A operand), a layout
  kept from the version that unpacked weights in registers;
* weights are packed per group (byte j of a group holds values j and j + G/2), so
  one byte's two nibbles unpack to two contiguous runs.

The register-unpacking version measured 239-289 TOPS, slower still:
in Triton 3.6, unpacking in the K loop costs more than the int8 MMAs it feeds. So
the weights of the one layer being run are unpacked into a transient int8 buffer
by a memory-bound kernel, then the plain int8 GEMM runs: weights stay int4 in
memory, the extra traffic is 1.5 bytes per weight. (Both in-loop versions are in
the git history before this note.) On Hopper, kernels/sm90/packed_gemm.py (Gluon) does what
Triton could not: weights split in registers as wgmma's A operand, faster than this module's
int8 GEMM on unpacked weights; ops/dispatch.py runs it there, and chooses between this module's
two forms of the int8 GEMM (one program per tile, or persistent).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...numerics.quant import concat_biases
from .common import autotune_configs, check_2d_rows, check_dense_vector, check_device, gelu_tanh, interpreting, sm_count

# (BN weight rows, BM tokens, BK, stages, warps)
GEMM_TILES = [
    (128, 128, 128, 4, 8), (128, 256, 64, 3, 8), (128, 256, 128, 3, 8), (128, 128, 64, 4, 4),
    (64, 128, 128, 4, 4), (256, 128, 64, 3, 8), (128, 64, 128, 4, 4), (64, 256, 128, 3, 4),
    (128, 128, 64, 5, 4),  # the best int8 config at 4608x3072->3072/12288
]
_GPU_CONFIGS = [triton.Config({"BN": bn, "BM": bm, "BK": bk, "GROUP_N": 8}, num_stages=s, num_warps=w)
                for bn, bm, bk, s, w in GEMM_TILES]
_INTERPRETER_CONFIG = triton.Config({"BN": 16, "BM": 16, "BK": 32, "GROUP_N": 2}, num_warps=4)

@triton.jit
def _tile_of(pid, num_n, num_m, GROUP_N: tl.constexpr):
    """(pid_n, pid_m) of program/tile pid: GROUP_N weight-row tiles walk down all token tiles
    together, so a group's weight tiles stay in L2 while the activations stream past."""
    per_group = GROUP_N * num_m
    first_n = (pid // per_group) * GROUP_N
    size_n = min(num_n - first_n, GROUP_N)
    return first_n + ((pid % per_group) % size_n), (pid % per_group) // size_n


@triton.jit
def _store_scaled(acc, pid_n, pid_m, sx_ptr, sw_ptr, bias_ptr, c_ptr, M, N, stride_cm, gelu_from,
                  HAS_BIAS: tl.constexpr, HAS_GELU: tl.constexpr, FAST_GELU: tl.constexpr,
                  BN: tl.constexpr, BM: tl.constexpr):
    """Epilogue of a [BN, BM] tile of C^T: x token scale x channel scale (+ bias), GELU (tanh form;
    FAST_GELU: the hardware tanh) on output channels >= gelu_from (HAS_GELU), stored into C [M, N].
    A tile wholly below gelu_from skips the GELU: the epilogue is not overlapped with the MMAs, and
    in FLUX's fused Q/K/V/MLP GEMM 9216 of 21504 columns take no GELU."""
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    nmask = rn < N
    mmask = rm < M
    sw = tl.load(sw_ptr + rn, mask=nmask, other=0.0)
    sx = tl.load(sx_ptr + rm, mask=mmask, other=0.0)
    out = acc.to(tl.float32) * sx[None, :] * sw[:, None]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
    if HAS_GELU:
        if pid_n * BN + BN > gelu_from:
            out = tl.where((rn >= gelu_from)[:, None], gelu_tanh(out, FAST_GELU), out)
    c_ptrs = c_ptr + rm[None, :].to(tl.int64) * stride_cm + rn[:, None]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=nmask[:, None] & mmask[None, :])


@triton.autotune(configs=autotune_configs(_GPU_CONFIGS, _INTERPRETER_CONFIG), key=["M", "N", "K", "HAS_GELU"])
@triton.jit
def _int_gemm_kernel(x_ptr, w_ptr, sx_ptr, sw_ptr, bias_ptr, c_ptr, M, N, K, stride_xm, stride_wn, stride_cm,
                     gelu_from, HAS_BIAS: tl.constexpr, HAS_GELU: tl.constexpr, FAST_GELU: tl.constexpr,
                     BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, GROUP_N: tl.constexpr):
    """One program per [BN, BM] tile of C^T."""
    pid_n, pid_m = _tile_of(tl.program_id(0), tl.cdiv(N, BN), tl.cdiv(M, BM), GROUP_N)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    w_ptrs = w_ptr + (rn % N)[:, None].to(tl.int64) * stride_wn + rk[None, :]
    x_rows = x_ptr + (rm % M)[:, None].to(tl.int64) * stride_xm + rk[None, :]
    acc = tl.zeros([BN, BM], dtype=tl.int32)
    for kb in range(0, K, BK):
        acc = tl.dot(tl.load(w_ptrs), tl.trans(tl.load(x_rows + kb)), acc, out_dtype=tl.int32)
        w_ptrs += BK
    _store_scaled(acc, pid_n, pid_m, sx_ptr, sw_ptr, bias_ptr, c_ptr, M, N, stride_cm, gelu_from,
                  HAS_BIAS, HAS_GELU, FAST_GELU, BN, BM)


# (BN, BM, BK, stages, warps). With Hopper's automatic warp specialization, (128, 128, 128, 4, 4) was the
# fastest of 7-9 configs at every FLUX.1-dev shape and M = 512-4608 (H100):
# 1.64x cuBLAS bf16 (geomean, M = 4608) against 1.51x for the unspecialized
# form in the same process. It is the only one: autotuning it against (128, 128, 128, 3, 4) picked the
# latter where it ran at half the speed (M = 512 and 2048, 3072 -> 3072).
_WS_TILES = [(128, 128, 128, 4, 4)]
_TMA_TILES = [(128, 128, 128, 4, 8), (128, 256, 64, 3, 8), (128, 256, 128, 3, 8), (128, 128, 64, 4, 4),
              (128, 128, 64, 5, 4), (256, 128, 64, 3, 8), (128, 128, 128, 3, 4)]
_TMA_INTERPRETER_CONFIG = triton.Config({"BN": 16, "BM": 16, "BK": 32, "GROUP_N": 2}, num_warps=4)


def _tile(config: triton.Config) -> tuple[int, int, int, int, int]:
    return config.kwargs["BN"], config.kwargs["BM"], config.kwargs["BK"], config.num_stages, config.num_warps


def _prune_tma(configs, named_args, **kwargs):
    """The warp-specialized form autotunes over _WS_TILES, the other over _TMA_TILES."""
    tiles = _WS_TILES if kwargs.get("WARP_SPECIALIZE", named_args.get("WARP_SPECIALIZE")) else _TMA_TILES
    return [c for c in configs if _tile(c) in tiles] or configs


@triton.autotune(
    configs=autotune_configs([triton.Config({"BN": bn, "BM": bm, "BK": bk, "GROUP_N": 8}, num_stages=s, num_warps=w)
                              for bn, bm, bk, s, w in dict.fromkeys(_WS_TILES + _TMA_TILES)],
                             _TMA_INTERPRETER_CONFIG),
    key=["M", "N", "K", "HAS_GELU", "WARP_SPECIALIZE"], prune_configs_by={"early_config_prune": _prune_tma})
@triton.jit
def _int_gemm_tma_kernel(w_ptr, x_ptr, sx_ptr, sw_ptr, bias_ptr, c_ptr, M, N, K, stride_wn, stride_xm, stride_cm,
                         gelu_from, HAS_BIAS: tl.constexpr, HAS_GELU: tl.constexpr, FAST_GELU: tl.constexpr,
                         NUM_PROGRAMS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                         BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, GROUP_N: tl.constexpr):
    """The int8 GEMM of _int_gemm_kernel, persistent (one program per SM walks the tiles) with operands
    loaded by TMA, after Triton's persistent-matmul tutorial. Same tile order, same epilogue.

    WARP_SPECIALIZE: Triton's automatic warp specialization splits the tile loop into a producer
    (TMA loads) and consumer warps (MMAs, epilogue), so one tile's epilogue overlaps the next tile's
    loads; on Hopper it does not flatten the loop nest. Otherwise the flattened loop lets the next
    tile's loads overlap this tile's epilogue. The descriptors are built on the device, as Triton's Hopper
    warp-specialization examples build them (host-side ones were not tried specialized), in a scratch
    buffer from triton.set_allocator; unspecialized, the two forms measured the same."""
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BN, BK])
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BM, BK])
    num_n = tl.cdiv(N, BN)
    num_m = tl.cdiv(M, BM)
    for tile in tl.range(tl.program_id(0), num_n * num_m, NUM_PROGRAMS, flatten=not WARP_SPECIALIZE,
                         warp_specialize=WARP_SPECIALIZE):
        pid_n, pid_m = _tile_of(tile, num_n, num_m, GROUP_N)
        acc = tl.zeros([BN, BM], dtype=tl.int32)
        for kb in range(0, K, BK):
            acc = tl.dot(w_desc.load([pid_n * BN, kb]), x_desc.load([pid_m * BM, kb]).T, acc, out_dtype=tl.int32)
        _store_scaled(acc, pid_n, pid_m, sx_ptr, sw_ptr, bias_ptr, c_ptr, M, N, stride_cm, gelu_from,
                      HAS_BIAS, HAS_GELU, FAST_GELU, BN, BM)


@triton.jit
def _unpack_int4_kernel(p_ptr, q_ptr, N, KB, HALF: tl.constexpr, BN: tl.constexpr, BKB: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rkb = tl.program_id(1) * BKB + tl.arange(0, BKB)
    mask = (rn < N)[:, None] & (rkb < KB)[None, :]
    rows = rn[:, None].to(tl.int64)
    b = tl.load(p_ptr + rows * KB + rkb[None, :], mask=mask, other=0)
    k_lo = (rkb // HALF) * (2 * HALF) + (rkb % HALF)
    lo = ((b << 4) >> 4).to(tl.int8)
    hi = (b >> 4).to(tl.int8)
    tl.store(q_ptr + rows * (2 * KB) + k_lo[None, :], lo, mask=mask)
    tl.store(q_ptr + rows * (2 * KB) + k_lo[None, :] + HALF, hi, mask=mask)


def unpack_int4(packed: torch.Tensor, group_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Kernel form of quant.unpack_int4 for [N, K'/2] weights: [N, K'] int8 values, written to ``out``
    (contiguous, e.g. a row slice of a larger buffer) when given."""
    check_device(packed)
    check_2d_rows("packed", packed)
    if packed.dtype != torch.int8:
        raise TypeError(f"unpack_int4 takes packed int8 bytes, got {packed.dtype}")
    n, kb = packed.shape
    if kb % (group_size // 2):
        raise ValueError(f"packed width {kb} must be a multiple of group_size/2 = {group_size // 2}")
    packed = packed.contiguous()
    if out is None:
        out = torch.empty(n, 2 * kb, dtype=torch.int8, device=packed.device)
    elif out.shape != (n, 2 * kb) or out.dtype != torch.int8 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous int8 [{n}, {2 * kb}] tensor, got {out.dtype} {tuple(out.shape)}")
    bn, bkb = (16, 32) if interpreting() else (32, 256)
    grid = (triton.cdiv(n, bn), triton.cdiv(kb, bkb))
    _unpack_int4_kernel[grid](packed, out, n, kb, HALF=group_size // 2, BN=bn, BKB=bkb, num_warps=4)
    return out


def stacked_weights(qws: list[torch.Tensor], packed: bool, group_size: int) -> torch.Tensor:
    """The weights as one int8 [sum N, K'] operand: unpacked (each into its rows of one transient buffer)
    when packed, concatenated when several int8 ones, the tensor itself when one int8 one."""
    if not packed:
        return qws[0] if len(qws) == 1 else torch.cat(qws)
    n_total = sum(w.shape[0] for w in qws)
    out = torch.empty(n_total, 2 * qws[0].shape[1], dtype=torch.int8, device=qws[0].device)
    row = 0
    for w in qws:
        unpack_int4(w, group_size, out=out[row:row + w.shape[0]])
        row += w.shape[0]
    return out


def check_gemm_operands(qx: torch.Tensor, sx: torch.Tensor, qws: list[torch.Tensor], sws: list[torch.Tensor],
                        biases: list[torch.Tensor | None], packed: bool, group_size: int,
                        gelu_from: int | None) -> None:
    """The checks every quantized GEMM launcher makes (this module's and packed_gemm_sm90's callers)."""
    if not (len(qws) == len(sws) == len(biases) >= 1):
        raise ValueError(f"int_gemm takes as many weights, scales and biases, got {len(qws)}, {len(sws)}, "
                         f"{len(biases)}")
    check_device(qx, sx, *qws, *sws, *biases)
    check_2d_rows("qx", qx)
    for w in qws:
        check_2d_rows("qw", w)
    if any(w.dtype != torch.int8 for w in qws) or qx.dtype != torch.int8:
        raise TypeError(f"int_gemm takes int8 activations and int8 weights, got {qx.dtype} and "
                        f"{sorted({str(w.dtype) for w in qws})}")
    m, k = qx.shape
    for w, s, b in zip(qws, sws, biases):
        n, kw = w.shape
        if kw * (2 if packed else 1) != k:
            raise ValueError(f"K mismatch: activations have {k} values per row, weights {kw} "
                             f"{'bytes (2 values each)' if packed else 'values'}")
        if s.shape != (n,) or s.dtype != torch.float32:
            raise ValueError(f"weight scales must be float32 [N]={n}, got {tuple(s.shape)} {s.dtype}")
        if b is not None and b.shape != (n,):
            raise ValueError(f"bias must have shape [{n}], got {tuple(b.shape)}")
        check_dense_vector("weight scales", s)
        if b is not None:
            check_dense_vector("bias", b)
    if k % group_size or group_size % 256:
        raise ValueError(f"K={k} must be a multiple of group_size={group_size}, itself a multiple of 256: "
                         "pad K to the rotation group size")
    if sx.shape != (m,) or sx.dtype != torch.float32:
        raise ValueError(f"activation scales must be float32 [M]={m}, got {tuple(sx.shape)} {sx.dtype}")
    check_dense_vector("activation scales", sx)
    n = sum(w.shape[0] for w in qws)
    if gelu_from is not None and not 0 <= gelu_from <= n:
        raise ValueError(f"gelu_from must lie in [0, N={n}], got {gelu_from}")


def int_gemm(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor | list[torch.Tensor],
             sw: torch.Tensor | list[torch.Tensor], bias: torch.Tensor | None | list[torch.Tensor | None],
             packed: bool, group_size: int, out_dtype: torch.dtype, *, gelu_from: int | None = None,
             persistent: bool = False, warp_specialize: bool = False) -> torch.Tensor:
    """[M, N] = (qx @ W^T) * sx * sw (+ bias) on int8 tensor cores.

    qx: int8 activations [M, K'] (int4 values in int8 containers for W4A4); qw: weights [N, K'/2] packed
    int4 (``packed``, per-group layout of quant.pack_int4), unpacked first into a transient buffer (see the
    module docstring), or [N, K'] int8; K' a multiple of ``group_size`` (256 or 128k).

    Lists of weights, scales and biases (one entry per linear that reads qx) run as one GEMM
    whose output is their outputs side by side, [M, sum N].

    ``gelu_from``: the epilogue applies GELU (tanh form, in float32) to output columns >= gelu_from
    (FLUX's MLP up-projection, alone or last in a fused GEMM), so the bf16 output is not written
    and read back by a separate GELU kernel. On a GPU its tanh is the hardware approximation
    (common.gelu_tanh: error at most about 2^-12 |x|).

    ``persistent``: the persistent, TMA-descriptor form of the same GEMM (_int_gemm_tma_kernel; equal
    results), its tile loop warp-specialized with ``warp_specialize``; else one program per tile.
    ops/dispatch.py chooses."""
    qws, sws, biases = (list(t) if isinstance(t, (list, tuple)) else [t] for t in (qw, sw, bias))
    check_gemm_operands(qx, sx, qws, sws, biases, packed, group_size, gelu_from)
    return int_gemm_unchecked(qx, sx, qws, sws, biases, packed, group_size, out_dtype, gelu_from=gelu_from,
                              persistent=persistent, warp_specialize=warp_specialize)


def int_gemm_unchecked(qx: torch.Tensor, sx: torch.Tensor, qws: list[torch.Tensor], sws: list[torch.Tensor],
                       biases: list[torch.Tensor | None], packed: bool, group_size: int, out_dtype: torch.dtype, *,
                       gelu_from: int | None = None, persistent: bool = False,
                       warp_specialize: bool = False) -> torch.Tensor:
    """int_gemm on lists of operands that ``check_gemm_operands`` has passed (ops/dispatch.py, on every
    call of a forward)."""
    m, k = qx.shape
    n = sum(w.shape[0] for w in qws)
    if m == 0 or n == 0:
        return torch.empty(m, n, dtype=out_dtype, device=qx.device)
    s_all = sws[0] if len(sws) == 1 else torch.cat(sws)
    b_all = concat_biases(biases, [w.shape[0] for w in qws], qx.device)
    c = torch.empty(m, n, dtype=out_dtype, device=qx.device)
    w_all = stacked_weights(qws, packed, group_size)
    fast_gelu = not interpreting()
    if persistent:
        _persistent_gemm(qx, w_all, sx, s_all, b_all, c, gelu_from, fast_gelu, warp_specialize, programs(qx.device))
        return c
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    _int_gemm_kernel[grid](qx, w_all, sx, s_all, b_all if b_all is not None else s_all, c, m, n, k,
                           qx.stride(0), w_all.stride(0), c.stride(0), gelu_from or 0, HAS_BIAS=b_all is not None,
                           HAS_GELU=gelu_from is not None, FAST_GELU=fast_gelu)
    return c


def programs(device: torch.device) -> int:
    """Programs of the persistent form: one per SM (4 in the interpreter)."""
    if interpreting():
        return 4
    return sm_count(device)


def _persistent_gemm(qx, w_all, sx, s_all, b_all, c, gelu_from, fast_gelu, warp_specialize, programs) -> None:
    m, k = qx.shape
    n = w_all.shape[0]
    # scratch for the device-side TMA descriptors, on the operands' device; Inductor sets one per launch too
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=qx.device))
    grid = lambda meta: (min(programs, triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"])),)  # noqa: E731
    _int_gemm_tma_kernel[grid](w_all, qx, sx, s_all, b_all if b_all is not None else s_all, c, m, n, k,
                               w_all.stride(0), qx.stride(0), c.stride(0), gelu_from or 0, HAS_BIAS=b_all is not None,
                               HAS_GELU=gelu_from is not None, FAST_GELU=fast_gelu, NUM_PROGRAMS=programs,
                               WARP_SPECIALIZE=warp_specialize)
