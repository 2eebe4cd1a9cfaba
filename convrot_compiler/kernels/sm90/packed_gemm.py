"""W4A4 GEMM for Hopper in Gluon: packed int4 weights unpacked in registers as wgmma's A operand.

The Triton GEMM (int_gemm.py) cannot unpack in its K loop without losing most of its speed, so
the compiler unpacks each layer's weights into a transient int8 buffer first: 1.5 extra bytes per
weight, 4.7 ms of a 104 ms FLUX.1-dev forward, and the whole gap to cuBLAS bf16 at M = 512
Gluon exposes what Triton hides: wgmma with its A operand in registers, shared
memory, mbarriers and warp specialization. So, as CUTLASS's mixed-input Hopper GEMMs do, the
packed weights are the A operand (the kernel computes C^T = W X^T):

* a one-warp producer partition streams packed weight tiles [BN, BKP] and the two matching
  activation tiles [BM, BKP] into a ring of shared-memory stages by TMA;
* the consumer warps load a packed tile into wgmma's A-operand register layout, where each
  32-bit register holds 4 consecutive bytes, and split it with one or two 32-bit logic
  instructions per 8 values. The per-group layout of quant.pack_int4 (byte j of a group holds
  values j and j + G/2) makes the low nibbles one K range and the high nibbles another, so each
  register pair feeds two wgmmas without a shuffle;
* no sign extension: ``(b << 4) & 0xF0`` and ``b & 0xF0`` are the two signed nibbles times 16,
  exact in int8. The accumulator holds 16 x the product (|16 * 7 * 7 * K| < 2^31 for K < 2.7M)
  and the epilogue multiplies by 1/16, exactly (a power of two): results are bit-equal to the
  int8 GEMM's;
* the next stage's packed tile is loaded and split while the current wgmmas run.

Runs on sm_90 only: Gluon has no CPU interpreter. The tests compare it with the reference on a
GPU (tests/kernels/test_kernels_gpu.py); on CPU the compiler keeps the Triton path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..triton.common import sm_count
from .gluon_common import gelu_tanh, tma_load, tma_store


@dataclass(frozen=True)
class PackedGemmConfig:
    """A launch config: BN weight rows x BM tokens per tile, BKP packed bytes (2 * BKP values) per
    stage, STAGES shared-memory stages, consumer warps (4: one warpgroup, 8: two)."""
    BN: int = 128
    BM: int = 128
    BKP: int = 64
    STAGES: int = 5
    WARPS: int = 8
    GROUP_N: int = 8

    def smem_bytes(self, out_bytes: int = 2) -> int:
        return self.STAGES * (self.BN * self.BKP + 2 * self.BM * self.BKP) + self.BM * self.BN * out_bytes


# The fastest of 6-8 configs at every FLUX.1-dev token-GEMM shape, M = 4608 and M = 512, on an H100: 1.68-1.98x
# cuBLAS bf16 at M = 4608. ops.dispatch takes 256 tokens a tile instead where the last wave allows it.
DEFAULT_CONFIG = PackedGemmConfig()
SMEM_LIMIT = 227 * 1024


@gluon.jit
def _tile_of(tile, num_n, num_m, GROUP_N: gl.constexpr):
    """(pid_n, pid_m) of a tile, in int_gemm._tile_of's order."""
    per_group = GROUP_N * num_m
    first_n = (tile // per_group) * GROUP_N
    size_n = gl.minimum(num_n - first_n, GROUP_N)
    return first_n + ((tile % per_group) % size_n), (tile % per_group) // size_n


@gluon.jit
def _nibbles_times_16(packed):
    """Low and high signed nibbles of each byte, times 16, as int8 (4 bytes per 32-bit register)."""
    lo = gl.inline_asm_elementwise("{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }", "=r,r",
                                   [packed], dtype=gl.int8, is_pure=True, pack=4)
    hi = gl.inline_asm_elementwise("and.b32 $0, $1, 0xF0F0F0F0;", "=r,r", [packed], dtype=gl.int8,
                                   is_pure=True, pack=4)
    return lo, hi


@gluon.jit
def _load_weights(w_descs, starts, row, kp, bar, buf, NUM_W: gl.constexpr):
    """TMA of weight rows [row, row + BN) of the linears' weights stacked along N: w_descs[j] holds
    rows [starts[j - 1], starts[j]), and no tile straddles two (packed_gemm checks)."""
    w0, w1, w2, w3 = w_descs
    n1, n2, n3 = starts
    if NUM_W == 1:
        tma_load(w0, [row, kp], bar, buf)
    elif row < n1:
        tma_load(w0, [row, kp], bar, buf)
    elif NUM_W == 2 or row < n2:
        tma_load(w1, [row - n1, kp], bar, buf)
    elif NUM_W == 3 or row < n3:
        tma_load(w2, [row - n2, kp], bar, buf)
    else:
        tma_load(w3, [row - n3, kp], bar, buf)


@gluon.jit
def _load_partition(w_descs, starts, x_desc, w_bufs, xlo_bufs, xhi_bufs, ready, empty, M, N, K,
                    HALF: gl.constexpr, GROUP_N: gl.constexpr, NUM_PROGRAMS: gl.constexpr, NUM_W: gl.constexpr):
    BN: gl.constexpr = w_bufs.type.shape[1]
    BKP: gl.constexpr = w_bufs.type.shape[2]
    BM: gl.constexpr = x_desc.block_type.shape[0]
    STAGES: gl.constexpr = w_bufs.type.shape[0]
    num_n = gl.cdiv(N, BN)
    num_m = gl.cdiv(M, BM)
    stage_bytes: gl.constexpr = BN * BKP + 2 * x_desc.block_type.nbytes
    i = 0
    for tile in range(gl.program_id(0), num_n * num_m, NUM_PROGRAMS):
        pid_n, pid_m = _tile_of(tile, num_n, num_m, GROUP_N)
        for kp in range(0, K // 2, BKP):
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, stage_bytes)
            kx = (kp // HALF) * (2 * HALF) + kp % HALF
            _load_weights(w_descs, starts, pid_n * BN, kp, bar, w_bufs.index(s), NUM_W)
            tma_load(x_desc, [pid_m * BM, kx], bar, xlo_bufs.index(s))
            tma_load(x_desc, [pid_m * BM, kx + HALF], bar, xhi_bufs.index(s))
            i += 1


@gluon.jit
def _epilogue_operands(pid_n, pid_m, sx_ptr, sw_ptr, bias_ptr, M, N, HAS_BIAS: gl.constexpr, BN: gl.constexpr,
                       BM: gl.constexpr, layout: gl.constexpr):
    """The channel scales, token scales and bias of tile (pid_n, pid_m), in the accumulator's slices. Loaded as the
    tile starts, so that their latency hides under its K loop instead of following its last MMA."""
    rn = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, layout))
    rm = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, layout))
    sw = gl.load(sw_ptr + rn, mask=rn < N, other=0.0)
    sx = gl.load(sx_ptr + rm, mask=rm < M, other=0.0)
    if HAS_BIAS:
        bias = gl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(gl.float32)
    else:
        bias = sw
    return sw, sx, bias


