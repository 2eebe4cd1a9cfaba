"""The adaLN normalization computed by the rotate+quantize after it (option ``fuse_norms``), on CPU."""

import operator

import pytest
import torch
from torch import nn

import convrot_compiler as cc
from convrot_compiler.compiler.backend import REPORTS
from convrot_compiler.compiler.producers import match_adaln_producer
from convrot_compiler.numerics.adaln import adaln_reference, adaln_rows_reference
from convrot_compiler.numerics.hadamard import hadamard_matrix
from convrot_compiler.ops import custom_ops, dispatch, quantize_adaln_activation
from convrot_compiler.tools.inspection import InspectReport
from convrot_compiler.tools.models import build_flux, make_flux_inputs, relative_error

pytestmark = pytest.mark.usefixtures("fresh_dynamo", "no_grad")


def test_adaln_reference_is_the_chain_in_float32_rounded_once():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 5, 64, generator=g) * 3 + 7).bfloat16()
    scale, shift = torch.randn(2, 64, generator=g).bfloat16(), torch.randn(2, 64, generator=g).bfloat16()
    xd = x.double()
    mean = xd.mean(-1, keepdim=True)
    exact = (xd - mean) / torch.sqrt(((xd - mean) ** 2).mean(-1, keepdim=True) + 1e-6)
    exact = exact * (1 + scale.double()[:, None]) + shift.double()[:, None]
    out = adaln_reference(x, scale, shift, 1e-6)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), exact, rtol=2 ** -8, atol=1e-6)  # one bf16 rounding
    rows = adaln_rows_reference(x[:, :2], x[:, 2:], scale, shift, 1e-6)
    assert torch.equal(rows, out.reshape(10, 64))
    with pytest.raises(ValueError, match=r"scale and shift \[B, K\]"):
        adaln_reference(x, scale[:1], shift, 1e-6)


@pytest.mark.parametrize("two_parts", [False, True])
def test_dispatch_normalizes_then_runs_triton_where_gluon_cannot(two_parts):
    """Off sm_90 (here: the interpreter) the op normalizes with torch, then runs the Triton rotate+quantize: equal to
    the reference bit for bit."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 3, 512, generator=g) * 2).bfloat16()
    x2 = (torch.randn(2, 4, 512, generator=g) * 2).bfloat16() if two_parts else None
    emb = torch.randn(2, 1536, generator=g).bfloat16()
    shift, scale = emb[:, :512], emb[:, 512:1024]
    h = hadamard_matrix("regular", 16)
    q, s = dispatch.rotate_quantize_adaln(x, x2, scale, shift, 1e-6, h, 256, 4)
    q_ref, s_ref = custom_ops.rotate_quantize_adaln(x, x2, scale, shift, 1e-6, h, 256, 4)
    assert q.shape == (2 * (3 + (4 if two_parts else 0)), 512)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def _count(gm, target) -> int:
    return sum(n.op == "call_function" and n.target is target for n in gm.graph.nodes)


def test_flux_blocks_compute_their_adaln_normalization_inside_rotate_quantize():
    """flux-tiny compiled one graph per block class: a double block's norm1 of each stream and a single block's norm
    (over its text and image tokens together) normalize the block's inputs, and each is read by one
    ``rotate_quantize_adaln``, its LayerNorm gone from the graph; the double blocks' norm2, of the gated residual the
    graph computes, stays with Inductor. The output is within the rounding the fused chain saves of the unfused
    graphs'."""
    model = build_flux("flux-tiny", seed=4)
    kwargs = make_flux_inputs(model, 128, 128, 16, seed=4).kwargs
    plain_graphs, graphs = [], []
    plain = cc.compile(build_flux("flux-tiny", seed=4), plan="w4a4", progress=False,
                       report=plain_graphs.append)(**kwargs)
    torch._dynamo.reset()
    out = cc.compile(model, plan="w4a4", progress=False, fuse_norms=True, report=graphs.append)(**kwargs)
    layer_norm = torch.nn.functional.layer_norm
    by_class = {}
    for before, report in zip(plain_graphs, graphs):
        assert report.plan == before.plan
        gm = report.graph_modules["after"]
        fused = _count(gm, quantize_adaln_activation)
        assert report.fused_norms == fused
        assert _count(gm, layer_norm) == _count(before.graph_modules["after"], layer_norm) - fused
        two_part = [n for n in gm.graph.nodes if n.target is quantize_adaln_activation and n.args[1] is not None]
        by_class.setdefault(report.plan, set()).add((fused, len(two_part), _count(gm, layer_norm)))
    assert by_class["w4a4 (FluxTransformerBlock)"] == {(2, 0, 2)}
    assert by_class["w4a4 (FluxSingleTransformerBlock)"] == {(1, 1, 0)}
    assert by_class["w4a4 (norm_out)"] == {(0, 0, 1)}  # the output projection it feeds stays in bf16
    assert 0 < relative_error(out[0], plain[0]) < 2e-2
    fused = sum(r.fused_norms for r in graphs)
    assert f"; {fused} adaLN normalizations computed by their rotate+quantize" in InspectReport(graphs).summary()
    assert "adaLN" not in InspectReport(plain_graphs).summary()


