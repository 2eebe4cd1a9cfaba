"""Int4 and int8 weight-only GEMMs (W4A16, W8A16) on tensor cores, for the few-row linears of FLUX (adaLN,
embedders).

The CUDA-core kernels of weight_only.py spend about ten instructions per weight byte, and at
M = 1 3072 -> 18432 they take 25.4 us where a bare read of the packed weights takes 18.3
(H100): the arithmetic's latency, not the memory, is what is left.
Here the weights are mma.m16n8k16's A operand (16 output channels by 16 inputs) and the tokens its
N = 8 columns: per 32-bit word of 8 weights a lane spends three shifts, four LOP3s (nibble to
bf16 by OR-ing it into the mantissa of 128), four bf16x2 FMAs (subtracting the offset, exactly)
and one mma, which also serves up to 8 tokens at once.

The weights are stored in quant.pack_int4_tiles' layout, where each lane's 16 contiguous bytes
are its A fragments for four mma steps, so nothing is exchanged between lanes. The mma runs in
inline PTX inside an element-wise op over a [J, 32, 4] tensor whose blocked layout puts dim 1
on the lanes and dim 2 in one thread's registers: an element-wise op's code is the same for the
32 lanes of a warp, which mma.sync needs (convergence), and its 4 packed elements are exactly a
lane's four words. Dim 0 holds J = U * warps 64-input chunks of the program's 16 channels, each
scaled by its group's scale once (4 mma) and summed after the K loop.

sm_90 only for now (the only GPU this was measured on; mma.sync itself exists from sm_80), and
Gluon has no CPU interpreter: tests compare it with the reference on a GPU.

Int8 weights (quant.pack_int8_tiles: a lane's 32 contiguous bytes are its A fragments for the four steps, one
byte a value stored as value + 128 = 16 h + l) take two mma per step, of their high and low nibbles, from the
same three shifts and four LOP3s per word: the high nibbles OR-ed into the mantissa of 2048 (2048 + 16 h, exact
in bf16) and one FMA subtracting 2304 give 16 h - 256, the low ones 128 + l as above, and the two products sum
to value * x. Per byte of weights that is fewer instructions than the int4 path.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from ...numerics.quant import TILE_K, TILE_ROWS


def _mma_chunk_asm(magic: int, one: int, neg_offset: int, kind: str) -> str:
    """PTX for four mma steps over a lane's 4 weight words ($4..$7) and 4 activation pairs ($8..$11,
    64 bits: two bf16x2 B registers each); outputs $0..$3, the chunk's partial sums from zero."""
    lines = ["{", ".reg .b32 a0, a1, a2, a3, t, b0, b1, one, neg;", ".reg .f32 z;",
             f"mov.b32 one, {one:#x};", f"mov.b32 neg, {neg_offset:#x};", "mov.f32 z, 0f00000000;"]
    for s in range(4):
        w = f"${4 + s}"
        for i in range(4):
            src = w
            if i:
                lines.append(f"shr.b32 t, {w}, {4 * i};")
                src = "t"
            lines.append(f"lop3.b32 a{i}, {src}, 0x000F000F, {magic:#x}, 0xEA;")  # (src & mask) | magic
        lines += [f"fma.rn.{kind}x2 a{i}, a{i}, one, neg;" for i in range(4)]
        lines.append(f"mov.b64 {{b0, b1}}, ${8 + s};")
        acc = "{z, z, z, z}" if s == 0 else "{$0, $1, $2, $3}"
        lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 {{$0, $1, $2, $3}}, "
                     f"{{a0, a1, a2, a3}}, {{b0, b1}}, {acc};")
    lines.append("}")
    return "\n".join(lines)


