"""A fused GEMM's scales and biases joined once (ops/joined_vectors.py): reused while the parts live unchanged,
joined again the moment one changes, is replaced or dies; through dispatch.int_gemm (on CPU through Triton's
interpreter), a changed scale shows in the next result."""

import gc

import torch

from convrot_compiler.numerics.quant import pack_int4
from convrot_compiler.ops import custom_ops, dispatch
from convrot_compiler.ops.joined_vectors import JoinedVectors

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _counting_cat(parts, calls):
    def join():
        calls.append(1)
        return torch.cat(parts)
    return join


def test_a_join_is_kept_while_its_parts_are_unchanged():
    joined, calls = JoinedVectors(), []
    a, b = torch.ones(3), torch.arange(2.0)
    first = joined.get([a, b], _counting_cat([a, b], calls))
    assert joined.get([a, b], _counting_cat([a, b], calls)) is first and len(calls) == 1
    assert torch.equal(first, torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0]))
    b.mul_(3)  # in place: its version counter moves
    again = joined.get([a, b], _counting_cat([a, b], calls))
    assert len(calls) == 2 and torch.equal(again, torch.tensor([1.0, 1.0, 1.0, 0.0, 3.0]))
    other = b.clone()  # equal values, another tensor
    joined.get([a, other], _counting_cat([a, other], calls))
    assert len(calls) == 3
    joined.get([other, a], _counting_cat([other, a], calls))  # the order is part of the join
    assert len(calls) == 4


def test_a_join_goes_when_a_part_dies():
    joined = JoinedVectors()
    parts = [torch.ones(3), torch.ones(2)]
    joined.get(parts, lambda: torch.cat(parts))
    assert len(joined) == 1
    parts.pop()
    gc.collect()
    assert len(joined) == 0


def test_missing_biases_and_inference_tensors_are_joined_every_time():
    joined, calls = JoinedVectors(), []

    def none():
        calls.append(1)
        return None
    assert joined.get([None, None], none) is None and joined.get([None, None], none) is None
    assert len(calls) == 2 and len(joined) == 0
    with torch.inference_mode():
        a, b = torch.ones(3), torch.ones(2)  # no version counter: an in-place change would go unseen
    joined.get([a, b], _counting_cat([a, b], calls))
    joined.get([a, b], _counting_cat([a, b], calls))
    assert len(calls) == 4 and len(joined) == 0
    bias = torch.ones(3)
    kept = joined.get([bias, None], lambda: torch.cat([bias, torch.zeros(2)]))  # a linear without a bias
    assert joined.get([bias, None], lambda: None) is kept


def test_fused_gemm_reads_a_changed_scale():
    """dispatch.int_gemm of two linears: equal to the reference, on repeated calls and after one linear's scales
    change in place (the kept join would otherwise be stale)."""
    g = torch.Generator().manual_seed(0)
    m, k = 8, 256
    qx = torch.randint(-7, 8, (m, k), generator=g, dtype=torch.int8).to(DEV)
    sx = (torch.rand(m, generator=g) + 0.5).to(DEV)
    qws = [pack_int4(torch.randint(-7, 8, (n, k), generator=g, dtype=torch.int8), 256).to(DEV) for n in (16, 32)]
    sws = [(torch.rand(n, generator=g) + 0.5).to(DEV) for n in (16, 32)]
    biases = [torch.randn(16, generator=g).to(DEV), None]

    def check():
        ref = custom_ops.int_gemm_reference(qx, sx, qws, sws, biases, True, 256, torch.float32)
        out = dispatch.int_gemm(qx, sx, qws, sws, biases, True, 256, torch.float32)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        return out

    before = check()
    check()
    sws[1].mul_(2)
    after = check()
    assert torch.equal(after[:, :16], before[:, :16]) and not torch.allclose(after[:, 16:], before[:, 16:])
