"""``convrot::scaled_int_mm`` lowered through Inductor's Triton-template machinery.

The opaque ``convrot::int_gemm`` op is a wall for Inductor: the bias is in the
kernel, but the adaLN gate multiply, the residual add or the GELU that follow a
FLUX linear run as separate kernels that read the GEMM's output back. Lowered as
a ``TritonTemplate`` (as Inductor's own ``tuned_int_mm`` / ``tuned_scaled_mm``
do), the GEMM becomes a template buffer, and Inductor's scheduler fuses the
pointwise ops that consume it into the template's store (epilogue fusion).

Everything here uses private Inductor APIs that move between releases
(``TritonTemplate``, ``autotune_select_algorithm``, ``register_lowering``,
``fallback_handler``, ``ir.FixedLayout``, ``SymbolicGridFn``); they are imported
only inside this module and only when ``register()`` is called. Checked against
torch 2.11 (the GPU image) and 2.13 (CPU). The opaque op stays the default
(compile option ``gemm="kernel"``); ``gemm="template"`` opts in.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from .int_gemm import GEMM_TILES

# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps): the int8 GEMM's autotune list, rows and columns
# swapped since the template computes C = X W^T with X as the first operand.
CONFIGS = [(bm, bn, bk, stages, warps) for bn, bm, bk, stages, warps in GEMM_TILES]
QUICK_CONFIG = (128, 128, 64, 5, 4)

TEMPLATE_NAME = "convrot_scaled_int_mm"

# X [M, K] int8 and W [N, K] int8, both with unit stride along K; K a multiple of BLOCK_K (K is
# padded to the 256-channel rotation group). Only def_kernel / size / stride / store_output are
# used: the template helpers that have kept their form across torch releases.
SOURCE = r"""
{{def_kernel("X", "W", "SX", "SW")}}
    M = {{size("X", 0)}}
    N = {{size("W", 0)}}
    K = {{size("X", 1)}}
    stride_xm = {{stride("X", 0)}}
    stride_wn = {{stride("W", 0)}}

    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group_id = pid // width
    group_size = min(grid_m - group_id * GROUP_M, GROUP_M)
    pid_m = group_id * GROUP_M + (pid % group_size)
    pid_n = (pid % width) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = X + (rm % M)[:, None].to(tl.int64) * stride_xm + rk[None, :]
    w_ptrs = W + (rn % N)[:, None].to(tl.int64) * stride_wn + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kb in range(0, K, BLOCK_K):
        acc = tl.dot(tl.load(x_ptrs), tl.trans(tl.load(w_ptrs)), acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    sx = tl.load(SX + rm, mask=rm < M, other=0.0)
    sw = tl.load(SW + rn, mask=rn < N, other=0.0)
    out = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    idx_m = rm[:, None]
    idx_n = rn[None, :]
    mask = (idx_m < M) & (idx_n < N)
    {{store_output(("idx_m", "idx_n"), "out", "mask", val_shape=("BLOCK_M", "BLOCK_N"))}}
"""


def available() -> str | None:
    """None when this torch's Inductor has what the lowering needs, else why not."""
    try:
        from torch._inductor import ir  # noqa: F401
        from torch._inductor.lowering import fallback_handler, register_lowering  # noqa: F401
        from torch._inductor.select_algorithm import (  # noqa: F401
            SymbolicGridFn, TritonTemplate, autotune_select_algorithm)
    except ImportError as e:
        return f"torch {torch.__version__} lacks an Inductor API the template lowering uses ({e})"
    return None


def configs() -> list[tuple[int, int, int, int, int]]:
    """The template's autotune candidates; one under ``CONVROT_AUTOTUNE=quick`` (GPU tests)."""
    return [QUICK_CONFIG] if os.environ.get("CONVROT_AUTOTUNE", "full") == "quick" else list(CONFIGS)


@functools.cache
def _template():
    from torch._inductor.select_algorithm import SymbolicGridFn, TritonTemplate

    @SymbolicGridFn
    def grid(m, n, meta, *, cdiv):
        return (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]), 1, 1)

    return TritonTemplate(name=TEMPLATE_NAME, grid=grid, source=SOURCE)


def _lower_scaled_int_mm(qx, sx, w, sw, group_size, out_dtype):
    from torch._inductor import ir
    from torch._inductor.lowering import fallback_handler
    from torch._inductor.select_algorithm import autotune_select_algorithm

    op = torch.ops.convrot.scaled_int_mm.default
    m, k = qx.get_size()
    n = w.get_size()[0]
    static = all(isinstance(d, int) or getattr(d, "is_number", False) for d in (m, n, k))
    if qx.get_device().type == "cuda" and not static:
        warnings.warn(f"convrot gemm='template': GEMM M={m}, N={n}, K={k} has symbolic sizes (dynamic shapes); "
                      "it runs the opaque GEMM kernel, without epilogue fusion. Compile with dynamic=False to "
                      "get the template.", stacklevel=2)
    if qx.get_device().type != "cuda" or not static or int(m) * int(n) == 0:
        # CPU (the reference op), symbolic or empty shapes: the opaque op
        return fallback_handler(op, add_to_fallback_set=False)(qx, sx, w, sw, group_size, out_dtype)
    inputs = [ir.ExternKernel.require_contiguous(ir.ExternKernel.realize_input(t)) for t in (qx, w, sx, sw)]
    layout = ir.FixedLayout(qx.get_device(), out_dtype, [m, n])
    choices: list = []
    errors = []
    for bm, bn, bk, stages, warps in configs():
        if int(k) % bk:
            continue
        err = _template().maybe_append_choice(choices, input_nodes=tuple(inputs), layout=layout, num_stages=stages,
                                              num_warps=warps, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
        if err is not None:
            errors.append(f"{(bm, bn, bk, stages, warps)}: {err}")
    if not choices:
        raise RuntimeError(f"convrot template GEMM: no config generated for M={m}, N={n}, K={k} "
                           f"({'; '.join(errors) or 'no config divides K'}); compile with gemm='kernel'")
    return autotune_select_algorithm(TEMPLATE_NAME, choices, inputs, layout)


_registered = False


def register() -> None:
    """Route ``convrot::scaled_int_mm`` through the template lowering in every later Inductor compile
    (idempotent). On CPU tensors the lowering emits the opaque op, so CPU compiles are unaffected."""
    global _registered
    if _registered:
        return
    why = available()
    if why:
        raise RuntimeError(f"gemm='template' needs Inductor's template machinery: {why}; use gemm='kernel'")
    from torch._inductor.lowering import register_lowering

    import convrot_compiler.ops  # noqa: F401  (defines torch.ops.convrot.*)

    register_lowering(torch.ops.convrot.scaled_int_mm.default, type_promotion_kind=None)(_lower_scaled_int_mm)
    _registered = True


def is_registered() -> bool:
    return _registered