def _mma8_chunk_asm(lo_magic: int, hi_magic: int, one: int, neg_hi: int, kind: str) -> str:
    """PTX for four mma steps over a lane's 4 weight double words ($4..$7, 8 bytes each, value + 128) and 4
    activation pairs ($8..$11); outputs $0..$3. A register r of a step holds the nibbles at bit 8 (r % 2) of word
    r // 2: low nibbles OR-ed into ``lo_magic``, high ones (4 bits further) into ``hi_magic`` and offset by
    ``neg_hi``, so that high + low = the value."""
    lines = ["{", ".reg .b32 w0, w1, t, l0, l1, l2, l3, h0, h1, h2, h3, b0, b1, one, neg;", ".reg .f32 z;",
             f"mov.b32 one, {one:#x};", f"mov.b32 neg, {neg_hi:#x};", "mov.f32 z, 0f00000000;"]
    for s in range(4):
        lines.append(f"mov.b64 {{w0, w1}}, ${4 + s};")
        for r in range(4):
            w, shift = ("w0", "w1")[r // 2], 8 * (r % 2)
            src = w
            if shift:
                lines.append(f"shr.b32 t, {w}, {shift};")
                src = "t"
            lines.append(f"lop3.b32 l{r}, {src}, 0x000F000F, {lo_magic:#x}, 0xEA;")
            lines.append(f"shr.b32 t, {w}, {shift + 4};")
            lines.append(f"lop3.b32 h{r}, t, 0x000F000F, {hi_magic:#x}, 0xEA;")
        lines += [f"fma.rn.{kind}x2 h{r}, h{r}, one, neg;" for r in range(4)]
        lines.append(f"mov.b64 {{b0, b1}}, ${8 + s};")
        acc = "{z, z, z, z}" if s == 0 else "{$0, $1, $2, $3}"
        lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 {{$0, $1, $2, $3}}, "
                     f"{{h0, h1, h2, h3}}, {{b0, b1}}, {acc};")
        lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 {{$0, $1, $2, $3}}, "
                     "{l0, l1, l2, l3}, {b0, b1}, {$0, $1, $2, $3};")
    lines.append("}")
    return "\n".join(lines)


# bf16: 0x4300 | u is 128 + u, and 128 + (v + 8) - 136 = v exactly; fp16: 1024 + u, minus 1032
_ASM_BF16 = gl.constexpr(_mma_chunk_asm(0x43004300, 0x3F803F80, 0xC308C308, "bf16"))
_ASM_FP16 = gl.constexpr(_mma_chunk_asm(0x64006400, 0x3C003C00, 0xE408E408, "f16"))
_CONSTRAINTS = gl.constexpr("=f,=f,=f,=f,r,r,r,r,l,l,l,l")
# int8, bf16: (2048 + 16h) - 2304 + (128 + l) = 16h + l - 128; fp16: (16384 + 16h) - 17536 + (1024 + l)
_ASM8_BF16 = gl.constexpr(_mma8_chunk_asm(0x43004300, 0x45004500, 0x3F803F80, 0xC510C510, "bf16"))
_ASM8_FP16 = gl.constexpr(_mma8_chunk_asm(0x64006400, 0x74007400, 0x3C003C00, 0xF448F448, "f16"))
_CONSTRAINTS8 = gl.constexpr("=f,=f,=f,=f,l,l,l,l,l,l,l,l")
TILE_ROWS_C = gl.constexpr(TILE_ROWS)