@gluon.jit
def _epilogue(acc, pid_n, pid_m, sw, sx, bias, c_desc, c_smem, gelu_from,
              HAS_BIAS: gl.constexpr, HAS_GELU: gl.constexpr, layout: gl.constexpr):
    """int_gemm._store_scaled's arithmetic, in its order, on a [BN, BM] tile of C^T: acc / 16 (exact)
    x token scale x channel scale (+ bias), GELU (hardware tanh) on channels >= gelu_from; stored
    transposed through shared memory by TMA (which clips the tile at M and N)."""
    BN: gl.constexpr = acc.type.shape[0]
    out = (acc.to(gl.float32) * 0.0625) * sx[None, :] * sw[:, None]
    if HAS_BIAS:
        out += bias[:, None]
    if HAS_GELU:
        if pid_n * BN + BN > gelu_from:
            rn = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, layout))
            out = gl.where((rn >= gelu_from)[:, None], gelu_tanh(out), out)
    store_transposed(out, c_desc, c_smem, pid_m, pid_n)


@gluon.jit
def store_transposed(out, c_desc, c_smem, pid_m, pid_n):
    """Store a [BN, BM] tile of C^T as C's [BM, BN] tile (pid_m, pid_n), through shared memory by TMA (which clips
    the tile at M and N), once the previous tile's store has left c_smem."""
    tma.store_wait(0)
    c_smem.store(gl.permute(out.to(c_desc.dtype), (1, 0)))
    fence_async_shared()
    tma_store(c_desc, [pid_m * out.type.shape[1], pid_n * out.type.shape[0]], c_smem)


