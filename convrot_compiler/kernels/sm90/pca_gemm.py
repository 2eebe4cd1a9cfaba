"""DiRotQ's GEMM for Hopper in Gluon: the 16-bit subspace and the group-scaled int4 rest in one kernel.

    C = z_hi W_hi^T + sum_g s_x[:, g] s_w[:, g] (q_x,g q_w,g^T) (+ b)        (numerics.pca.pca_matmul)

It is packed_gemm's kernel (C^T = W X^T, the packed weights split in registers as wgmma's A operand, a one-warp
TMA producer feeding a ring of stages) with two changes:

* a stage is two quantization groups, G packed bytes: the weights are packed per pair of groups
  (numerics.pca.int4_pack), so the low nibbles are one group's whole A operand and the high ones the next's.
  Each group's int8 wgmma goes into an int32 accumulator of its own, which is then scaled by the group's token
  and channel scales into the float32 one while the other group's MMA runs. That accumulator starts at the bits
  of 1.5 * 2^23, so the MMA leaves a float whose mantissa holds the product (|16 * 7 * 7 * G| is far below
  2^22) and one float subtract converts it, not the conversion instruction. The scales are read group-major
  (transposed per call, a few us);
* before the groups, the 16-bit subspace runs through a second ring of stages as bf16/fp16 wgmmas from shared
  memory straight into the float32 accumulator.

Scaling a group costs about four operations per output element (the accumulator's initial value, the subtract,
two multiplies) where its MMAs cost G / 4096 cycles per element on an SM (4096 int8 MACs a cycle, 128 float32
lanes): at G = 64 the scaling alone takes about twice the MMAs' time, a bound of the method's group-64 scales
on Hopper for any kernel that scales each group in float32 (packed_gemm scales once per tile).

Measured (H100, M = 4608, `benchmarks/results/dirotq.md`): 266 us at 3072 -> 3072, 3.8x ConvRot's GEMM, where
stages of one group (32 packed bytes) took 330; that bound would allow about 100 us (docs/PERFORMANCE.md: the
breakdown, and the schedules tried).

sm_90 only, like packed_gemm: tests compare it with the reference on a GPU.
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

from ...numerics.pca import int4_pack
from ..triton.common import sm_count
from ..triton.pca import check_gemm_operands
from .gluon_common import tma_load
from .packed_gemm import (
    _GL_DTYPES,
    SMEM_LIMIT,
    _instr_n,
    _keep_alive,
    _nibbles_times_16,
    _tile_of,
    barrier_ring,
    store_transposed,
)


@dataclass(frozen=True)
class PcaGemmConfig:
    """BN output channels x BM tokens per tile; STAGES group stages, HSTAGES stages of BKH 16-bit inputs;
    consumer warps (4: one warpgroup, 8: two)."""
    BN: int = 128
    BM: int = 64
    BKH: int = 64
    STAGES: int = 4
    HSTAGES: int = 2
    WARPS: int = 8
    GROUP_N: int = 8

    def smem_bytes(self, group_size: int, out_bytes: int = 2) -> int:
        return (self.STAGES * (self.BN + 2 * self.BM) * group_size + self.HSTAGES * (self.BN + self.BM) * self.BKH * 2
                + self.BM * self.BN * out_bytes)


DEFAULT_CONFIG = PcaGemmConfig()
_MAGIC = gl.constexpr(0x4B400000)  # the bits of 1.5 * 2^23
_MAGIC_F = gl.constexpr(12582912.0)


@gluon.jit
def _load_partition(w_desc, x_desc, whi_desc, zhi_desc, w_bufs, xlo_bufs, xhi_bufs, whi_bufs, zhi_bufs,
                    ready, empty, hready, hempty, M, N, L, R,
                    HALF: gl.constexpr, GROUP_N: gl.constexpr, NUM_PROGRAMS: gl.constexpr):
    BN: gl.constexpr = w_bufs.type.shape[1]
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BKH: gl.constexpr = zhi_desc.block_type.shape[1]
    STAGES: gl.constexpr = w_bufs.type.shape[0]
    HSTAGES: gl.constexpr = whi_bufs.type.shape[0]
    stage_bytes: gl.constexpr = w_desc.block_type.nbytes + 2 * x_desc.block_type.nbytes
    hstage_bytes: gl.constexpr = whi_desc.block_type.nbytes + zhi_desc.block_type.nbytes
    num_n = gl.cdiv(N, BN)
    num_m = gl.cdiv(M, BM)
    i = 0
    h = 0
    for tile in range(gl.program_id(0), num_n * num_m, NUM_PROGRAMS):
        pid_n, pid_m = _tile_of(tile, num_n, num_m, GROUP_N)
        for k in range(0, R, BKH):
            s = h % HSTAGES
            mbarrier.wait(hempty.index(s), ((h // HSTAGES) & 1) ^ 1)
            bar = hready.index(s)
            mbarrier.expect(bar, hstage_bytes)
            tma_load(whi_desc, [pid_n * BN, k], bar, whi_bufs.index(s))
            tma_load(zhi_desc, [pid_m * BM, k], bar, zhi_bufs.index(s))
            h += 1
        for kp in range(0, L // 2, HALF):
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, stage_bytes)
            tma_load(w_desc, [pid_n * BN, kp], bar, w_bufs.index(s))
            tma_load(x_desc, [pid_m * BM, 2 * kp], bar, xlo_bufs.index(s))
            tma_load(x_desc, [pid_m * BM, 2 * kp + HALF], bar, xhi_bufs.index(s))
            i += 1


@gluon.jit
def _group_scales(scales, g):
    """Group g's channel scales (divided by 16: the split nibbles are 16 x the values) and token scales.
    ``scales``: the tile's channel and token scale pointers into the group-major scales ([groups, N] and
    [groups, M]), their masks, N and M."""
    sw_ptrs, sx_ptrs, n_mask, m_mask, N, M = scales
    sw = gl.load(sw_ptrs + g * N, mask=n_mask, other=0.0) * 0.0625
    sx = gl.load(sx_ptrs + g * M, mask=m_mask, other=0.0)
    return sw, sx


@gluon.jit
def _mma_partition(w_bufs, xlo_bufs, xhi_bufs, whi_bufs, zhi_bufs, ready, empty, hready, hempty, c_desc, c_smem,
                   sx_ptr, sw_ptr, bias_ptr, M, N, L, R, HAS_BIAS: gl.constexpr, GROUP_N: gl.constexpr,
                   NUM_PROGRAMS: gl.constexpr, INSTR_N: gl.constexpr, num_warps: gl.constexpr):
    BN: gl.constexpr = w_bufs.type.shape[1]
    HALF: gl.constexpr = w_bufs.type.shape[2]
    BM: gl.constexpr = xlo_bufs.type.shape[1]
    BKH: gl.constexpr = zhi_bufs.type.shape[2]
    STAGES: gl.constexpr = w_bufs.type.shape[0]
    HSTAGES: gl.constexpr = whi_bufs.type.shape[0]
    i_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, INSTR_N, 32])
    f_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, INSTR_N, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=i_layout, k_width=4)
    num_n = gl.cdiv(N, BN)
    num_m = gl.cdiv(M, BM)
    groups = L // HALF
    i = 0
    h = 0
    for tile in range(gl.program_id(0), num_n * num_m, NUM_PROGRAMS):
        pid_n, pid_m = _tile_of(tile, num_n, num_m, GROUP_N)
        rn = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, i_layout))
        rm = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, i_layout))
        n_mask = rn < N
        scales = (sw_ptr + rn, sx_ptr + rm, n_mask, rm < M, N, M)
        hi_acc = gl.zeros([BN, BM], gl.float32, layout=f_layout)
        for k in range(0, R, BKH):
            s = h % HSTAGES
            mbarrier.wait(hready.index(s), (h // HSTAGES) & 1)
            hi_acc = warpgroup_mma(whi_bufs.index(s), zhi_bufs.index(s).permute((1, 0)), hi_acc, is_async=True)
            hi_acc = warpgroup_mma_wait(0, deps=(hi_acc,))
            mbarrier.arrive(hempty.index(s), count=1)
            h += 1
        acc = gl.convert_layout(hi_acc, i_layout)
        for p in range(0, groups // 2):
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            lo, hi = _nibbles_times_16(w_bufs.index(s).load(a_layout))
            # each accumulator starts at the bits of 1.5 * 2^23: the MMA leaves 1.5 * 2^23 + the product in its
            # mantissa, and a float subtract converts it
            pa = gl.full([BN, BM], _MAGIC, gl.int32, layout=i_layout)
            pa = warpgroup_mma(lo, xlo_bufs.index(s).permute((1, 0)), pa, is_async=True)
            pb = gl.full([BN, BM], _MAGIC, gl.int32, layout=i_layout)
            pb = warpgroup_mma(hi, xhi_bufs.index(s).permute((1, 0)), pb, is_async=True)
            swa, sxa = _group_scales(scales, 2 * p)
            swb, sxb = _group_scales(scales, 2 * p + 1)
            pa = warpgroup_mma_wait(1, deps=(pa,))
            acc += ((pa.to(gl.float32, bitcast=True) - _MAGIC_F) * swa[:, None]) * sxa[None, :]
            pb = warpgroup_mma_wait(0, deps=(pb,))
            _keep_alive(lo)
            _keep_alive(hi)
            fence_async_shared()
            mbarrier.arrive(empty.index(s), count=1)
            acc += ((pb.to(gl.float32, bitcast=True) - _MAGIC_F) * swb[:, None]) * sxb[None, :]
            i += 1
        if HAS_BIAS:
            acc += gl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(gl.float32)[:, None]
        store_transposed(acc, c_desc, c_smem, pid_m, pid_n)
    tma.store_wait(0)


@gluon.jit
def _pca_gemm_kernel(w_desc, x_desc, whi_desc, zhi_desc, c_desc, sx_ptr, sw_ptr, bias_ptr, M, N, L, R,
                     HAS_BIAS: gl.constexpr, HALF: gl.constexpr, STAGES: gl.constexpr, HSTAGES: gl.constexpr,
                     GROUP_N: gl.constexpr, NUM_PROGRAMS: gl.constexpr, INSTR_N: gl.constexpr,
                     num_warps: gl.constexpr):
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    xlo_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    xhi_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    whi_bufs = gl.allocate_shared_memory(whi_desc.dtype, [HSTAGES] + whi_desc.block_type.shape, whi_desc.layout)
    zhi_bufs = gl.allocate_shared_memory(zhi_desc.dtype, [HSTAGES] + zhi_desc.block_type.shape, zhi_desc.layout)
    c_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
    ready, empty = barrier_ring(STAGES)
    hready, hempty = barrier_ring(HSTAGES)
    gl.warp_specialize([
        (_mma_partition, (w_bufs, xlo_bufs, xhi_bufs, whi_bufs, zhi_bufs, ready, empty, hready, hempty, c_desc,
                          c_smem, sx_ptr, sw_ptr, bias_ptr, M, N, L, R, HAS_BIAS, GROUP_N, NUM_PROGRAMS, INSTR_N,
                          num_warps)),
        (_load_partition, (w_desc, x_desc, whi_desc, zhi_desc, w_bufs, xlo_bufs, xhi_bufs, whi_bufs, zhi_bufs,
                           ready, empty, hready, hempty, M, N, L, R, HALF, GROUP_N, NUM_PROGRAMS)),
    ], [1], [40])


def _aligned(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def supported(z_hi: torch.Tensor, q: torch.Tensor, w_hi: torch.Tensor, qw: torch.Tensor, group_size: int,
              config: PcaGemmConfig = DEFAULT_CONFIG) -> str | None:
    """None when pca_gemm can run these operands, else why not."""
    if q.device.type != "cuda":
        return "not a CUDA tensor"
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return "the Gluon wgmma kernel is for sm_90 only"
    if z_hi.dtype not in (torch.bfloat16, torch.float16) or w_hi.dtype != z_hi.dtype:
        return f"the 16-bit subspace is {z_hi.dtype} x {w_hi.dtype}, not bf16 or fp16"
    if q.dtype != torch.int8 or qw.dtype != torch.int8:
        return "the quantized operands are not int8"
    if group_size != 64:
        return f"group size {group_size} (this kernel takes DiRotQ's 64, the only size tested on a GPU)"
    if q.shape[1] == 0:
        return "no quantized inputs"
    if int4_pack(q.shape[1], group_size) != 2 * group_size:
        return (f"{q.shape[1] // group_size} groups do not pair up (the weights are packed per group, not per pair "
                "of groups: numerics.pca.int4_pack)")
    if z_hi.shape[1] % config.BKH:
        return f"16-bit width {z_hi.shape[1]} is not a multiple of {config.BKH}"
    if w_hi.shape[0] % 8:
        return "output width not a multiple of 8 (TMA rows of the output)"
    if not all(_aligned(t) for t in (q, qw)) or (z_hi.shape[1] and not all(_aligned(t) for t in (z_hi, w_hi))):
        return "operands not contiguous with 16-byte aligned rows (TMA)"
    if config.smem_bytes(group_size) > SMEM_LIMIT:
        return f"{config} needs more than {SMEM_LIMIT} bytes of shared memory"
    return None


def pca_gemm(z_hi: torch.Tensor, q: torch.Tensor, sa: torch.Tensor, w_hi: torch.Tensor, qw: torch.Tensor,
             sw: torch.Tensor, bias: torch.Tensor | None, group_size: int,
             config: PcaGemmConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """numerics.pca.pca_matmul on sm_90: z_hi [M, R] and w_hi [N, R] in 16 bits, q [M, L] int8 in [-7, 7] with
    float32 scales sa [M, L/G], qw [N, L/2] (quant.pack_int4 per pair of groups, numerics.pca.int4_pack) with
    sw [N, L/G]; [M, N] in z_hi's
    dtype. Check ``supported`` first (kernels.triton.pca.pca_gemm takes anything)."""
    why = supported(z_hi, q, w_hi, qw, group_size, config)
    if why is not None:
        raise ValueError(f"sm90 pca_gemm cannot run these operands: {why}; use kernels.triton.pca.pca_gemm")
    return pca_gemm_unchecked(z_hi, q, sa, w_hi, qw, sw, bias, group_size, config)


def pca_gemm_unchecked(z_hi: torch.Tensor, q: torch.Tensor, sa: torch.Tensor, w_hi: torch.Tensor, qw: torch.Tensor,
                       sw: torch.Tensor, bias: torch.Tensor | None, group_size: int,
                       config: PcaGemmConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """pca_gemm without ``supported``, for a caller that found it None (ops.dispatch, on every call); the operands'
    shapes, dtypes and bias are still checked."""
    check_gemm_operands(z_hi, q, sa, w_hi, qw, sw, bias, group_size)
    m, lo = q.shape
    n, r = w_hi.shape
    c = torch.empty(m, n, dtype=z_hi.dtype, device=q.device)
    if m == 0 or n == 0:
        return c
    cfg = config
    half = group_size  # a stage: two groups, G packed bytes
    dt = _GL_DTYPES[z_hi.dtype]
    x_desc = TensorDescriptor.from_tensor(q, [cfg.BM, half], gl.NVMMASharedLayout.get_default_for([cfg.BM, half],
                                                                                                   gl.int8))
    w_desc = TensorDescriptor.from_tensor(qw, [cfg.BN, half], gl.NVMMASharedLayout.get_default_for([cfg.BN, half],
                                                                                                    gl.int8))
    if r == 0:  # no 16-bit subspace: descriptors of a placeholder the kernel never reads
        z_hi = torch.zeros(cfg.BM, cfg.BKH, dtype=c.dtype, device=c.device)
        w_hi = torch.zeros(cfg.BN, cfg.BKH, dtype=c.dtype, device=c.device)
    zhi_desc = TensorDescriptor.from_tensor(z_hi, [cfg.BM, cfg.BKH],
                                            gl.NVMMASharedLayout.get_default_for([cfg.BM, cfg.BKH], dt))
    whi_desc = TensorDescriptor.from_tensor(w_hi, [cfg.BN, cfg.BKH],
                                            gl.NVMMASharedLayout.get_default_for([cfg.BN, cfg.BKH], dt))
    c_desc = TensorDescriptor.from_tensor(c, [cfg.BM, cfg.BN], gl.NVMMASharedLayout.get_default_for([cfg.BM, cfg.BN],
                                                                                                    dt))
    programs = min(sm_count(q.device), triton.cdiv(m, cfg.BM) * triton.cdiv(n, cfg.BN))
    maxnreg = min(256, 65536 // ((cfg.WARPS + 4) * 32)) // 8 * 8
    # the scales with the tokens (channels) of one group side by side: a group's loads are contiguous
    sa_by_group, sw_by_group = sa.t().contiguous(), sw.t().contiguous()
    _pca_gemm_kernel[(programs,)](
        w_desc, x_desc, whi_desc, zhi_desc, c_desc, sa_by_group, sw_by_group, bias if bias is not None else sw, m, n,
        lo, r, HAS_BIAS=bias is not None, HALF=half, STAGES=cfg.STAGES, HSTAGES=cfg.HSTAGES, GROUP_N=cfg.GROUP_N,
        NUM_PROGRAMS=programs, INSTR_N=_instr_n(cfg.BM, cfg.BN, cfg.WARPS), num_warps=cfg.WARPS, maxnreg=maxnreg)
    return c