@gluon.jit
def _tiles_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, c_ptr, M, N, KC, stride_xm, stride_sn, stride_cm,
                  CHUNKS_PER_GROUP: gl.constexpr, HAS_BIAS: gl.constexpr, FP16: gl.constexpr, BITS: gl.constexpr,
                  EVEN_KC: gl.constexpr, PREFETCH: gl.constexpr, U: gl.constexpr, num_warps: gl.constexpr):
    """Program (b, m): channels 16b .. 16b + 15, tokens 8m .. 8m + 7. x_ptr: the activations as int64
    (4 values each), stride_xm in those units; w_ptr: the tiles, as int32 words (BITS = 4) or int64 double
    words (BITS = 8): 128 of them a chunk either way."""
    J: gl.constexpr = U * num_warps
    layout: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 32, 1], [num_warps, 1, 1], [2, 1, 0])
    b = gl.program_id(0)
    m0 = gl.program_id(1) * 8
    j = gl.expand_dims(gl.expand_dims(gl.arange(0, J, layout=gl.SliceLayout(1, gl.SliceLayout(2, layout))), 1), 2)
    lane = gl.expand_dims(gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, layout))), 0), 2)
    c = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, layout))), 0), 1)

    w_ptrs = w_ptr + b.to(gl.int64) * KC * 128 + (j * 128 + lane * 4 + c)
    token = m0 + lane // 4
    x_ptrs = x_ptr + token.to(gl.int64) * stride_xm + (j * 16 + (lane % 4) * 4 + c)
    x_mask = token < M
    channel = b * TILE_ROWS_C + lane // 4 + 8 * (c // 2)
    s_ptrs = s_ptr + channel.to(gl.int64) * stride_sn
    s_mask = channel < N
    acc = gl.zeros([J, 32, 4], gl.float32, layout)
    if PREFETCH:
        w_next = gl.load(w_ptrs, mask=j < KC, other=0)
    for k0 in range(0, KC, J):
        chunk = k0 + j
        if PREFETCH:  # the next tile's weights are in flight while this one is decoded
            w = w_next
            w_next = gl.load(w_ptrs + J * 128, mask=chunk + J < KC, other=0)
            xv = gl.load(x_ptrs, mask=x_mask & (chunk < KC), other=0)
            s = gl.load(s_ptrs + chunk // CHUNKS_PER_GROUP, mask=s_mask & (chunk < KC), other=0.0)
        elif EVEN_KC:
            w = gl.load(w_ptrs)
            xv = gl.load(x_ptrs, mask=x_mask, other=0)
            s = gl.load(s_ptrs + chunk // CHUNKS_PER_GROUP, mask=s_mask, other=0.0)
        else:
            in_k = chunk < KC
            w = gl.load(w_ptrs, mask=in_k, other=0)
            xv = gl.load(x_ptrs, mask=x_mask & in_k, other=0)
            s = gl.load(s_ptrs + chunk // CHUNKS_PER_GROUP, mask=s_mask & in_k, other=0.0)
        if BITS == 8:
            if FP16:
                part = gl.inline_asm_elementwise(_ASM8_FP16, _CONSTRAINTS8, [w, xv], dtype=gl.float32, is_pure=True,
                                                 pack=4)
            else:
                part = gl.inline_asm_elementwise(_ASM8_BF16, _CONSTRAINTS8, [w, xv], dtype=gl.float32, is_pure=True,
                                                 pack=4)
        elif FP16:
            part = gl.inline_asm_elementwise(_ASM_FP16, _CONSTRAINTS, [w, xv], dtype=gl.float32, is_pure=True, pack=4)
        else:
            part = gl.inline_asm_elementwise(_ASM_BF16, _CONSTRAINTS, [w, xv], dtype=gl.float32, is_pure=True, pack=4)
        acc += part * s
        w_ptrs += J * 128
        x_ptrs += J * 16

    out = gl.sum(acc, axis=0)  # [32, 4]: lane (g, t) holds channels g, g + 8 and tokens 2t, 2t + 1
    out_layout: gl.constexpr = gl.SliceLayout(0, layout)
    lane2 = gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(1, out_layout)), 1)
    c2 = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, out_layout)), 0)
    channel = b * TILE_ROWS_C + lane2 // 4 + 8 * (c2 // 2)
    token = m0 + (lane2 % 4) * 2 + c2 % 2
    mask = (channel < N) & (token < M)
    if HAS_BIAS:
        out += gl.load(bias_ptr + channel, mask=channel < N, other=0.0).to(gl.float32)
    gl.store(c_ptr + token.to(gl.int64) * stride_cm + channel, out.to(c_ptr.dtype.element_ty), mask=mask)


def launch_config(n: int, m: int, bits: int = 4, kc: int = 48) -> tuple[int, int, bool]:
    """(U, warps, prefetch) for N output channels, M tokens, ``bits``-bit weights and ``kc`` chunks of 64 inputs:
    the fastest or within 6% of it at every FLUX.1-dev shape of a sweep of 18 (H100). 16 channels per
    program: from about 1024 programs every one is resident at once and a smaller tile per step wins at M = 1.
    Int8 at 3072 -> 18432 takes 32.5 us, 93% of the speed of a plain Triton read of its 56.6 MB (30.2 us at
    best, 1874 GB/s): loads into registers are what bound both."""
    if bits == 8:
        if n >= 16384:
            return 1, 4, False
        if n >= 8192:
            return (2, 4, False) if m == 1 else (4, 4, False)
        return (4, 4, True) if kc >= 48 else (2, 4, False)
    if n >= 16384:
        return (2, 4, False) if m == 1 else (4, 2, True)
    return 4, 4, True


_TILE_DTYPES = {4: torch.int32, 8: torch.int64}