@gluon.jit
def barrier_ring(STAGES: gl.constexpr):
    """(ready, empty): one mbarrier each per stage of a ring, initialised for one arrival."""
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    return ready, empty


@gluon.jit
def _issue_stage(w_bufs, xlo_bufs, xhi_bufs, ready, acc, i, use_acc, a_layout: gl.constexpr):
    """Wait for stage i, split its packed weights and issue its two MMAs (asynchronous)."""
    STAGES: gl.constexpr = w_bufs.type.shape[0]
    s = i % STAGES
    mbarrier.wait(ready.index(s), (i // STAGES) & 1)
    lo, hi = _nibbles_times_16(w_bufs.index(s).load(a_layout))
    acc = warpgroup_mma(lo, xlo_bufs.index(s).permute((1, 0)), acc, use_acc=use_acc, is_async=True)
    acc = warpgroup_mma(hi, xhi_bufs.index(s).permute((1, 0)), acc, is_async=True)
    return lo, hi, acc


@gluon.jit
def _keep_alive(x):
    """An empty asm that reads x: x's registers stay allocated up to here, past the wait for the MMA
    that reads them. (warpgroup_mma_wait's deps would say this, but take no 8-bit tensors in Triton 3.6.)"""
    gl.inline_asm_elementwise("// keep $1", "=r,r", [x], dtype=gl.int8, is_pure=False, pack=4)


@gluon.jit
def _mma_partition(w_bufs, xlo_bufs, xhi_bufs, ready, empty, c_desc, c_smem, sx_ptr, sw_ptr, bias_ptr,
                   M, N, K, gelu_from, HAS_BIAS: gl.constexpr, HAS_GELU: gl.constexpr, GROUP_N: gl.constexpr,
                   NUM_PROGRAMS: gl.constexpr, INSTR_N: gl.constexpr, num_warps: gl.constexpr):
    BN: gl.constexpr = w_bufs.type.shape[1]
    BKP: gl.constexpr = w_bufs.type.shape[2]
    BM: gl.constexpr = xlo_bufs.type.shape[1]
    STAGES: gl.constexpr = w_bufs.type.shape[0]
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, INSTR_N, 32])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=4)
    num_n = gl.cdiv(N, BN)
    num_m = gl.cdiv(M, BM)
    num_k = (K // 2) // BKP
    pid = gl.program_id(0)

    acc = gl.zeros([BN, BM], gl.int32, layout=mma_layout)
    i = 0
    for tile in range(pid, num_n * num_m, NUM_PROGRAMS):
        pid_n, pid_m = _tile_of(tile, num_n, num_m, GROUP_N)
        sw, sx, bias = _epilogue_operands(pid_n, pid_m, sx_ptr, sw_ptr, bias_ptr, M, N, HAS_BIAS, BN, BM, mma_layout)
        # Two stages per iteration, so that their A registers are two sets (see _keep_alive): ptxas
        # waits for every MMA in flight before it overwrites an A register one of them reads. No
        # branch inside: ptxas also waits for every MMA at a join of paths that MMAs are in flight on.
        for kk in range(0, num_k, 2):
            a_lo, a_hi, acc = _issue_stage(w_bufs, xlo_bufs, xhi_bufs, ready, acc, i, kk > 0, a_layout)
            acc = warpgroup_mma_wait(2, deps=(acc,))  # the previous iteration's second stage is done
            fence_async_shared()
            mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1, pred=kk > 0)
            b_lo, b_hi, acc = _issue_stage(w_bufs, xlo_bufs, xhi_bufs, ready, acc, i + 1, True, a_layout)
            acc = warpgroup_mma_wait(2, deps=(acc,))  # the first stage is done
            _keep_alive(a_lo)
            _keep_alive(a_hi)
            fence_async_shared()
            mbarrier.arrive(empty.index(i % STAGES), count=1)
            i += 2
        acc = warpgroup_mma_wait(0, deps=(acc,))
        fence_async_shared()
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1)
        _epilogue(acc, pid_n, pid_m, sw, sx, bias, c_desc, c_smem, gelu_from, HAS_BIAS, HAS_GELU, mma_layout)
    tma.store_wait(0)