class _NormThenLinear(nn.Module):
    """adaLN, a linear on it, and (``also_returned``) the normalized activations returned beside it."""

    def __init__(self, k=512, affine=False, also_returned=False):
        super().__init__()
        self.norm = nn.LayerNorm(k, elementwise_affine=affine, eps=1e-6)
        self.mod = nn.Linear(k, 2 * k)
        self.proj = nn.Linear(k, k)
        self.also_returned = also_returned

    def forward(self, x, temb):
        shift, scale = self.mod(temb).chunk(2, dim=1)
        h = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        return (self.proj(h), h) if self.also_returned else self.proj(h)


@pytest.mark.parametrize("affine,also_returned,fused", [(False, False, 1), (True, False, 0), (False, True, 0)])
def test_only_an_adaln_normalization_read_by_quantized_linears_alone_is_fused(affine, also_returned, fused):
    """A LayerNorm with its own weight is not adaLN's; normalized activations something else reads must still be
    written: neither is fused, and each graph computes what its eager modules do."""
    torch.manual_seed(0)
    model = _NormThenLinear(affine=affine, also_returned=also_returned).bfloat16()
    x, temb = torch.randn(2, 8, 512).bfloat16(), torch.randn(2, 512).bfloat16()
    cc.compile(model, plan=[("proj", "w4a4"), ("*", "bf16")], progress=False, fuse_norms=True)(x, temb)
    assert REPORTS[-1].fused_norms == fused


def test_the_matcher_wants_per_sample_scale_and_shift():
    g = torch.fx.Graph()
    x, scale, shift = g.placeholder("x"), g.placeholder("scale"), g.placeholder("shift")
    ln = g.call_function(torch.nn.functional.layer_norm, (x, (512,), None, None, 1e-6))
    s3 = g.call_function(operator.getitem, (scale, (slice(None, None, None), None)))
    t3 = g.call_function(operator.getitem, (shift, (slice(None, None, None), None)))
    one_plus = g.call_function(operator.add, (1, s3))
    out = g.call_function(operator.add, (g.call_function(operator.mul, (ln, one_plus)), t3))
    for n, v in ((x, torch.empty(2, 8, 512)), (scale, torch.empty(2, 512)), (shift, torch.empty(2, 512))):
        n.meta["example_value"] = v
    found = match_adaln_producer(out)
    assert (found.tokens, found.x, found.x2, found.scale, found.shift, found.eps) == (x, x, None, scale, shift, 1e-6)
    shift.meta["example_value"] = torch.empty(2, 256)  # not one shift per channel
    assert match_adaln_producer(out) is None
    shift.meta["example_value"] = torch.empty(2, 512)
    doubled = g.call_function(operator.add, (2, s3))  # (2 + scale) is not adaLN's
    wrong = g.call_function(operator.add, (g.call_function(operator.mul, (ln, doubled)), t3))
    assert match_adaln_producer(wrong) is None


def test_the_fused_op_compiles_with_inductor():
    """The op's fake (the rows of both token ranges; scale and shift strided chunks of one modulation output) as
    Inductor plans it: the rewritten graph compiled by Inductor on CPU computes what it computes uncompiled."""
    def model():
        torch.manual_seed(1)
        return _NormThenLinear().bfloat16()

    x, temb = torch.randn(2, 8, 512).bfloat16(), torch.randn(2, 512).bfloat16()
    plan = [("proj", "w4a4"), ("*", "bf16")]
    out = cc.compile(model(), plan=plan, progress=False, fuse_norms=True, inductor=True)(x, temb)
    assert REPORTS[-1].fused_norms == 1
    torch._dynamo.reset()
    plain = cc.compile(model(), plan=plan, progress=False, fuse_norms=True, inductor=False)(x, temb)
    assert REPORTS[-1].fused_norms == 1
    torch.testing.assert_close(out, plain, rtol=2e-2, atol=2e-2)


def test_a_normalization_the_kernel_cannot_take_stays_with_inductor_and_says_why(monkeypatch):
    """Where the sm_90 kernel cannot run (here said so by a stand-in for dispatch's check), the normalization stays in
    the graph and a warning says how many and why, instead of the option doing nothing silently."""
    from convrot_compiler.compiler import rewrite

    monkeypatch.setattr(rewrite, "adaln_fusion_unsupported", lambda device, dtype, k: "its kernel is for sm_90 only")
    torch.manual_seed(0)
    model = _NormThenLinear().bfloat16()
    x, temb = torch.randn(2, 8, 512).bfloat16(), torch.randn(2, 512).bfloat16()
    with pytest.warns(UserWarning, match=r"fuse_norms: 1 adaLN normalization\(s\) stay with Inductor here: its kernel"):
        cc.compile(model, plan=[("proj", "w4a4"), ("*", "bf16")], progress=False, fuse_norms=True)(x, temb)
    assert REPORTS[-1].fused_norms == 0
    assert _count(REPORTS[-1].graph_modules["after"], torch.nn.functional.layer_norm) == 1
