"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_configs(gpu: list[triton.Config], interpreter: triton.Config,
                     quick: triton.Config | None = None) -> list[triton.Config]:
    """The configs a kernel autotunes over.

    The interpreter cannot autotune over several configs: it gets one small config.
    ``CONVROT_AUTOTUNE=quick`` (read at import) takes one config (``quick``, else the first
    GPU config) so that GPU correctness tests do not spend minutes autotuning."""
    if interpreting():
        return [interpreter]
    if os.environ.get("CONVROT_AUTOTUNE", "full") == "quick":
        return [quick or gpu[0]]
    return gpu


def check_device(*tensors: torch.Tensor | None) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors only under the interpreter. None (an absent bias) passes."""
    for t in tensors:
        if t is not None and t.device.type != "cuda" and not interpreting():
            raise ValueError(
                f"a Triton kernel got a {t.device.type} tensor; pass CUDA tensors, use the reference ops "
                "(convrot_compiler.ops) on CPU, or set TRITON_INTERPRET=1 to run the kernel in the interpreter")


class ForcedChoice:
    """A module-wide choice (a kernel, a schedule) that a ``with forced(choice):`` block sets and
    restores on exit; ``value`` is None outside any block. For benchmarks and tests that compare the
    choices in one process."""

    def __init__(self, what: str, choices: tuple[str, ...]):
        self.what, self.choices, self.value = what, choices, None

    @contextlib.contextmanager
    def forced(self, choice: str) -> Iterator[None]:
        if choice not in self.choices:
            raise ValueError(f"{self.what} must be one of {self.choices}, got {choice!r}")
        before, self.value = self.value, choice
        try:
            yield
        finally:
            self.value = before


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device: the grid of the persistent kernels."""
    return _sm_count(torch.cuda.current_device() if device.index is None else device.index)


def check_dense_vector(name: str, v: torch.Tensor) -> None:
    """The kernels read a vector's element i at offset i: a strided view would be read wrong, not refused."""
    if v.numel() > 1 and v.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous (stride 1), got stride {v.stride(0)}: pass .contiguous()")


def check_2d_rows(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (call .contiguous()), got strides {t.stride()}")


@triton.jit
def round_half_even(y):
    """Round to nearest, ties to even, as torch.round (libdevice.rint is not in the interpreter)."""
    f = tl.floor(y)
    d = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def round_to_float_grid(v, STEP: tl.constexpr, MIN_ULP: tl.constexpr):
    """float32 ``v`` rounded to nearest, ties to even, on the grid of a narrower float format: STEP = 2^-m for m
    stored mantissa bits, MIN_ULP its subnormal step (bf16: 2^-7, 2^-133; e4m3: 2^-3, 2^-9). What a cast to
    that format computes, spelled out for the interpreter, whose casts to bf16 and e4m3 do not round to
    nearest. Finite values within the format's range only."""
    pow2 = (tl.abs(v).to(tl.uint32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    ulp = tl.maximum(pow2 * STEP, MIN_ULP)
    return round_half_even(v / ulp) * ulp


@triton.jit
def tanh_approx(x):
    """tanh by the GPU's special-function unit (PTX tanh.approx.f32, sm_75+: maximum relative error
    about 2^-11, PTX ISA). One MUFU instruction, where exp + division take two. GPU only: the
    interpreter has no inline assembly."""
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def gelu_tanh(x, FAST: tl.constexpr):
    """GELU, tanh approximation, in float32: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3).

    FAST (GPU only) takes tanh from tanh_approx: by the PTX bound, absolute error at most about
    2^-12 |x|, below half a bf16 step of the result for x > 0 and far below the absmax/7 steps in
    which the W4A4 linear reading it quantizes; an H100 measured 5.6e-6 at most on outputs up to
    4.4, near float32 rounding. Otherwise the
    exact form x / (1 + exp(-2u)) (the same function: 1 + tanh(u) = 2 / (1 + exp(-2u))), which has
    no cancellation where tanh(u) is near -1 and needs no libdevice tanh (not in the interpreter)."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    if FAST:
        g = 0.5 * x * (1.0 + tanh_approx(u))
    else:
        g = x / (1.0 + tl.exp(-2.0 * u))
    return g
