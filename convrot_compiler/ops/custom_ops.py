"""The quantized ops as torch custom ops: ``torch.ops.convrot.*``.

Each op has a reference implementation in plain torch (used on CPU and any
non-CUDA device), a Triton implementation for CUDA, and a fake implementation
for tracing, so Inductor treats them as opaque calls. The compiler pass inserts
these ops; the eager modules call them too, so both paths share one numerics.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..numerics.adaln import adaln_rows_reference
from ..numerics.fp8_attention import (
    E4M3_MAX,
    default_softmax_scale,
    dequantize_e4m3,
    fp8_attention_reference,
    inverse_descale,
    output_like,
    quantize_e4m3,
    rms_rope_e4m3_reference,
)
from ..numerics.hadamard import padded_size, rotate_with
from ..numerics.pca import pca_matmul, pca_rotate_quantize
from ..numerics.quant import (
    SCHEME_BITS,
    WEIGHT_ONLY,
    concat_biases,
    quantize_symmetric,
    reference_int_gemm,
    to_act_order,
    unpack_int4,
    weight_only_gemm,
)
from ..numerics.rope import rms_rope_reference
from . import dispatch


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


@torch.library.custom_op("convrot::rotate_quantize", mutates_args=())
def rotate_quantize(x: torch.Tensor, h: Optional[torch.Tensor], group_size: int, bits: int,
                    order: str = "natural") -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise rotation + per-token quantization; see ``rotate_quantize_reference``."""
    return rotate_quantize_reference(x, h, group_size, bits, order)


@rotate_quantize.register_kernel("cuda")
def _rotate_quantize_cuda(x, h, group_size, bits, order="natural"):
    return dispatch.rotate_quantize(x, h, group_size, bits, order=order)


