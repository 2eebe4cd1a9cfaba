"""The quantized ops as ``torch.ops.convrot.*`` custom ops (custom_ops.py: a plain-torch reference on any
device, a fake for tracing, a CUDA implementation), the functions the compiler and the eager modules call
them through, and the one place that picks a kernel for each (dispatch.py)."""

from .custom_ops import (
                         fp8_attention_e4m3_output,
                         fp8_attention_from_e4m3,
                         fp8_scaled_dot_product_attention,
                         pca_linear,
                         pca_matmul_like,
                         pca_quantize_activation,
                         quantize_activation,
                         quantize_adaln_activation,
                         quantize_cat_activation,
                         quantize_e4m3_activation,
                         quantized_linear,
                         quantized_matmul,
                         rms_rope_16bit,
                         rms_rope_quantize_e4m3,
)

__all__ = ["fp8_attention_e4m3_output", "fp8_attention_from_e4m3", "fp8_scaled_dot_product_attention", "pca_linear",
           "pca_matmul_like", "pca_quantize_activation", "quantize_activation", "quantize_adaln_activation",
           "quantize_cat_activation",
           "quantize_e4m3_activation", "quantized_linear", "quantized_matmul", "rms_rope_16bit",
           "rms_rope_quantize_e4m3"]
