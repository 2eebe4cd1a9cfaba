"""Helpers shared by the Gluon kernels (sm_90): a Gluon function cannot call a Triton one."""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def gelu_tanh(x):
    """common.gelu_tanh's GPU form on float32: 0.5 x (1 + tanh(u)) with the hardware tanh (tanh.approx.f32;
    its error bound is discussed there)."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    t = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [u], dtype=gl.float32, is_pure=True, pack=1)
    return 0.5 * x * (1.0 + t)
