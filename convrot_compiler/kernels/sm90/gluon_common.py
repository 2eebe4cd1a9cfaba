"""Helpers shared by the Gluon kernels (sm_90): a Gluon function cannot call a Triton one.

``tma_load``, ``tma_store``, ``smem_reinterpret`` and ``thread_barrier`` are Gluon calls under the names of the
installed Triton: 3.6 calls them ``tma.async_copy_global_to_shared``, ``tma.async_copy_shared_to_global``, a
shared-memory descriptor's ``_reinterpret`` and ``gl.thread_barrier``; later releases (3.9) ``tma.async_load``,
``tma.async_store`` (the old names then raise), ``reinterpret`` and ``gl.barrier``, with the same arguments.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import tma

tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
thread_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


@gluon.jit
def _reinterpret_private(desc, dtype: gl.constexpr, shape: gl.constexpr, layout: gl.constexpr):
    return desc._reinterpret(dtype, shape, layout)


@gluon.jit
def _reinterpret_public(desc, dtype: gl.constexpr, shape: gl.constexpr, layout: gl.constexpr):
    return desc.reinterpret(dtype, shape, layout)


smem_reinterpret = (_reinterpret_public if hasattr(gl.shared_memory_descriptor, "reinterpret")
                    else _reinterpret_private)


@gluon.jit
def gelu_tanh(x):
    """common.gelu_tanh's GPU form on float32: 0.5 x (1 + tanh(u)) with the hardware tanh (tanh.approx.f32;
    its error bound is discussed there)."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    t = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [u], dtype=gl.float32, is_pure=True, pack=1)
    return 0.5 * x * (1.0 + t)
