"""Which kernel runs each convrot op: decided here, and nowhere else.

When a weight is prepared: how GPTQ runs (``gptq_options``), the channel order of W4A4/W8A8 activations and
weights (``act_order_for``), the packed layout of weight-only weights (``weight_only_layout``), and whether
the fused kernels take a weight at all (``has_kernel``). When an op runs on CUDA (the CUDA implementations in
custom_ops.py): ``rotate_quantize`` (the sm_90 Gluon kernel where it takes the activations, else Triton's),
``int_gemm`` (the sm_90 packed GEMM, else Triton's int8 GEMM on unpacked weights, one program per tile or
persistent as ``gemm_schedule`` says; a fused GEMM's scales and biases joined once, ``joined_vectors``),
``weight_only_gemm`` (by the bits and the layout the weight was prepared in), ``fp8_attention`` (cuDNN's) and
``rms_rope`` (Triton's; 16-bit or e4m3). Every choice computes the same values; only the speed differs. A benchmark that
compares kernels in one process replaces ``use_sm90_rotate``, ``use_sm90_packed_gemm``, ``gemm_schedule`` or
``joined_vectors`` for its duration (tools/bench_model.py, ``kernel_choice``).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable

import torch
import triton

from ..kernels.triton.common import interpreting
from ..numerics.adaln import adaln_rows_reference
from ..numerics.pca import PCAWeight
from ..numerics.quant import TILE_K, QuantizedWeight, concat_biases, packed_layout
from ..numerics.rotations import GroupHadamardRotation
from .joined_vectors import JoinedVectors

# When Triton's persistent GEMM pays, measured on an H100:
# * warp-specialized (no GELU epilogue): wherever the output has at least two 128 x 128 tiles per SM
#   (M = 512 with N >= 9216: 1.14-1.34x cuBLAS bf16 against 0.89-1.18x one program per tile; every FLUX shape
#   from M = 2048); it loses below that (M = 512 and 1024 at 3072 -> 3072: 1.11-1.15x against 1.23-1.24x);
# * not specialized (GELU epilogue): from M = 2048, or from M = 1024 on wide outputs (N >= 12288).
#   Warp-specialized, a GELU epilogue ran 1.27-1.36x slower than this form (the consumer warps compute the
#   epilogue with no MMAs to hide it behind).
PERSISTENT_TILE, PERSISTENT_MIN_WAVES = 128, 2
PERSISTENT_MIN_M = 2048
PERSISTENT_WIDE_MIN_M, PERSISTENT_WIDE_N = 1024, 12288

# The sm_90 packed GEMM's tile is 128 weight rows by 128 tokens, or by 256 tokens in 4 stages where that fills the
# SMs' last wave as well. Measured on an H100 against 128 (CUDA-graph replays, results bit-equal): image QKV at
# 4096 tokens (3072 -> 9216) 167.2 -> 158.5 us, ff down (12288 -> 3072) 207.7 -> 196.4, to_out 59.1 -> 58.7; it
# loses where its last wave is emptier (single blocks' proj_out at 4608 tokens 284.2 -> 305.6, the text stream's
# QKV at 512 33.4 -> 42.0) and with a GELU epilogue (single blocks' QKV+MLP 451.3 -> 552.0).
PACKED_TILE = 128  # kernels/sm90/packed_gemm.py's DEFAULT_CONFIG: weight rows and tokens (imported where Gluon runs)
PACKED_WIDE_TOKENS = {"BM": 256, "STAGES": 4}


def act_order_for(device: torch.device, dtype: torch.dtype, group_size: int, rotated: bool) -> str:
    """The channel order W4A4/W8A8 activations are quantized in, and their weights prepared in, for where a
    linear runs: ``"mma"`` (quant.mma_channel_order) where the sm_90 rotate+quantize kernel can take them
    (a CUDA sm_90 device, bf16 activations, rotated groups of 256), whose stores it makes whole; else
    ``"natural"``. Either is correct on every path (the Triton kernel and the reference write both): the
    choice only decides speed, so a call that falls back to another kernel at run time stays exact."""
    if not rotated or group_size != 256 or device.type != "cuda" or dtype != torch.bfloat16:
        return "natural"
    return "mma" if torch.cuda.get_device_capability(device) == (9, 0) else "natural"


def gptq_options(device: torch.device) -> dict:
    """How GPTQ runs where a weight is prepared (``dtype`` and ``solver`` of numerics.gptq.gptq_quantize): on
    CUDA in float32 with the column loop in one Triton kernel per block (kernels/triton/gptq.py; about ten torch
    launches per input channel otherwise); elsewhere the reference, in float64."""
    if device.type == "cuda":
        from ..kernels.triton.gptq import gptq_columns

        return {"dtype": torch.float32, "solver": gptq_columns}
    return {}


def weight_only_layout(weight: torch.Tensor, group_size: int) -> str:
    """The packed layout a W4A16 or W8A16 weight is prepared in for where it runs: ``"tiles"`` for the
    tensor-core kernels (a CUDA sm_90 weight in bf16 or fp16, which a linear's activations share, and
    groups of a multiple of 64 inputs), else ``"groups"`` for the CUDA-core kernels and the reference."""
    if weight.device.type != "cuda" or group_size % TILE_K:
        return "groups"
    from ..kernels.sm90.weight_only import unsupported_reason

    return "groups" if unsupported_reason(weight.device, weight.dtype) else "tiles"


def has_kernel(qweight: QuantizedWeight) -> bool:
    """Whether the fused kernels can run this weight: group-Hadamard rotations (or none) with
    groups of 256, w4a16 with groups of 256 (or of 64k in the tile layout), w8a16 with groups of 256k (or of
    64k in the tile layout). Other weights run the reference ops."""
    g = qweight.group_size
    if isinstance(qweight, PCAWeight):  # DiRotQ: Triton's kernels take groups of 64 to 256
        return g in (64, 128, 256)
    if qweight.scheme == "w8a16":
        return g % 256 == 0 or (qweight.layout == "tiles" and g % TILE_K == 0)
    if qweight.act_bits is None:
        return g == 256 or (qweight.layout == "tiles" and g % TILE_K == 0)
    rot = qweight.rotation
    return isinstance(rot, GroupHadamardRotation) and rot.group_size == 256


def _sm90_runs(device: torch.device, unsupported: Callable[[], str | None], fallback: str) -> bool:
    """Whether a Gluon kernel runs on ``device``: an sm_90 GPU (not the interpreter) where its own check,
    ``unsupported()``, finds no reason against it. On an sm_90 GPU the other kernel is slower, so falling
    back to it says why: ``fallback`` with the reason, as a warning."""
    if interpreting() or device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return False
    why = unsupported()
    if why is not None:
        warnings.warn(fallback.format(why=why))
    return why is None


def use_sm90_rotate(x: torch.Tensor | None, x2: torch.Tensor | None, h: torch.Tensor | None, group_size: int,
                    e4m3_to: torch.dtype | None = None) -> bool:
    """Whether the sm_90 rotate+quantize kernel runs these activations (``e4m3_to``: the dtype an e4m3 x widens
    to)."""
    def unsupported():
        from ..kernels.sm90 import rotate_quant  # Gluon: imported where it can run

        return rotate_quant.supported(x, x2, h, group_size, e4m3_to)

    return _sm90_runs((x if x is not None else x2).device, unsupported,
                      "rotate_quantize: the sm_90 kernel cannot take these activations ({why}); running the Triton "
                      "kernel instead (same numerics, slower)")


def use_sm90_packed_gemm(qx: torch.Tensor, qws: list[torch.Tensor], group_size: int, out_dtype: torch.dtype) -> bool:
    """Whether the sm_90 packed GEMM runs these W4A4 operands (weights split in registers, no unpack pass)."""
    def unsupported():
        from ..kernels.sm90 import packed_gemm  # Gluon: imported where it can run

        return packed_gemm.supported(qx, qws, group_size, out_dtype)

    return _sm90_runs(qx.device, unsupported,
                      "int_gemm: the sm_90 packed GEMM cannot run these operands ({why}); unpacking the weights and "
                      "running the int8 GEMM instead (same result, slower)")


def packed_gemm_wide_tokens(m: int, n: int, has_gelu: bool, programs: int) -> bool:
    """Whether the sm_90 packed GEMM takes tiles of PACKED_WIDE_TOKENS (256 tokens) for an [m, n] output: without a
    GELU epilogue, where their last wave leaves the SMs no emptier than 128-token tiles' would (the measurements
    above)."""
    if has_gelu:
        return False
    def cost(tokens: int) -> int:  # waves of tiles, times each tile's tokens
        return triton.cdiv(triton.cdiv(m, tokens) * triton.cdiv(n, PACKED_TILE), programs) * tokens
    return cost(PACKED_WIDE_TOKENS["BM"]) <= cost(PACKED_TILE)


@functools.lru_cache(maxsize=None)
def packed_gemm_config(wide: bool, out_itemsize: int):
    """The packed GEMM's config: 256-token tiles where ``wide`` and their output tile fits in shared memory beside
    the stages (not a float32 one), else the default. Cached: int_gemm asks on every call."""
    from ..kernels.sm90.packed_gemm import DEFAULT_CONFIG, SMEM_LIMIT

    config = dataclasses.replace(DEFAULT_CONFIG, **PACKED_WIDE_TOKENS)
    return config if wide and config.smem_bytes(out_itemsize) <= SMEM_LIMIT else DEFAULT_CONFIG


def gemm_schedule(m: int, n: int, has_gelu: bool, programs: int) -> tuple[bool, bool]:
    """(persistent, warp_specialize) of Triton's int8 GEMM for an [m, n] output (the measurements above)."""
    if not has_gelu:
        tiles = triton.cdiv(m, PERSISTENT_TILE) * triton.cdiv(n, PERSISTENT_TILE)
        return tiles >= PERSISTENT_MIN_WAVES * programs, True
    return m >= PERSISTENT_MIN_M or (m >= PERSISTENT_WIDE_MIN_M and n >= PERSISTENT_WIDE_N), False


