"""Triton kernels: rotate+quantize, the int8 GEMM on unpacked int4 weights, the weight-only int4 GEMM."""