@gluon.jit
def _packed_gemm_kernel(w0_desc, w1_desc, w2_desc, w3_desc, x_desc, c_desc, sx_ptr, sw_ptr, bias_ptr,
                        M, N, K, n1, n2, n3, gelu_from,
                        HAS_BIAS: gl.constexpr, HAS_GELU: gl.constexpr, HALF: gl.constexpr, NUM_W: gl.constexpr,
                        STAGES: gl.constexpr, GROUP_N: gl.constexpr, NUM_PROGRAMS: gl.constexpr,
                        INSTR_N: gl.constexpr, num_warps: gl.constexpr):
    w_desc = w0_desc
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    xlo_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    xhi_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    c_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
    ready, empty = barrier_ring(STAGES)
    gl.warp_specialize([
        (_mma_partition, (w_bufs, xlo_bufs, xhi_bufs, ready, empty, c_desc, c_smem, sx_ptr, sw_ptr, bias_ptr,
                          M, N, K, gelu_from, HAS_BIAS, HAS_GELU, GROUP_N, NUM_PROGRAMS, INSTR_N, num_warps)),
        (_load_partition, ((w0_desc, w1_desc, w2_desc, w3_desc), (n1, n2, n3), x_desc, w_bufs, xlo_bufs, xhi_bufs,
                           ready, empty, M, N, K, HALF, GROUP_N, NUM_PROGRAMS, NUM_W)),
    ], [1], [40])


_INT8_INSTR_N = (224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 24, 16, 8)


def _instr_n(bm: int, bn: int, warps: int) -> int:
    """The widest int8 wgmma N that divides the tile (Gluon's 05-wgmma tutorial states the rule)."""
    m_reps = triton.cdiv(bn, 16)
    max_n = max(bm // triton.cdiv(warps, m_reps), 8)
    return next(n for n in _INT8_INSTR_N if n <= max_n and bm % n == 0)


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}


MAX_WEIGHTS = 4  # linears per GEMM (FLUX's single blocks fuse Q, K, V and the MLP input)