def rotate_quantize(x: torch.Tensor | None, h: torch.Tensor | None, group_size: int, bits: int, *,
                    x2: torch.Tensor | None = None, order: str = "natural", x_descale: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.triton.rotate_quant.rotate_quantize, or the sm_90 kernel where ``use_sm90_rotate``. ``x_descale``:
    x is e4m3, widened to ``dtype`` (x2's by default) as it loads."""
    from ..kernels.triton.rotate_quant import check_e4m3_rows
    from ..kernels.triton.rotate_quant import rotate_quantize as triton_rotate_quantize

    e4m3_to = None if x_descale is None or x is None else check_e4m3_rows(x, x_descale, dtype, x2)
    if use_sm90_rotate(x, x2, h, group_size, e4m3_to):
        from ..kernels.sm90.rotate_quant import rotate_quantize_sm90

        return rotate_quantize_sm90(x, h, bits, x2=x2, order=order, x_descale=x_descale)
    return triton_rotate_quantize(x, h, group_size, bits, x2=x2, order=order, x_descale=x_descale, dtype=dtype)


def adaln_fusion_unsupported(device: torch.device, dtype: torch.dtype, k: int) -> str | None:
    """Why computing a DiT block's adaLN normalization inside the rotate+quantize after it does not pay where the
    graph runs, or None where it does: off CUDA (the reference computes either form), or on an sm_90 GPU whose
    kernel takes rows of ``k`` channels in ``dtype``. Elsewhere the op would normalize with torch first, slower
    than Inductor's own fused kernel, so the graph keeps that."""
    if device.type != "cuda":
        return None
    if interpreting() or torch.cuda.get_device_capability(device) != (9, 0):
        return "its kernel is for sm_90 only"
    from ..kernels.sm90 import rotate_quant  # Gluon: imported where it can run

    return rotate_quant.adaln_row_reason(k, dtype)


def rotate_quantize_adaln(x: torch.Tensor, x2: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor,
                          eps: float, h: torch.Tensor | None, group_size: int, bits: int, *,
                          order: str = "natural") -> tuple[torch.Tensor, torch.Tensor]:
    """The sm_90 kernel, normalizing each row as it loads it, where it can take these tensors; elsewhere
    ``numerics.adaln.adaln_rows_reference`` by torch, then ``rotate_quantize`` (same numerics, slower: the compiler
    fuses only where ``adaln_fusion_unsupported`` finds no reason against it)."""
    def unsupported():
        from ..kernels.sm90 import rotate_quant  # Gluon: imported where it can run

        return rotate_quant.adaln_supported(x, x2, scale, shift, h, group_size)

    if _sm90_runs(x.device, unsupported, "rotate_quantize_adaln: the sm_90 kernel cannot take these tensors ({why}); "
                  "normalizing with torch, then rotate_quantize (same numerics, slower)"):
        from ..kernels.sm90.rotate_quant import rotate_quantize_adaln_sm90

        return rotate_quantize_adaln_sm90(x, x2, scale, shift, eps, h, bits, order=order)
    return rotate_quantize(adaln_rows_reference(x, x2, scale, shift, eps), h, group_size, bits, order=order)


_JOINED = JoinedVectors()


def joined_vectors(parts: list[torch.Tensor | None], join: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
    """A fused GEMM's scales or biases as one vector: ``join()``, kept while the parts live unchanged
    (ops/joined_vectors.py)."""
    return _JOINED.get(parts, join)


def int_gemm(qx: torch.Tensor, sx: torch.Tensor, qws: list[torch.Tensor], sws: list[torch.Tensor],
             biases: list[torch.Tensor | None], packed: bool, group_size: int, out_dtype: torch.dtype,
             gelu_from: int | None = None) -> torch.Tensor:
    """kernels.int_gemm.int_gemm with its schedule from ``gemm_schedule``, or the sm_90 packed GEMM where
    ``use_sm90_packed_gemm``."""
    from ..kernels.triton.int_gemm import check_gemm_operands, int_gemm_unchecked, programs

    check_gemm_operands(qx, sx, qws, sws, biases, packed, group_size, gelu_from)
    n = sum(w.shape[0] for w in qws)
    if len(qws) > 1:  # the kernels read one vector of channel scales and one of biases
        scales, parts, sizes = sws, biases, [w.shape[0] for w in qws]
        sws = [joined_vectors(scales, lambda: torch.cat(scales))]
        biases = [joined_vectors(parts, lambda: concat_biases(parts, sizes, qx.device))]
    if packed and use_sm90_packed_gemm(qx, qws, group_size, out_dtype):
        from ..kernels.sm90.packed_gemm import packed_gemm_unchecked

        wide = packed_gemm_wide_tokens(qx.shape[0], n, gelu_from is not None, programs(qx.device))
        return packed_gemm_unchecked(qx, sx, qws, sws[0], biases[0], group_size, out_dtype, gelu_from,
                                     packed_gemm_config(wide, out_dtype.itemsize))
    persistent, warp_specialize = gemm_schedule(qx.shape[0], n, gelu_from is not None, programs(qx.device))
    return int_gemm_unchecked(qx, sx, qws, sws, biases, packed, group_size, out_dtype, gelu_from=gelu_from,
                              persistent=persistent, warp_specialize=warp_specialize)


def weight_only_gemm(x: torch.Tensor, qw: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     group_size: int, bits: int) -> torch.Tensor:
    """The kernel of the layout the weight was prepared in: the tensor-core tile kernels, or Triton's."""
    tiles = packed_layout(qw) == "tiles"
    if bits == 8:
        if tiles:
            from ..kernels.sm90.weight_only import w8a16_gemm_tiles as kernel
        else:
            from ..kernels.triton.weight_only import w8a16_gemm as kernel
    elif tiles:
        from ..kernels.sm90.weight_only import w4a16_gemm_tiles as kernel
    else:
        from ..kernels.triton.weight_only import w4a16_gemm as kernel
    return kernel(x, qw, scale, bias, group_size)


def pca_rotate_quantize(x: torch.Tensor, basis: torch.Tensor, h: torch.Tensor | None, rank: int,
                        group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DiRotQ's fused basis rotation, split and group quantization: Triton's kernel."""
    from ..kernels.triton.pca import pca_rotate_quantize as kernel

    return kernel(x, basis, h, rank, group_size)


def pca_gemm(z_hi: torch.Tensor, q: torch.Tensor, sa: torch.Tensor, w_hi: torch.Tensor, qw: torch.Tensor,
             sw: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """DiRotQ's GEMM (16-bit subspace + group-scaled int4): the Gluon kernel on sm_90 where it takes the operands,
    else Triton's."""
    def unsupported():
        from ..kernels.sm90 import pca_gemm as sm90  # Gluon: imported where it can run

        return sm90.supported(z_hi, q, w_hi, qw, group_size)

    if _sm90_runs(q.device, unsupported, "pca_gemm: the sm_90 kernel cannot run these operands ({why}); running the "
                                         "Triton kernel instead (same numerics, slower)"):
        from ..kernels.sm90.pca_gemm import pca_gemm_unchecked

        return pca_gemm_unchecked(z_hi, q, sa, w_hi, qw, sw, bias, group_size)
    from ..kernels.triton.pca import pca_gemm as kernel

    return kernel(z_hi, q, sa, w_hi, qw, sw, bias, group_size)


def fp8_attention_unsupported(shape: tuple[int, int, int, int], softmax_scale: float,
                              device: torch.device) -> str | None:
    """None when fp8 attention (cuDNN's fp8 flash attention) runs [B, H, S, D] inputs on this CUDA device,
    else why not."""
    from ..kernels.cudnn.fp8_attention import check_supported

    return check_supported(shape, softmax_scale, device)


def fp8_attention(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                  descale_k: torch.Tensor, descale_v: torch.Tensor, scale_o: torch.Tensor,
                  softmax_scale: float) -> torch.Tensor:
    """cuDNN's fp8 flash attention, the one kernel of ``convrot::fp8_attention``."""
    from ..kernels.cudnn.fp8_attention import fp8_attention as kernel

    return kernel(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, softmax_scale)


def rms_rope(sources: list[torch.Tensor], weights: list[torch.Tensor | None], eps: list[float],
             cos: torch.Tensor, sin: torch.Tensor, bound: torch.Tensor | None = None) -> torch.Tensor:
    """Q or K's RMSNorm and RoPE before attention, with ``bound`` cast to e4m3 for fp8 attention: Triton's kernel,
    the one kernel of ``convrot::rms_rope`` and ``convrot::rms_rope_e4m3``."""
    from ..kernels.triton.rms_rope import rms_rope as kernel

    return kernel(sources, weights, eps, cos, sin, bound)


def rms_rope_unsupported(dtype: torch.dtype, head_dim: int, streams: int) -> str | None:
    """None when ``rms_rope``'s kernel takes ``streams`` streams of ``dtype`` with heads of ``head_dim`` on CUDA,
    else why not."""
    from ..kernels.triton.rms_rope import unsupported_reason

    return unsupported_reason(dtype, head_dim, streams)
