"""Gluon kernels for Hopper (sm_90): rotate+quantize with the row kept on chip, the W4A4 GEMM on packed
weights split in registers, the tensor-core weight-only int4 GEMM."""
