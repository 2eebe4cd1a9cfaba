"""Gated residuals added in the epilogue of the GEMM before them (option ``residual_epilogue``, CPU)."""

import operator

import pytest
import torch
from torch import fx, nn

import convrot_compiler as cc
from convrot_compiler.compiler.backend import REPORTS
from convrot_compiler.compiler.gated_residual import match_gated_residual
from convrot_compiler.kernels.triton.common import interpreting
from convrot_compiler.numerics.quant import gated_residual, pack_int4
from convrot_compiler.ops import custom_ops, dispatch
from convrot_compiler.ops.custom_ops import quantized_matmul
from convrot_compiler.tools.inspection import inspect
from convrot_compiler.tools.models import build_flux, make_flux_inputs, relative_error

pytestmark = pytest.mark.usefixtures("fresh_dynamo", "no_grad")


def test_gated_residual_is_one_rounding_of_the_float32_sum():
    torch.manual_seed(0)
    y, residual = torch.randn(6, 8).bfloat16(), torch.randn(6, 8).bfloat16()
    gate = torch.randn(2, 8).bfloat16()
    expected = (residual.float() + gate.float().repeat_interleave(3, 0) * y.float()).bfloat16()
    out = gated_residual(y, residual, gate)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    assert torch.equal(out[:3], gated_residual(y[:3], residual[:3], gate[:1]))  # rows 0-2 take sample 0's gate
    with pytest.raises(ValueError, match="gate"):
        gated_residual(y, residual, torch.randn(4, 8).bfloat16())  # 4 samples do not divide 6 rows
    with pytest.raises(ValueError, match="residual of its shape"):
        gated_residual(y, residual[:, :4], gate)


class _Branch(nn.Module):
    """x + gate * linear(h), as a DiT block ends a branch; ``other_use`` reads the linear's output again."""

    def __init__(self, other_use: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(256, 256).bfloat16()
        self.drop = nn.Dropout(0.0)
        self.other_use = other_use

    def forward(self, x, h, gate):
        y = self.drop(self.proj(h))
        out = x + gate.unsqueeze(1) * y
        return (out, y) if self.other_use else out


def _branch_inputs(batch=2, tokens=8):
    torch.manual_seed(1)
    return (torch.randn(batch, tokens, 256).bfloat16(), torch.randn(batch, tokens, 256).bfloat16(),
            torch.randn(batch, 256).bfloat16())


def _compile_branch(residual_epilogue, inductor=False, other_use=False):
    model = _Branch(other_use)
    cc.compile(model, plan=[("*", "w4a4")], progress=False, residual_epilogue=residual_epilogue, inductor=inductor)
    return model


def test_a_gated_residual_runs_in_its_gemms_epilogue():
    """The GEMM takes the residual and the [B, N] gate the graph unsqueezed after the linear (Dynamo traces the
    unsqueeze late); no multiply or add is left. Against the same graph with the sum left to Inductor (float32, one
    rounding, as the epilogue computes it): equal."""
    args = _branch_inputs()
    fused = _compile_branch(True, inductor=True)(*args)
    report = REPORTS[-1]
    assert report.residual_epilogues == 1
    nodes = [n for n in report.graph_modules["after"].graph.nodes if n.op == "call_function"]
    gemm = next(n for n in nodes if n.target is quantized_matmul)
    assert gemm.kwargs["residual"].op == "placeholder" and gemm.kwargs["gate"].op == "placeholder"
    assert not any(n.target in (operator.add, operator.mul) for n in nodes)
    torch._dynamo.reset()
    plain = _compile_branch(False, inductor=True)(*args)
    assert REPORTS[-1].residual_epilogues == 0
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)


def test_a_linear_output_read_twice_keeps_its_sum_in_the_graph():
    x, h, gate = _branch_inputs()
    fused, y = _compile_branch(True, other_use=True)(x, h, gate)
    assert REPORTS[-1].residual_epilogues == 0
    assert torch.equal(fused, x + gate.unsqueeze(1) * y)


def _graph_of(shapes: dict, build):
    g = fx.Graph()
    nodes = {name: g.placeholder(name) for name in shapes}
    for name, shape in shapes.items():
        nodes[name].meta["example_value"] = torch.empty(shape, dtype=torch.bfloat16)
    return g, nodes, build(g, nodes)


