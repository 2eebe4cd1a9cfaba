"""Ping-pong form of the packed W4A4 GEMM (experiment, not in the package): two consumer warpgroups each own whole
128 x 128 tiles, alternate tiles of the program's sequence, and share the loader's stage ring, so one's epilogue
runs while the other's MMAs do. Same arithmetic as kernels/sm90/packed_gemm.py (bit-equal results expected)."""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..triton.common import sm_count
from . import packed_gemm as pg


@gluon.jit
def _pp_mma_partition(w_bufs, xlo_bufs, xhi_bufs, ready, empty, turn, c_desc, c_smem, sx_ptr, sw_ptrs, bias_ptrs,
                      starts, M, N, K, gelu_from, CONSUMER: gl.constexpr, HAS_BIAS: gl.constexpr,
                      HAS_GELU: gl.constexpr, NUM_W: gl.constexpr,
                      GROUP_N: gl.constexpr, NUM_PROGRAMS: gl.constexpr, INSTR_N: gl.constexpr,
                      WARPS: gl.constexpr):
    BN: gl.constexpr = w_bufs.type.shape[1]
    BKP: gl.constexpr = w_bufs.type.shape[2]
    BM: gl.constexpr = xlo_bufs.type.shape[1]
    STAGES: gl.constexpr = w_bufs.type.shape[0]
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                         instr_shape=[16, INSTR_N, 32])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=4)
    num_n = gl.cdiv(N, BN)
    num_m = gl.cdiv(M, BM)
    num_k = (K // 2) // BKP
    pid = gl.program_id(0)
    acc = gl.zeros([BN, BM], gl.int32, layout=mma_layout)
    j = CONSUMER  # this consumer's place in the program's tile sequence: every other tile
    waits = CONSUMER - 1  # turns waited for so far: consumer 0 starts without one
    for tile in range(pid + CONSUMER * NUM_PROGRAMS, num_n * num_m, 2 * NUM_PROGRAMS):
        pid_n, pid_m = pg._tile_of(tile, num_n, num_m, GROUP_N)
        i = j * num_k  # the ring position of the tile's first stage: the loader fills tiles in sequence
        # The other consumer has issued all of its previous tile's MMAs and released its stages: this tile's
        # first stage is within one phase of the ring (a parity wait further ahead would pass on an old phase),
        # and the two mainloops alternate while each epilogue overlaps the other's MMAs.
        mbarrier.wait(turn.index(CONSUMER), waits & 1, pred=waits >= 0)
        waits += 1
        for kk in range(0, num_k, 2):
            a_lo, a_hi, acc = pg._issue_stage(w_bufs, xlo_bufs, xhi_bufs, ready, acc, i, kk > 0, a_layout)
            acc = warpgroup_mma_wait(2, deps=(acc,))
            fence_async_shared()
            mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1, pred=kk > 0)
            b_lo, b_hi, acc = pg._issue_stage(w_bufs, xlo_bufs, xhi_bufs, ready, acc, i + 1, True, a_layout)
            acc = warpgroup_mma_wait(2, deps=(acc,))
            pg._keep_alive(a_lo)
            pg._keep_alive(a_hi)
            fence_async_shared()
            mbarrier.arrive(empty.index(i % STAGES), count=1)
            i += 2
        acc = warpgroup_mma_wait(0, deps=(acc,))
        fence_async_shared()
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1)
        mbarrier.arrive(turn.index(1 - CONSUMER), count=1)  # the other consumer's turn
        sw, sx, bias = pg._epilogue_operands(pid_n, pid_m, sx_ptr, sw_ptrs, bias_ptrs, starts, M, N, HAS_BIAS,
                                             NUM_W, BN, BM, mma_layout)
        pg._epilogue(acc, pid_n, pid_m, sw, sx, bias, c_desc, c_smem, gelu_from, HAS_BIAS, HAS_GELU, mma_layout)
        j += 2
    tma.store_wait(0)