def _quantized_rows_like(x: torch.Tensor, k: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (int8 values [M, K'], float32 scale [M]) for x's M rows of K channels: the fake of every
    rotate+quantize op."""
    kp = padded_size(k, group_size)
    return x.new_empty(x.shape[0], kp, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


@rotate_quantize.register_fake
def _(x, h, group_size, bits, order="natural"):
    return _quantized_rows_like(x, x.shape[-1], group_size)


def cat_reference(x: Optional[torch.Tensor], x2: torch.Tensor) -> torch.Tensor:
    """cat([x, x2], -1), or x2 when x is None: what FLUX feeds the single blocks' proj_out."""
    return x2 if x is None else torch.cat([x, x2], -1)


@torch.library.custom_op("convrot::rotate_quantize_cat", mutates_args=())
def rotate_quantize_cat(x: Optional[torch.Tensor], x2: torch.Tensor, h: Optional[torch.Tensor], group_size: int,
                        bits: int, order: str = "natural") -> tuple[torch.Tensor, torch.Tensor]:
    """rotate_quantize of cat([x, x2], -1) (x may be None); on CUDA the kernel reads both as it loads, so the
    concatenation is never written to memory."""
    return rotate_quantize_reference(cat_reference(x, x2), h, group_size, bits, order)


@rotate_quantize_cat.register_kernel("cuda")
def _rotate_quantize_cat_cuda(x, x2, h, group_size, bits, order="natural"):
    return dispatch.rotate_quantize(x, h, group_size, bits, x2=x2, order=order)


@rotate_quantize_cat.register_fake
def _(x, x2, h, group_size, bits, order="natural"):
    return _quantized_rows_like(x2, (0 if x is None else x.shape[-1]) + x2.shape[-1], group_size)


@torch.library.custom_op("convrot::rotate_quantize_e4m3", mutates_args=())
def rotate_quantize_e4m3(x8: torch.Tensor, descale: torch.Tensor, x2: Optional[torch.Tensor], h: Optional[torch.Tensor],
                         group_size: int, bits: int, order: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """rotate_quantize_cat of (dequantize_e4m3(x8, descale, dtype), x2) (x2 may be None): fp8 attention's output
    read by the next linear's rotate+quantize as it is, e4m3; on CUDA the kernel widens it as it loads, so the
    16-bit copy is never written to memory."""
    x = dequantize_e4m3(x8, descale, dtype)
    return rotate_quantize_reference(x if x2 is None else cat_reference(x, x2), h, group_size, bits, order)


@rotate_quantize_e4m3.register_kernel("cuda")
def _rotate_quantize_e4m3_cuda(x8, descale, x2, h, group_size, bits, order, dtype):
    return dispatch.rotate_quantize(x8, h, group_size, bits, x2=x2, order=order, x_descale=descale, dtype=dtype)


@rotate_quantize_e4m3.register_fake
def _(x8, descale, x2, h, group_size, bits, order, dtype):
    return _quantized_rows_like(x8, x8.shape[-1] + (0 if x2 is None else x2.shape[-1]), group_size)


@torch.library.custom_op("convrot::rotate_quantize_adaln", mutates_args=())
def rotate_quantize_adaln(x: torch.Tensor, x2: Optional[torch.Tensor], scale: torch.Tensor, shift: torch.Tensor,
                          eps: float, h: Optional[torch.Tensor], group_size: int, bits: int,
                          order: str = "natural") -> tuple[torch.Tensor, torch.Tensor]:
    """rotate_quantize of the adaLN normalization ``adaln_rows_reference(x, x2, scale, shift, eps)``: x [B, T1, K]
    and x2 [B, T2, K] (or None) one sample's tokens after the other's, scale and shift [B, K]. On CUDA the sm_90
    kernel normalizes each row as it loads it, so neither the normalized rows nor the concatenation is written."""
    return rotate_quantize_reference(adaln_rows_reference(x, x2, scale, shift, eps), h, group_size, bits, order)


@rotate_quantize_adaln.register_kernel("cuda")
def _rotate_quantize_adaln_cuda(x, x2, scale, shift, eps, h, group_size, bits, order="natural"):
    return dispatch.rotate_quantize_adaln(x, x2, scale, shift, eps, h, group_size, bits, order=order)


@rotate_quantize_adaln.register_fake
def _(x, x2, scale, shift, eps, h, group_size, bits, order="natural"):
    rows = x.new_empty(x.shape[0] * (x.shape[1] + (0 if x2 is None else x2.shape[1])), x.shape[-1])
    return _quantized_rows_like(rows, x.shape[-1], group_size)


@torch.library.custom_op("convrot::int_gemm", mutates_args=())
def int_gemm(qx: torch.Tensor, sx: torch.Tensor, qw: list[torch.Tensor], sw: list[torch.Tensor],
             bias: list[Optional[torch.Tensor]], packed: bool, group_size: int, out_dtype: torch.dtype,
             gelu_from: Optional[int] = None) -> torch.Tensor:
    """Quantized GEMM of one or several linears on the same activations, [M, sum N]; see ``int_gemm_reference``."""
    return int_gemm_reference(qx, sx, qw, sw, bias, packed, group_size, out_dtype, gelu_from)


@int_gemm.register_kernel("cuda")
def _int_gemm_cuda(qx, sx, qw, sw, bias, packed, group_size, out_dtype, gelu_from=None):
    return dispatch.int_gemm(qx, sx, qw, sw, bias, packed, group_size, out_dtype, gelu_from)


@int_gemm.register_fake
def _(qx, sx, qw, sw, bias, packed, group_size, out_dtype, gelu_from=None):
    return qx.new_empty(qx.shape[0], sum(w.shape[0] for w in qw), dtype=out_dtype)


@torch.library.custom_op("convrot::weight_only_gemm", mutates_args=())
def weight_only_gemm_op(x: torch.Tensor, qw: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                        group_size: int, bits: int) -> torch.Tensor:
    """Weight-only GEMM, int4 (W4A16) or int8 (W8A16) weights by ``bits``; see ``weight_only_gemm``."""
    return weight_only_gemm(x, qw, scale, bias, group_size, bits)


@weight_only_gemm_op.register_kernel("cuda")
def _weight_only_cuda(x, qw, scale, bias, group_size, bits):
    return dispatch.weight_only_gemm(x, qw, scale, bias, group_size, bits)


@weight_only_gemm_op.register_fake
def _(x, qw, scale, bias, group_size, bits):
    return x.new_empty(x.shape[0], scale.shape[0])


@torch.library.custom_op("convrot::pca_rotate_quantize", mutates_args=())
def pca_rotate_quantize_op(x: torch.Tensor, basis: torch.Tensor, h: Optional[torch.Tensor], rank: int,
                           group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DiRotQ's activation half on basis blocks [n, b, b]: (z_hi [M, n rank], int4 values [M, n (b - rank)] as int8,
    scales [M, n (b - rank) / G]); see ``numerics.pca.pca_rotate_quantize``. Contiguous, as the fake says (Inductor
    checks the strides): the reference's z_hi is a column slice of the rotated rows."""
    return tuple(t.contiguous() for t in pca_rotate_quantize(x, basis, h, rank, group_size))


@pca_rotate_quantize_op.register_kernel("cuda")
def _pca_rotate_quantize_cuda(x, basis, h, rank, group_size):
    return dispatch.pca_rotate_quantize(x, basis, h, rank, group_size)


@pca_rotate_quantize_op.register_fake
def _(x, basis, h, rank, group_size):
    m, k = x.shape
    lo = k - basis.shape[0] * rank
    return (x.new_empty(m, k - lo), x.new_empty(m, lo, dtype=torch.int8),
            x.new_empty(m, lo // group_size, dtype=torch.float32))


@torch.library.custom_op("convrot::pca_gemm", mutates_args=())
def pca_gemm_op(z_hi: torch.Tensor, q: torch.Tensor, sa: torch.Tensor, w_hi: torch.Tensor, qw: torch.Tensor,
                sw: torch.Tensor, bias: Optional[torch.Tensor], group_size: int) -> torch.Tensor:
    """DiRotQ's GEMM, [M, N] in z_hi's dtype; see ``numerics.pca.pca_matmul``."""
    return pca_matmul(z_hi, q, sa, w_hi, qw, sw, bias, group_size)


@pca_gemm_op.register_kernel("cuda")
def _pca_gemm_cuda(z_hi, q, sa, w_hi, qw, sw, bias, group_size):
    return dispatch.pca_gemm(z_hi, q, sa, w_hi, qw, sw, bias, group_size)


@pca_gemm_op.register_fake
def _(z_hi, q, sa, w_hi, qw, sw, bias, group_size):
    return z_hi.new_empty(q.shape[0], w_hi.shape[0])


@torch.library.custom_op("convrot::fp8_attention", mutates_args=())
def fp8_attention(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                  descale_k: torch.Tensor, descale_v: torch.Tensor, scale_o: torch.Tensor,
                  softmax_scale: float) -> torch.Tensor:
    """Attention on per-tensor e4m3 [B, H, S, D] Q, K, V; e4m3 output scaled by scale_o; see
    ``attention.fp8_attention_reference``. On CUDA: cuDNN's fp8 flash attention."""
    return fp8_attention_reference(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, softmax_scale)


@fp8_attention.register_kernel("cuda")
def _fp8_attention_cuda(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, softmax_scale):
    return dispatch.fp8_attention(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, softmax_scale)


@fp8_attention.register_fake
def _(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, softmax_scale):
    return output_like(q8)


@torch.library.custom_op("convrot::rms_rope", mutates_args=())
def rms_rope(sources: list[torch.Tensor], weights: list[Optional[torch.Tensor]], eps: list[float],
             cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX's Q or K from its projections, in their dtype: RMSNorm of each source, their concatenation along the
    sequence, RoPE on pairs; see ``rms_rope_reference``. On CUDA: one Triton kernel (kernels/triton/rms_rope.py)
    where Inductor runs the chain as several."""
    return rms_rope_reference(sources, weights, eps, cos, sin)


@rms_rope.register_kernel("cuda")
def _rms_rope_cuda(sources, weights, eps, cos, sin):
    return dispatch.rms_rope(sources, weights, eps, cos, sin)


@rms_rope.register_fake
def _(sources, weights, eps, cos, sin):
    b, _, h, d = sources[0].shape
    return sources[0].new_empty(b, cos.shape[0], h, d)


@torch.library.custom_op("convrot::rms_rope_e4m3", mutates_args=())
def rms_rope_e4m3(sources: list[torch.Tensor], weights: list[Optional[torch.Tensor]], eps: list[float],
                  cos: torch.Tensor, sin: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """FLUX's Q or K to e4m3 from its projections: RMSNorm of each source, their concatenation along the
    sequence, RoPE on pairs, the cast scaled by ``bound``; see ``rms_rope_e4m3_reference``. On CUDA: one Triton
    kernel (kernels/triton/rms_rope.py)."""
    return rms_rope_e4m3_reference(sources, weights, eps, cos, sin, bound)[0]


@rms_rope_e4m3.register_kernel("cuda")
def _rms_rope_e4m3_cuda(sources, weights, eps, cos, sin, bound):
    return dispatch.rms_rope(sources, weights, eps, cos, sin, bound)


@rms_rope_e4m3.register_fake
def _(sources, weights, eps, cos, sin, bound):
    b, _, h, d = sources[0].shape
    return sources[0].new_empty(b, cos.shape[0], h, d, dtype=torch.float8_e4m3fn)


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


def quantize_cat_activation(x: Optional[torch.Tensor], x2: torch.Tensor, h: Optional[torch.Tensor], group_size: int,
                            bits: int, order: str = "natural") -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_activation of cat([x, x2], -1) (x may be None) without materializing it: the compiler pass
    inserts it where a concatenation feeds a quantized linear. x2 may be a column slice of a larger tensor:
    its rows are read in place."""
    return torch.ops.convrot.rotate_quantize_cat(None if x is None else _strided_rows(x), _strided_rows(x2), h,
                                                 group_size, bits, order)


def quantize_e4m3_activation(x8: torch.Tensor, descale: torch.Tensor, x2: Optional[torch.Tensor],
                             h: Optional[torch.Tensor], group_size: int, bits: int, order: str,
                             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_cat_activation of (dequantize_e4m3(x8, descale, dtype), x2) (x2 may be None), reading x8 as it is:
    the compiler pass inserts it where fp8 attention's output feeds a quantized linear."""
    return torch.ops.convrot.rotate_quantize_e4m3(_strided_rows(x8), descale, None if x2 is None else _strided_rows(x2),
                                                  h, group_size, bits, order, dtype)


def quantize_adaln_activation(x: torch.Tensor, x2: Optional[torch.Tensor], scale: torch.Tensor, shift: torch.Tensor,
                              eps: float, h: Optional[torch.Tensor], group_size: int, bits: int,
                              order: str = "natural") -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_activation of ``layer_norm(cat([x, x2], 1)) * (1 + scale[:, None]) + shift[:, None]`` (x2 may be
    None) without writing the normalized rows: the compiler pass inserts it where a DiT block's adaLN normalization
    feeds quantized linears (compiler/producers.py)."""
    return torch.ops.convrot.rotate_quantize_adaln(x.contiguous(), None if x2 is None else x2.contiguous(), scale,
                                                   shift, float(eps), h, group_size, bits, order)


def quantized_matmul(q: torch.Tensor, s: torch.Tensor, x: torch.Tensor, values, scale, bias, scheme: str,
                     group_size: int, out_features: int, gelu_from: Optional[int] = None,
                     dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The second half: the GEMM on quantized activations (q, s) of x (read for its shape and dtype; ``dtype``
    instead where x is e4m3 that widened to it).
    values, scale and bias may be lists, one entry per linear reading x: one GEMM then computes all
    of them, their outputs side by side in the last dimension (out_features in total).
    ``gelu_from``: GELU (tanh form) on output columns >= gelu_from, in the GEMM's epilogue."""
    values, scale, bias = _as_list(values), _as_list(scale), _as_list(bias)
    out = torch.ops.convrot.int_gemm(q, s, values, scale, bias, scheme == "w4a4", group_size, dtype or x.dtype,
                                     gelu_from)
    return out.reshape(*x.shape[:-1], out_features)


def quantized_linear(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, h: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], scheme: str, group_size: int, out_features: int,
                     order: str = "natural") -> torch.Tensor:
    """y = x W^T + b through the custom ops, from a weight's prepared tensors (QuantizedWeight.values
    and .scale, input channels in ``order``: its act_order) and the rotation's ``kernel_matrix()``."""
    if scheme in WEIGHT_ONLY:
        out = torch.ops.convrot.weight_only_gemm(_rows(x), values, scale, bias, group_size, SCHEME_BITS[scheme][0])
        return out.reshape(*x.shape[:-1], out_features)
    q, s = quantize_activation(x, h, group_size, 4 if scheme == "w4a4" else 8, order)
    return quantized_matmul(q, s, x, values, scale, bias, scheme, group_size, out_features)


def pca_quantize_activation(x: torch.Tensor, basis: torch.Tensor, h: Optional[torch.Tensor], rank: int,
                            group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DiRotQ's first half on x [..., K] as rows: shared by every linear reading x (one basis per input)."""
    return torch.ops.convrot.pca_rotate_quantize(_rows(x), basis, h, rank, group_size)


def pca_matmul_like(zqs, x: torch.Tensor, w_hi: torch.Tensor, values: torch.Tensor, scale: torch.Tensor,
                    bias: Optional[torch.Tensor], group_size: int, out_features: int) -> torch.Tensor:
    """DiRotQ's second half on ``pca_quantize_activation``'s result, shaped like x [..., out_features]."""
    z_hi, q, s = zqs
    out = torch.ops.convrot.pca_gemm(z_hi, q, s, w_hi, values, scale, bias, group_size)
    return out.reshape(*x.shape[:-1], out_features)


def pca_linear(x: torch.Tensor, basis: torch.Tensor, h: Optional[torch.Tensor], w_hi: torch.Tensor,
               values: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], rank: int, group_size: int,
               out_features: int) -> torch.Tensor:
    """y = x W^T + b for a DiRotQ weight (numerics.pca.PCAWeight's tensors) through the custom ops."""
    zqs = pca_quantize_activation(x, basis, h, rank, group_size)
    return pca_matmul_like(zqs, x, w_hi, values, scale, bias, group_size, out_features)


def fp8_scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                     attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                                     scale: float | None = None, enable_gqa: bool = False,
                                     query_bound: torch.Tensor | float | None = None,
                                     key_bound: torch.Tensor | float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention``'s signature, computed as the compiler pass rewrites it (quantize Q,
    K, V; ``convrot::fp8_attention``; dequantize to the query's dtype): to run an eager model the same way.
    ``query_bound``, ``key_bound``: proven bounds on |Q| and |K| that scale them instead of their absmax
    (numerics.fp8_attention.quantize_e4m3)."""
    if attn_mask is not None or dropout_p != 0 or is_causal or enable_gqa:
        raise ValueError("fp8 attention takes no mask, dropout, causal mask or grouped heads")
    q8, dq = quantize_e4m3(query, query_bound)
    k8, dk = quantize_e4m3(key, key_bound)
    return fp8_attention_from_e4m3(q8, dq, k8, dk, value, scale)


def fp8_attention_e4m3_output(q8: torch.Tensor, descale_q: torch.Tensor, k8: torch.Tensor, descale_k: torch.Tensor,
                              value: torch.Tensor, scale: float | None = None,
                              value_bound: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 attention on Q and K already in e4m3 ([B, H, S, D] with their descales), V in 16 bits: V quantized by
    ``value_bound`` (a proven bound on |V|) or else its absmax, ``convrot::fp8_attention``. Returns the e4m3 output
    and its descale (V's)."""
    v8, dv = quantize_e4m3(value, value_bound)
    o8 = torch.ops.convrot.fp8_attention(q8, k8, v8, descale_q, descale_k, dv, inverse_descale(dv),
                                         default_softmax_scale(q8.shape[-1], scale))
    return o8, dv


def fp8_attention_from_e4m3(q8: torch.Tensor, descale_q: torch.Tensor, k8: torch.Tensor, descale_k: torch.Tensor,
                            value: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``fp8_attention_e4m3_output``, its output dequantized to V's dtype."""
    o8, dv = fp8_attention_e4m3_output(q8, descale_q, k8, descale_k, value, scale)
    return dequantize_e4m3(o8, dv, value.dtype)


def rms_rope_16bit(sources: list[torch.Tensor], weights: list[Optional[torch.Tensor]], eps: list[float],
                   cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``convrot::rms_rope``: FLUX's Q or K [B, S, H, D] in the sources' dtype, for an attention kept in 16 bits."""
    return torch.ops.convrot.rms_rope(sources, weights, eps, cos, sin)


def rms_rope_quantize_e4m3(sources: list[torch.Tensor], weights: list[Optional[torch.Tensor]], eps: list[float],
                           cos: torch.Tensor, sin: torch.Tensor,
                           bound: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """``convrot::rms_rope_e4m3`` and its descale, bound / 448, as ``quantize_e4m3`` returns them: the e4m3
    [B, S, H, D] tensor and a float32 tensor of one element."""
    bound = torch.as_tensor(bound, dtype=torch.float32, device=sources[0].device).reshape(1)
    return torch.ops.convrot.rms_rope_e4m3(sources, weights, eps, cos, sin, bound), bound / E4M3_MAX