def supported(qx: torch.Tensor, qws: list[torch.Tensor], group_size: int, out_dtype: torch.dtype,
              config: PackedGemmConfig = DEFAULT_CONFIG) -> str | None:
    """None when packed_gemm can run these operands, else why not."""
    if qx.device.type != "cuda":
        return "not a CUDA tensor"
    if torch.cuda.get_device_capability(qx.device) != (9, 0):
        return "the Gluon wgmma kernel is for sm_90 only"
    if qx.dtype != torch.int8 or any(w.dtype != torch.int8 for w in qws):
        return "operands are not int8"
    if out_dtype not in _GL_DTYPES:
        return f"output dtype {out_dtype}"
    if not 1 <= len(qws) <= MAX_WEIGHTS:
        return f"{len(qws)} weights in one GEMM (at most {MAX_WEIGHTS})"
    if any(w.shape[0] % config.BN for w in qws[:-1]):
        return f"a fused linear's output width is not a multiple of {config.BN}"
    n = sum(w.shape[0] for w in qws)
    if (n * out_dtype.itemsize) % 16 or qx.stride(0) % 16 or qx.data_ptr() % 16:
        return "rows not 16-byte aligned (TMA)"
    if any(not w.is_contiguous() or w.data_ptr() % 16 or w.shape[1] % 16 for w in qws):
        return "weights not contiguous with 16-byte aligned rows (TMA)"
    if (group_size // 2) % config.BKP or (qx.shape[1] // 2) % (2 * config.BKP):
        return f"K = {qx.shape[1]} or group size {group_size} is not a multiple of {4 * config.BKP}"
    return None


def packed_gemm(qx: torch.Tensor, sx: torch.Tensor, qws: list[torch.Tensor], sw: torch.Tensor,
                bias: torch.Tensor | None, group_size: int, out_dtype: torch.dtype, gelu_from: int | None = None,
                config: PackedGemmConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """[M, N] = (qx @ W^T) * sx * sw (+ bias), with W the packed int4 weights ``qws`` ([N_j, K/2] int8 bytes,
    quant.pack_int4's per-group layout) stacked along N, sw and bias [N] likewise; qx int8 [M, K]
    holding int4 values. The same arithmetic and results as int_gemm(..., packed=True) without its
    unpack pass. ``gelu_from`` as in int_gemm (the hardware tanh). Check ``supported`` first."""
    why = supported(qx, qws, group_size, out_dtype, config)
    if why is not None:
        raise ValueError(f"packed_gemm cannot run these operands: {why}; use kernels.triton.int_gemm.int_gemm")
    m, k = qx.shape
    n = sum(w.shape[0] for w in qws)
    if any(w.shape[1] * 2 != k for w in qws) or k % group_size:
        raise ValueError(f"K mismatch: activations [{m}, {k}], packed weights {[tuple(w.shape) for w in qws]}, "
                         f"group {group_size}")
    if sw.shape != (n,) or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"scales and bias must have shape [{n}]")
    if config.smem_bytes(out_dtype.itemsize) > SMEM_LIMIT:
        raise ValueError(f"{config} needs more than {SMEM_LIMIT} bytes of shared memory")
    return packed_gemm_unchecked(qx, sx, qws, sw, bias, group_size, out_dtype, gelu_from, config)


def packed_gemm_unchecked(qx: torch.Tensor, sx: torch.Tensor, qws: list[torch.Tensor], sw: torch.Tensor,
                          bias: torch.Tensor | None, group_size: int, out_dtype: torch.dtype,
                          gelu_from: int | None = None, config: PackedGemmConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """packed_gemm without its checks, for a caller that has validated the operands and found
    ``supported`` None (int_gemm, on every call of a forward)."""
    m, k = qx.shape
    n = sum(w.shape[0] for w in qws)
    c = torch.empty(m, n, dtype=out_dtype, device=qx.device)
    if m == 0 or n == 0:
        return c
    cfg = config
    x_layout = gl.NVMMASharedLayout.get_default_for([cfg.BM, cfg.BKP], gl.int8)
    w_layout = gl.NVMMASharedLayout.get_default_for([cfg.BN, cfg.BKP], gl.int8)
    c_layout = gl.NVMMASharedLayout.get_default_for([cfg.BM, cfg.BN], _GL_DTYPES[out_dtype])
    x_desc = TensorDescriptor.from_tensor(qx, [cfg.BM, cfg.BKP], x_layout)
    w_descs = [TensorDescriptor.from_tensor(w, [cfg.BN, cfg.BKP], w_layout) for w in qws]
    w_descs += [w_descs[0]] * (MAX_WEIGHTS - len(w_descs))
    starts = [sum(w.shape[0] for w in qws[:j + 1]) for j in range(MAX_WEIGHTS - 1)]
    c_desc = TensorDescriptor.from_tensor(c, [cfg.BM, cfg.BN], c_layout)
    programs = min(sm_count(qx.device), triton.cdiv(m, cfg.BM) * triton.cdiv(n, cfg.BN))
    # registers: (WARPS + 4) warps share the file; the consumer takes what the producer warp leaves
    maxnreg = min(256, 65536 // ((cfg.WARPS + 4) * 32)) // 8 * 8
    _packed_gemm_kernel[(programs,)](
        *w_descs, x_desc, c_desc, sx, sw, bias if bias is not None else sw, m, n, k, *starts, gelu_from or 0,
        HAS_BIAS=bias is not None, HAS_GELU=gelu_from is not None, HALF=group_size // 2, NUM_W=len(qws),
        STAGES=cfg.STAGES, GROUP_N=cfg.GROUP_N, NUM_PROGRAMS=programs, INSTR_N=_instr_n(cfg.BM, cfg.BN, cfg.WARPS),
        num_warps=cfg.WARPS, maxnreg=maxnreg)
    return c