def unsupported_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the tile kernels can take activations of this dtype on this device, else why not."""
    if device.type != "cuda":
        return "not a CUDA tensor"
    if torch.cuda.get_device_capability(device) != (9, 0):
        return "the tensor-core weight-only kernels are for sm_90 only"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"activations are {dtype}, not bf16 or fp16 (the mma's operand type)"
    return None


def supported(x: torch.Tensor) -> str | None:
    """None when the tile kernels can take these activations, else why not."""
    return unsupported_reason(x.device, x.dtype)


def w4a16_gemm_tiles(x: torch.Tensor, tiles: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     group_size: int, *, config: tuple[int, int, bool] | None = None) -> torch.Tensor:
    """[M, N] = x @ dequant(W)^T (+ bias), W in quant.pack_int4_tiles' layout ([ceil(N/16), K'/64, 32, 4]
    int32) with float32 scales [N, K'/group_size]; x bf16 or fp16 [M, K], K <= K'. Any M (8 tokens per
    program: each 8 more re-read the weights). ``config``: (U, warps, prefetch), default ``launch_config``."""
    return _tiles_gemm(x, tiles, scale, bias, group_size, 4, config)


def w8a16_gemm_tiles(x: torch.Tensor, tiles: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     group_size: int, *, config: tuple[int, int, bool] | None = None) -> torch.Tensor:
    """``w4a16_gemm_tiles`` for int8 weights in quant.pack_int8_tiles' layout ([ceil(N/16), K'/64, 32, 4]
    int64)."""
    return _tiles_gemm(x, tiles, scale, bias, group_size, 8, config)


def _tiles_gemm(x: torch.Tensor, tiles: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                group_size: int, bits: int, config: tuple[int, int, bool] | None) -> torch.Tensor:
    name = f"w{bits}a16_gemm_tiles"
    reason = supported(x)
    if reason is not None:
        raise ValueError(f"{name} cannot run: {reason}; use kernels.triton.weight_only.w{bits}a16_gemm with "
                         "weights in the groups layout instead")
    dtype = _TILE_DTYPES[bits]
    if x.dim() != 2 or tiles.dim() != 4 or tuple(tiles.shape[2:]) != (32, 4) or tiles.dtype != dtype:
        raise ValueError(f"expected x [M, K] and {dtype} tiles [N/16, K'/64, 32, 4], got {tuple(x.shape)} and "
                         f"{tiles.dtype} {tuple(tiles.shape)}")
    if not tiles.is_contiguous() or tiles.device != x.device:
        raise ValueError("tiles must be contiguous and on the activations' device")
    m, k = x.shape
    nb, kc = tiles.shape[:2]
    n = scale.shape[0]
    kp = kc * TILE_K
    if group_size % TILE_K or kp % group_size:
        raise ValueError(f"group_size must be a multiple of {TILE_K} dividing the padded width {kp}, got {group_size}")
    if scale.dtype != torch.float32 or scale.dim() != 2 or scale.shape[1] != kp // group_size or scale.stride(1) != 1:
        raise ValueError(f"scale must be float32 [N, {kp // group_size}] with contiguous rows, got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    if not (nb - 1) * TILE_ROWS < n <= nb * TILE_ROWS:
        raise ValueError(f"{nb} tiles of {TILE_ROWS} channels do not hold the {n} channels of scale")
    if k > kp:
        raise ValueError(f"x has {k} inputs, the weights {kp}")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous [{n}], got {tuple(bias.shape)}")
    c = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return c
    if k != kp or x.stride(1) != 1 or x.stride(0) % 4 or x.data_ptr() % 8:
        x = torch.nn.functional.pad(x, (0, kp - k)).contiguous()
    u, num_warps, prefetch = config or launch_config(n, m, bits, kc)
    grid = (nb, triton.cdiv(m, 8))
    _tiles_kernel[grid](x.view(torch.int64), tiles, scale, bias if bias is not None else scale, c, m, n, kc,
                        x.stride(0) // 4, scale.stride(0), c.stride(0), CHUNKS_PER_GROUP=group_size // TILE_K,
                        HAS_BIAS=bias is not None, FP16=x.dtype == torch.float16, BITS=bits,
                        EVEN_KC=kc % (u * num_warps) == 0, PREFETCH=prefetch, U=u, num_warps=num_warps)
    return c