@gluon.jit
def _pp_gemm_kernel(w0_desc, w1_desc, w2_desc, w3_desc, x_desc, c_desc, sx_ptr, sw0, sw1, sw2, sw3, b0, b1, b2, b3,
                    M, N, K, n1, n2, n3, gelu_from,
                    HAS_BIAS: gl.constexpr, HAS_GELU: gl.constexpr, HALF: gl.constexpr, NUM_W: gl.constexpr,
                    STAGES: gl.constexpr, GROUP_N: gl.constexpr, NUM_PROGRAMS: gl.constexpr,
                    INSTR_N: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    w_desc = w0_desc
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    xlo_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    xhi_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    c0 = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
    c1 = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
    ready, empty = pg.barrier_ring(STAGES)
    turn, _unused = pg.barrier_ring(2)  # turn[c]: consumer c may start its next mainloop
    gl.warp_specialize([
        (_pp_mma_partition, (w_bufs, xlo_bufs, xhi_bufs, ready, empty, turn, c_desc, c0, sx_ptr, (sw0, sw1, sw2, sw3),
                             (b0, b1, b2, b3), (n1, n2, n3), M, N, K, gelu_from, 0, HAS_BIAS, HAS_GELU, NUM_W, GROUP_N,
                             NUM_PROGRAMS, INSTR_N, num_warps)),
        (_pp_mma_partition, (w_bufs, xlo_bufs, xhi_bufs, ready, empty, turn, c_desc, c1, sx_ptr, (sw0, sw1, sw2, sw3),
                             (b0, b1, b2, b3), (n1, n2, n3), M, N, K, gelu_from, 1, HAS_BIAS, HAS_GELU, NUM_W, GROUP_N,
                             NUM_PROGRAMS, INSTR_N, num_warps)),
        (pg._load_partition, ((w0_desc, w1_desc, w2_desc, w3_desc), (n1, n2, n3), x_desc, w_bufs, xlo_bufs,
                              xhi_bufs, ready, empty, M, N, K, HALF, GROUP_N, NUM_PROGRAMS, NUM_W)),
    ], [num_warps, 1], [CONSUMER_REGS, 40])


def pingpong_gemm(qx, sx, qws, sws, biases, group_size, out_dtype, gelu_from=None, BN=128, BM=128, BKP=64, STAGES=5,
                  consumer_regs=232, programs=None):
    m, k = qx.shape
    n = sum(w.shape[0] for w in qws)
    c = torch.empty(m, n, dtype=out_dtype, device=qx.device)
    x_layout = gl.NVMMASharedLayout.get_default_for([BM, BKP], gl.int8)
    w_layout = gl.NVMMASharedLayout.get_default_for([BN, BKP], gl.int8)
    c_layout = gl.NVMMASharedLayout.get_default_for([BM, BN], pg._GL_DTYPES[out_dtype])
    x_desc = TensorDescriptor.from_tensor(qx, [BM, BKP], x_layout)
    w_descs = [TensorDescriptor.from_tensor(w, [BN, BKP], w_layout) for w in qws]
    w_descs += [w_descs[0]] * (pg.MAX_WEIGHTS - len(w_descs))
    starts = [sum(w.shape[0] for w in qws[:j + 1]) for j in range(pg.MAX_WEIGHTS - 1)]
    pad = pg.MAX_WEIGHTS - len(qws)
    scales = list(sws) + [sws[0]] * pad
    bias_vectors = pg._bias_vectors(biases, [w.shape[0] for w in qws])
    bias_ptrs = (bias_vectors + [bias_vectors[0]] * pad) if bias_vectors is not None else scales
    c_desc = TensorDescriptor.from_tensor(c, [BM, BN], c_layout)
    programs = programs or min(sm_count(qx.device), triton.cdiv(m, BM) * triton.cdiv(n, BN))
    _pp_gemm_kernel[(programs,)](
        *w_descs, x_desc, c_desc, sx, *scales, *bias_ptrs, m, n, k, *starts, gelu_from or 0,
        HAS_BIAS=bias_vectors is not None, HAS_GELU=gelu_from is not None, HALF=group_size // 2, NUM_W=len(qws),
        STAGES=STAGES, GROUP_N=8, NUM_PROGRAMS=programs, INSTR_N=pg._instr_n(BM, BN, 4), CONSUMER_REGS=consumer_regs,
        num_warps=4, maxnreg=168)
    return c
