"""The quantized ops as torch custom ops: ``torch.ops.convrot.*``.

Each op has a reference implementation in plain torch (used on CPU and any
non-CUDA device), a Triton implementation for CUDA, and a fake implementation
for tracing, so Inductor treats them as opaque calls. The compiler pass inserts
these ops; the eager modules call them too, so both paths share one numerics.
"""

from __future__ import annotations

from typing import Optional

import torch

from .attention import fp8_attention_reference, output_like
from .hadamard import padded_size, rotate_with
from .quant import (TILE_K, QuantizedWeight, concat_biases, packed_layout, quantize_symmetric, reference_int_gemm,
                    to_act_order, unpack_int4, weight_only_gemm)
from .rotations import GroupHadamardRotation


def _full_matrix(h: torch.Tensor, group_size: int) -> torch.Tensor:
    return torch.kron(h, h) if h.shape[0] != group_size else h


def rotate_quantize_reference(x: torch.Tensor, h: Optional[torch.Tensor], group_size: int, bits: int,
                              order: str = "natural") -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise rotation + per-token quantization of [M, K] activations, on any device.
    h: [G, G] rotation, its [16, 16] Kronecker factor for G = 256, or None.
    Returns (int8 values [M, K'], float32 scale [M]), the values' channels in ``order`` within each group
    (quant.to_act_order: "natural", or "mma", what the sm_90 kernel stores fastest)."""
    hf = None if h is None else _full_matrix(h.float(), group_size)
    q, s = quantize_symmetric(rotate_with(x.float(), hf, group_size), bits)
    return to_act_order(q, order, group_size), s


def _as_list(t):
    return list(t) if isinstance(t, (list, tuple)) else [t]


def stacked_weights_reference(qws: list[torch.Tensor], packed: bool, group_size: int) -> torch.Tensor:
    """Several linears' weights as one int8 operand [sum N, K'], unpacked when ``packed``
    (the reference form of kernels.int_gemm.stacked_weights)."""
    return torch.cat([unpack_int4(w, group_size) if packed else w for w in qws])


def int_gemm_reference(qx: torch.Tensor, sx: torch.Tensor, qw, sw, bias, packed: bool, group_size: int,
                       out_dtype: torch.dtype, gelu_from: Optional[int] = None) -> torch.Tensor:
    """(qx @ W^T) * sx * sw (+ bias): int8 activations, int8 or packed int4 (``packed``) weights; any device.
    qw, sw and bias may be lists, one entry per linear reading qx: the outputs then sit side by side.
    ``gelu_from``: GELU (tanh form) on output columns >= gelu_from, before the cast to out_dtype."""
    qws, sws, biases = _as_list(qw), _as_list(sw), _as_list(bias)
    w = stacked_weights_reference(qws, packed, group_size)
    b = concat_biases(biases, [w.shape[0] for w in qws], qx.device)
    return reference_int_gemm(qx, sx, w, torch.cat(sws), b, out_dtype, gelu_from)


w4a16_gemm_reference = weight_only_gemm


@torch.library.custom_op("convrot::rotate_quantize", mutates_args=())
def rotate_quantize(x: torch.Tensor, h: Optional[torch.Tensor], group_size: int, bits: int,
                    order: str = "natural") -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise rotation + per-token quantization; see ``rotate_quantize_reference``."""
    return rotate_quantize_reference(x, h, group_size, bits, order)


@rotate_quantize.register_kernel("cuda")
def _rotate_quantize_cuda(x, h, group_size, bits, order="natural"):
    from .kernels.rotate_quant import rotate_quantize as kernel

    return kernel(x, h, group_size, bits, order=order)


def _quantized_rows_like(x: torch.Tensor, k: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (int8 values [M, K'], float32 scale [M]) for x's M rows of K channels: the fake of every
    rotate+quantize op."""
    kp = padded_size(k, group_size)
    return x.new_empty(x.shape[0], kp, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


@rotate_quantize.register_fake
def _(x, h, group_size, bits, order="natural"):
    return _quantized_rows_like(x, x.shape[-1], group_size)


def cat_reference(x: Optional[torch.Tensor], x2: torch.Tensor, gelu: bool) -> torch.Tensor:
    """cat([x, f(x2)], -1), or f(x2) when x is None, f = GELU (tanh form) if ``gelu`` else the identity:
    what FLUX feeds the single blocks' proj_out (and, with the GELU, ff down)."""
    g = torch.nn.functional.gelu(x2, approximate="tanh") if gelu else x2
    return g if x is None else torch.cat([x, g], -1)


@torch.library.custom_op("convrot::rotate_quantize_cat", mutates_args=())
def rotate_quantize_cat(x: Optional[torch.Tensor], x2: torch.Tensor, h: Optional[torch.Tensor], group_size: int,
                        bits: int, gelu: bool, order: str = "natural") -> tuple[torch.Tensor, torch.Tensor]:
    """rotate_quantize of cat([x, x2], -1), or of cat([x, gelu_tanh(x2)], -1) (``gelu``; x may be None);
    on CUDA the kernel reads both as it loads (and applies the GELU), so the concatenation (and the
    GELU output) are never written to memory."""
    return rotate_quantize_reference(cat_reference(x, x2, gelu), h, group_size, bits, order)


@rotate_quantize_cat.register_kernel("cuda")
def _rotate_quantize_cat_cuda(x, x2, h, group_size, bits, gelu, order="natural"):
    from .kernels.rotate_quant import rotate_quantize as kernel

    return kernel(x, h, group_size, bits, x2=x2, gelu_x2=gelu, order=order)


@rotate_quantize_cat.register_fake
def _(x, x2, h, group_size, bits, gelu, order="natural"):
    return _quantized_rows_like(x2, (0 if x is None else x.shape[-1]) + x2.shape[-1], group_size)


def norm_reference(x: torch.Tensor, mod_scale: torch.Tensor, mod_shift: torch.Tensor, eps: float) -> torch.Tensor:
    """FLUX's adaLN input, layer_norm(x) * (1 + scale) + shift, of rows x [M, K] forming B samples of M / B
    rows with scale and shift [B, K]; computed in float32 and rounded once to x's dtype, as Inductor's
    fused kernel writes it (eager torch rounds after each op)."""
    b, k = mod_scale.shape
    xf = x.float().reshape(b, -1, k)
    y = torch.nn.functional.layer_norm(xf, (k,), eps=eps) * (1 + mod_scale.float()[:, None]) + mod_shift.float()[:, None]
    return y.reshape(x.shape).to(x.dtype)


@torch.library.custom_op("convrot::rotate_quantize_norm", mutates_args=())
def rotate_quantize_norm(x: torch.Tensor, mod_scale: torch.Tensor, mod_shift: torch.Tensor, eps: float,
                         h: Optional[torch.Tensor], group_size: int, bits: int,
                         order: str = "natural") -> tuple[torch.Tensor, torch.Tensor]:
    """rotate_quantize of norm_reference(x, mod_scale, mod_shift, eps); on CUDA the kernel normalizes and
    modulates the rows as it loads them, so the normalized activations are never written to memory."""
    return rotate_quantize_reference(norm_reference(x, mod_scale, mod_shift, eps), h, group_size, bits, order)


@rotate_quantize_norm.register_kernel("cuda")
def _rotate_quantize_norm_cuda(x, mod_scale, mod_shift, eps, h, group_size, bits, order="natural"):
    from .kernels.rotate_quant import rotate_quantize as kernel

    return kernel(x, h, group_size, bits, norm=(mod_scale, mod_shift, eps), order=order)


@rotate_quantize_norm.register_fake
def _(x, mod_scale, mod_shift, eps, h, group_size, bits, order="natural"):
    return _quantized_rows_like(x, x.shape[-1], group_size)


@torch.library.custom_op("convrot::int_gemm", mutates_args=())
def int_gemm(qx: torch.Tensor, sx: torch.Tensor, qw: list[torch.Tensor], sw: list[torch.Tensor],
             bias: list[Optional[torch.Tensor]], packed: bool, group_size: int, out_dtype: torch.dtype,
             gelu_from: Optional[int] = None) -> torch.Tensor:
    """Quantized GEMM of one or several linears on the same activations, [M, sum N]; see ``int_gemm_reference``."""
    return int_gemm_reference(qx, sx, qw, sw, bias, packed, group_size, out_dtype, gelu_from)


@int_gemm.register_kernel("cuda")
def _int_gemm_cuda(qx, sx, qw, sw, bias, packed, group_size, out_dtype, gelu_from=None):
    from .kernels.int_gemm import int_gemm as kernel

    return kernel(qx, sx, qw, sw, bias, packed, group_size, out_dtype, gelu_from=gelu_from)


@int_gemm.register_fake
def _(qx, sx, qw, sw, bias, packed, group_size, out_dtype, gelu_from=None):
    return qx.new_empty(qx.shape[0], sum(w.shape[0] for w in qw), dtype=out_dtype)


@torch.library.custom_op("convrot::unpack_int4", mutates_args=())
def unpack_int4_rows(qw: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Packed int4 weights [N_i, K'/2] -> int8 values [sum N_i, K'], one linear's rows after another:
    the weight operand of ``scaled_int_mm`` (the GEMM Inductor may lower through its template)."""
    return stacked_weights_reference(qw, True, group_size)


@unpack_int4_rows.register_kernel("cuda")
def _unpack_int4_rows_cuda(qw, group_size):
    from .kernels.int_gemm import stacked_weights

    return stacked_weights(qw, True, group_size, torch.int8)


@unpack_int4_rows.register_fake
def _(qw, group_size):
    return qw[0].new_empty(sum(w.shape[0] for w in qw), 2 * qw[0].shape[1], dtype=torch.int8)


@torch.library.custom_op("convrot::scaled_int_mm", mutates_args=())
def scaled_int_mm(qx: torch.Tensor, sx: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, group_size: int,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """(qx @ w^T) * sx * sw on int8 values, no bias: the GEMM alone, so that what follows it (bias,
    gate, residual) can become the epilogue of an Inductor template (kernels/inductor_gemm.py)."""
    return reference_int_gemm(qx, sx, w, sw, None, out_dtype)


@scaled_int_mm.register_kernel("cuda")
def _scaled_int_mm_cuda(qx, sx, w, sw, group_size, out_dtype):
    from .kernels.int_gemm import int_gemm as kernel

    return kernel(qx, sx, w, sw, None, False, group_size, out_dtype)


@scaled_int_mm.register_fake
def _(qx, sx, w, sw, group_size, out_dtype):
    return qx.new_empty(qx.shape[0], w.shape[0], dtype=out_dtype)


@torch.library.custom_op("convrot::w4a16_gemm", mutates_args=())
def w4a16_gemm(x: torch.Tensor, qw: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
               group_size: int) -> torch.Tensor:
    """Int4 weight-only GEMM; see ``w4a16_gemm_reference``."""
    return w4a16_gemm_reference(x, qw, scale, bias, group_size)


@w4a16_gemm.register_kernel("cuda")
def _w4a16_cuda(x, qw, scale, bias, group_size):
    if packed_layout(qw) == "tiles":
        from .kernels.weight_only_sm90 import w4a16_gemm_tiles as kernel
    else:
        from .kernels.weight_only import w4a16_gemm as kernel

    return kernel(x, qw, scale, bias, group_size)


@w4a16_gemm.register_fake
def _(x, qw, scale, bias, group_size):
    return x.new_empty(x.shape[0], scale.shape[0])


def w4a16_layout(weight: torch.Tensor, group_size: int) -> str:
    """The packed layout a W4A16 weight is prepared in for where it runs: ``"tiles"`` for the
    tensor-core kernel (a CUDA sm_90 weight in bf16 or fp16, which a linear's activations share, and
    groups of a multiple of 64 inputs), else ``"groups"`` for the CUDA-core kernels and the reference."""
    if weight.device.type != "cuda" or group_size % TILE_K:
        return "groups"
    from .kernels.weight_only_sm90 import unsupported_reason

    return "groups" if unsupported_reason(weight.device, weight.dtype) else "tiles"


def act_order_for(device: torch.device, dtype: torch.dtype, group_size: int, rotated: bool) -> str:
    """The channel order W4A4/W8A8 activations are quantized in, and their weights prepared in, for where a
    linear runs: ``"mma"`` (quant.mma_channel_order) where the sm_90 rotate+quantize kernel can take them
    (a CUDA sm_90 device, bf16 activations, rotated groups of 256), whose stores it makes whole; else
    ``"natural"``. Either is correct on every path (the Triton kernel and the reference write both): the
    choice only decides speed, so a call that falls back to another kernel at run time stays exact."""
    if not rotated or group_size != 256 or device.type != "cuda" or dtype != torch.bfloat16:
        return "natural"
    return "mma" if torch.cuda.get_device_capability(device) == (9, 0) else "natural"


@torch.library.custom_op("convrot::fp8_attention", mutates_args=())
def fp8_attention(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                  descale_k: torch.Tensor, descale_v: torch.Tensor, scale_o: torch.Tensor,
                  softmax_scale: float) -> torch.Tensor:
    """Attention on per-tensor e4m3 [B, H, S, D] Q, K, V; e4m3 output scaled by scale_o; see
    ``attention.fp8_attention_reference``. On CUDA: cuDNN's fp8 flash attention."""
    return fp8_attention_reference(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, softmax_scale)


@fp8_attention.register_kernel("cuda")
def _fp8_attention_cuda(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, softmax_scale):
    from .kernels.cudnn_attention import fp8_attention as kernel

    return kernel(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, softmax_scale)


@fp8_attention.register_fake
def _(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, softmax_scale):
    return output_like(q8)


def has_kernel(qweight: QuantizedWeight) -> bool:
    """Whether the fused kernels can run this weight: group-Hadamard rotations (or none) with
    groups of 256, and w4a16 with groups of 256 (or of 64k in the tile layout). Other weights run the
    reference ops."""
    if qweight.act_bits is None:
        return qweight.group_size == 256 or (qweight.layout == "tiles" and qweight.group_size % TILE_K == 0)
    rot = qweight.rotation
    return isinstance(rot, GroupHadamardRotation) and rot.group_size == 256


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as contiguous rows [M, K], as the kernels take them."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.is_contiguous() else x2.contiguous()


def _strided_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as rows [M, K] that may have a row stride larger than K (a column slice), which the
    rotate+quantize kernel reads in place; copied only when its last dimension is not contiguous."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def quantize_activation(x: torch.Tensor, h: Optional[torch.Tensor], group_size: int, bits: int,
                        order: str = "natural") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate and quantize x [..., K] as rows [M, K'], channels in ``order`` (act_order_for): the first half
    of a quantized linear. The compiler pass inserts one per distinct input, shared by every linear that
    reads it."""
    return torch.ops.convrot.rotate_quantize(_rows(x), h, group_size, bits, order)


GEMM_LOWERINGS = ("kernel", "template")


def quantize_cat_activation(x: Optional[torch.Tensor], x2: torch.Tensor, h: Optional[torch.Tensor], group_size: int,
                            bits: int, gelu: bool, order: str = "natural") -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_activation of cat([x, x2], -1) or cat([x, gelu_tanh(x2)], -1) (``gelu``; x may be None)
    without materializing it: the compiler pass inserts it where a concatenation (and a GELU) feed a
    quantized linear. x2 may be a column slice of a larger tensor: its rows are read in place."""
    return torch.ops.convrot.rotate_quantize_cat(None if x is None else _strided_rows(x), _strided_rows(x2), h,
                                                 group_size, bits, gelu, order)


def quantize_norm_activation(x: torch.Tensor, mod_scale: torch.Tensor, mod_shift: torch.Tensor, eps: float,
                             h: Optional[torch.Tensor], group_size: int, bits: int,
                             order: str = "natural") -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_activation of layer_norm(x) * (1 + scale[:, None]) + shift[:, None], x [B, T, K] and scale,
    shift [B, K], without materializing it: the compiler pass inserts it where FLUX's adaLN
    normalization feeds quantized linears (producers.match_norm_producer)."""
    return torch.ops.convrot.rotate_quantize_norm(_rows(x), mod_scale, mod_shift, eps, h, group_size, bits, order)


def quantized_matmul(q: torch.Tensor, s: torch.Tensor, x: torch.Tensor, values, scale, bias, scheme: str,
                     group_size: int, out_features: int, gemm: str = "kernel",
                     gelu_from: Optional[int] = None) -> torch.Tensor:
    """The second half: the GEMM on quantized activations (q, s) of x (read for its shape and dtype).
    values, scale and bias may be lists, one entry per linear reading x: one GEMM then computes all
    of them, their outputs side by side in the last dimension (out_features in total).

    ``gemm="kernel"``: one opaque op that unpacks, multiplies and adds the bias. ``"template"``: the
    weights are unpacked by one op and the bias added in torch after ``scaled_int_mm``, so that under
    Inductor (with kernels/inductor_gemm.py registered) the bias and whatever pointwise ops follow
    run in the GEMM's epilogue.

    ``gelu_from`` (kernel only): GELU (tanh form) on output columns >= gelu_from, in the GEMM's epilogue."""
    values, scale, bias = _as_list(values), _as_list(scale), _as_list(bias)
    if gelu_from is not None and gemm != "kernel":
        raise ValueError(f"gelu_from runs in the opaque kernel's epilogue (gemm='kernel'), not with gemm={gemm!r}")
    if gemm == "kernel":
        out = torch.ops.convrot.int_gemm(q, s, values, scale, bias, scheme == "w4a4", group_size, x.dtype, gelu_from)
    elif gemm == "template":
        if scheme == "w4a4":
            w = torch.ops.convrot.unpack_int4(values, group_size)
        else:
            w = values[0] if len(values) == 1 else torch.cat(values)
        sw = scale[0] if len(scale) == 1 else torch.cat(scale)
        out = torch.ops.convrot.scaled_int_mm(q, s, w, sw, group_size, x.dtype)
        b = concat_biases(bias, [v.shape[0] for v in values], q.device)
        if b is not None:
            out = out + b
    else:
        raise ValueError(f"gemm must be one of {GEMM_LOWERINGS}, got {gemm!r}")
    return out.reshape(*x.shape[:-1], out_features)


def quantized_linear(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, h: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], scheme: str, group_size: int, out_features: int,
                     order: str = "natural") -> torch.Tensor:
    """y = x W^T + b through the custom ops, from a weight's prepared tensors (QuantizedWeight.values
    and .scale, input channels in ``order``: its act_order) and the rotation's ``kernel_matrix()``."""
    if scheme == "w4a16":
        out = torch.ops.convrot.w4a16_gemm(_rows(x), values, scale, bias, group_size)
        return out.reshape(*x.shape[:-1], out_features)
    q, s = quantize_activation(x, h, group_size, 4 if scheme == "w4a4" else 8, order)
    return quantized_matmul(q, s, x, values, scale, bias, scheme, group_size, out_features)