def test_the_match_takes_only_a_sample_gate_and_a_residual_of_the_outputs_shape():
    def chain(gate_name, residual_name):
        def build(g, n):
            mul = g.call_function(operator.mul, (n[gate_name], n["y"]))
            add = g.call_function(operator.add, (n[residual_name], mul))
            for node in (mul, add):
                node.meta["example_value"] = torch.empty(2, 8, 16, dtype=torch.bfloat16)
            return add
        return build

    shapes = {"y": (2, 8, 16), "x": (2, 8, 16), "gate": (2, 1, 16), "token_gate": (2, 8, 16), "short": (2, 1, 16)}
    _, n, add = _graph_of(shapes, chain("gate", "x"))
    found = match_gated_residual(n["y"])
    assert found is not None and found.add is add and found.residual is n["x"] and found.gate is n["gate"]
    _, n, _ = _graph_of(shapes, chain("token_gate", "x"))
    assert match_gated_residual(n["y"]) is None  # a gate per token, not per sample
    _, n, _ = _graph_of(shapes, chain("gate", "short"))
    assert match_gated_residual(n["y"]) is None  # the residual broadcasts: not y's shape
    _, n, _ = _graph_of({**shapes, "x": (2, 8, 16)}, chain("gate", "x"))
    n["x"].meta["example_value"] = torch.empty(2, 8, 16, dtype=torch.float32)
    assert match_gated_residual(n["y"]) is None  # two dtypes


def test_flux_blocks_add_each_gated_residual_in_a_gemm_epilogue(tmp_path):
    """flux-tiny: to_out, to_add_out and both feed-forward outputs of each double block, proj_out of each single
    block. The rounding moves (one rounding of residual + gate * y where eager rounds the product first), so the
    output stays within the chaotic random-weights spread of the unfused graph's."""
    kwargs = make_flux_inputs(build_flux("flux-tiny", seed=2), 128, 128, 16, seed=0).kwargs
    plain = cc.compile(build_flux("flux-tiny", seed=2), plan="w4a4", progress=False, regional=False,
                       residual_epilogue=False)(**kwargs)[0]
    assert REPORTS[-1].residual_epilogues == 0
    torch._dynamo.reset()
    out = cc.compile(build_flux("flux-tiny", seed=2), plan="w4a4", progress=False, regional=False)(**kwargs)[0]
    report = REPORTS[-1]
    assert report.residual_epilogues == 2 * 4 + 2
    gemms = [n for n in report.graph_modules["after"].graph.nodes if n.target is quantized_matmul]
    assert sum("residual" in n.kwargs for n in gemms) == 10
    assert relative_error(out, plain) < 2e-2
    meta = build_flux("flux-tiny", device="meta")
    summary = inspect(meta, example_kwargs=make_flux_inputs(meta, 128, 128, 16, device="meta").kwargs,
                      plan="w4a4").summary()
    assert "10 gated residuals added in their GEMM's epilogue" in summary


def test_int_gemm_adds_a_gated_residual_and_refuses_bad_operands():
    """The reference op adds the gated residual to the GEMM's output, and so does dispatch where Triton's GEMM runs
    (the interpreter here); dispatch says what is wrong with a residual or gate it cannot take."""
    torch.manual_seed(0)
    m, k, n = 8, 256, 16
    qx = torch.randint(-7, 8, (m, k), dtype=torch.int8)
    qw = pack_int4(torch.randint(-7, 8, (n, k), dtype=torch.int8), 256)
    sx, sw = torch.rand(m) + 0.1, torch.rand(n) + 0.1
    residual, gate = torch.randn(m, n).bfloat16(), torch.randn(2, n).bfloat16()
    plain = custom_ops.int_gemm_reference(qx, sx, qw, sw, None, True, 256, torch.bfloat16)
    ref = torch.ops.convrot.int_gemm(qx, sx, [qw], [sw], [None], True, 256, torch.bfloat16, None, residual, gate)
    assert torch.equal(ref, gated_residual(plain, residual, gate))
    if not interpreting():
        pytest.skip("dispatch runs Triton's kernels: the interpreter on CPU")
    out = dispatch.int_gemm(qx, sx, [qw], [sw], [None], True, 256, torch.bfloat16, None, residual, gate)
    gemm = dispatch.int_gemm(qx, sx, [qw], [sw], [None], True, 256, torch.bfloat16)  # its epilogue may use FMAs
    assert torch.equal(out, gated_residual(gemm, residual, gate))

    def call(**kw):
        args = {"gelu_from": None, "residual": residual, "gate": gate, **kw}
        return dispatch.int_gemm(qx, sx, [qw], [sw], [None], True, 256, torch.bfloat16, **args)

    with pytest.raises(ValueError, match="both a residual"):
        call(gate=None)
    with pytest.raises(ValueError, match="GELU epilogue and a gated residual"):
        call(gelu_from=0)
    with pytest.raises(ValueError, match=r"gate \[B, 16\] with B dividing 8"):
        call(gate=torch.randn(3, n).bfloat16())
    with pytest.raises(ValueError, match="residual must be contiguous"):
        call(residual=torch.randn(n, m).bfloat16().T)
    with pytest.raises(ValueError, match="gate must be contiguous torch.bfloat16"):
        call(gate=gate.float())
