"""How fast a GPU can read a buffer of a given size, back to back as a model's kernels run: the ceiling of a
memory-bound kernel such as a GEMV at M = 1, which must read its whole weight once.

A plain Triton kernel XOR-reduces the buffer (so nothing is optimised away) over a sweep of launch shapes:
contiguous slabs of one per program or a grid stride, 1-16 programs per SM, 4-16 KB per program per step. The
fastest is the ceiling: a GEMV over the same bytes cannot beat it by more than what its launch shape does better.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from timing import bench_graph_per_call_ms  # benchmarks/timing.py


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _read_slabs(p_ptr, o_ptr, n, per_program, BLOCK: tl.constexpr):
    """Program p XOR-reduces words [p * per_program, (p + 1) * per_program) of the int64 buffer."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * per_program
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.int64)
    for i in range(0, per_program, BLOCK):
        idx = start + i + offs
        acc ^= tl.load(p_ptr + idx, mask=(i + offs < per_program) & (idx < n), other=0)
    tl.store(o_ptr + pid, tl.reduce(acc, 0, _xor))


@triton.jit
def _read_strided(p_ptr, o_ptr, n, BLOCK: tl.constexpr):
    """Program p XOR-reduces blocks p, p + programs, p + 2 programs, ... of the int64 buffer."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.int64)
    for i in range(pid * BLOCK, n, step):
        acc ^= tl.load(p_ptr + i + offs, mask=i + offs < n, other=0)
    tl.store(o_ptr + pid, tl.reduce(acc, 0, _xor))


@dataclass(frozen=True)
class ReadShape:
    strided: bool
    programs_per_sm: int
    block: int       # int64 words per program per step
    warps: int

    def __str__(self) -> str:
        order = "strided" if self.strided else "slabs"
        return f"{order}, {self.programs_per_sm}/SM, {self.block * 8 // 1024} KB, {self.warps} warps"


SHAPES = [ReadShape(s, p, b, w) for s in (False, True) for p in (1, 2, 4, 8, 16)
          for b, w in ((512, 4), (1024, 4), (1024, 8), (2048, 8))]


def read_xor(buf: torch.Tensor, shape: ReadShape, out: torch.Tensor | None = None) -> torch.Tensor:
    """XOR of every int64 word of ``buf`` per program: [programs] int64."""
    words = buf.view(torch.int64).reshape(-1)
    programs = shape.programs_per_sm * torch.cuda.get_device_properties(buf.device).multi_processor_count
    if out is None:
        out = torch.empty(programs, dtype=torch.int64, device=buf.device)
    n = words.numel()
    if shape.strided:
        _read_strided[(programs,)](words, out, n, BLOCK=shape.block, num_warps=shape.warps)
    else:
        _read_slabs[(programs,)](words, out, n, triton.cdiv(n, programs), BLOCK=shape.block, num_warps=shape.warps)
    return out


def read_ceiling_us(buffers: list[torch.Tensor], shapes: list[ReadShape] = SHAPES) -> tuple[float, ReadShape]:
    """The fastest back-to-back read (us per buffer) of ``buffers`` (distinct, equal sizes, each a multiple of 8
    bytes) over ``shapes``, and the shape that gave it. Each shape's result is checked against the XOR computed
    by torch ops (``_xor_all``)."""
    if len({b.numel() * b.element_size() for b in buffers}) != 1:
        raise ValueError("read_ceiling_us takes buffers of one size")
    words = buffers[0].view(torch.int64).reshape(-1)
    expected = _xor_all(words)
    best: tuple[float, ReadShape] | None = None
    for shape in shapes:
        first = read_xor(buffers[0], shape)
        if _xor_all(first) != expected:
            raise AssertionError(f"the read kernel ({shape}) disagrees with torch")
        outs = [first] + [torch.empty_like(first) for _ in buffers[1:]]
        us = 1e3 * bench_graph_per_call_ms([lambda b=b, o=o: read_xor(b, shape, o) for b, o in zip(buffers, outs)])
        if best is None or us < best[0]:
            best = (us, shape)
    assert best is not None
    return best


def _xor_all(words: torch.Tensor) -> int:
    """XOR of all int64 words, by halving (torch has no XOR reduction)."""
    w = words.reshape(-1)
    while w.numel() > 1:
        if w.numel() % 2:
            w = torch.cat([w, w.new_zeros(1)])
        w = w[0::2] ^ w[1::2]
    return int(w.item()) if w.numel() else 0
