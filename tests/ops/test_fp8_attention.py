"""fp8 attention (option attention='fp8'): the e4m3 numerics, the op, and the graph rewrite (CPU)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convrot_compiler as cc
from convrot_compiler.config import ConvRotConfig
from convrot_compiler.numerics.fp8_attention import (
    E4M3_MAX,
    dequantize_e4m3,
    fp8_attention_reference,
    inverse_descale,
    quantize_e4m3,
)
from convrot_compiler.ops import fp8_attention_e4m3_output, fp8_scaled_dot_product_attention
from convrot_compiler.tools.inspection import inspect
from convrot_compiler.tools.models import build_flux, make_flux_inputs, relative_error

pytestmark = pytest.mark.usefixtures("fresh_dynamo", "no_grad")  # conftest: Dynamo reset, no_grad


def _bshd(b, s, h, d, seed=0, scale=1.0):
    """[B, H, S, D] views of [B, S, H, D] bf16 memory, as FLUX's attention sees Q, K, V."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, s, h, d, generator=g) * scale).to(torch.bfloat16).permute(0, 2, 1, 3)


def test_e4m3_quantization_maps_the_absmax_to_448_and_rounds_to_3_mantissa_bits():
    x = _bshd(2, 50, 3, 32, scale=5.0)
    x8, d = quantize_e4m3(x)
    assert x8.dtype == torch.float8_e4m3fn and x8.stride() == x.stride() and d.shape == (1,)
    assert x8.float().abs().max().item() == E4M3_MAX
    back = dequantize_e4m3(x8, d, torch.float32)
    err = (back - x.float()).abs()
    # round to nearest in e4m3: half a unit of the last place, 2^-4 relative for normals; subnormals (below
    # 2^-6 in e4m3 units) have an absolute step of 2^-9 units
    bound = torch.maximum(x.float().abs() * 2.0 ** -4, torch.full_like(err, 2.0 ** -10 * d.item()))
    assert (err <= bound * (1 + 1e-6)).all()
    assert err.max() > 0  # it did round


def test_e4m3_quantization_of_zeros_and_non_finite_inputs():
    z8, dz = quantize_e4m3(torch.zeros(4, 8, dtype=torch.bfloat16))
    assert dz.item() == 0 and (z8.float() == 0).all() and inverse_descale(dz).item() == 0
    x = torch.ones(4, 8, dtype=torch.bfloat16)
    x[1, 2] = float("nan")
    x8, d = quantize_e4m3(x)
    assert torch.isnan(dequantize_e4m3(x8, d, torch.float32)).all()


def test_reference_with_one_key_returns_the_value_exactly():
    """With one key every softmax row is [1]: O = V, and with V's scale on the output O's e4m3 values are V's."""
    q, k, v = _bshd(1, 1, 4, 64, seed=1), _bshd(1, 1, 4, 64, seed=2), _bshd(1, 1, 4, 64, seed=3)
    q8, dq = quantize_e4m3(q)
    k8, dk = quantize_e4m3(k)
    v8, dv = quantize_e4m3(v)
    o8 = fp8_attention_reference(q8, k8, v8, dq, dk, dv, inverse_descale(dv), 0.125)
    assert torch.equal(o8.float(), v8.float())


def test_reference_is_close_to_float_attention_and_keeps_the_query_layout():
    q, k, v = (_bshd(1, 200, 4, 64, seed=s) for s in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    out = fp8_scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch.bfloat16 and out.stride() == q.stride()
    err = relative_error(out, ref)
    bf16_err = relative_error(F.scaled_dot_product_attention(q, k, v), ref)
    # e4m3 carries 3 mantissa bits: several times bf16's error, well below 10%
    assert 5 * bf16_err < err < 0.1


def test_reference_softmax_scale_is_applied():
    q, k, v = (_bshd(1, 64, 2, 32, seed=s, scale=2.0) for s in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.05)
    assert relative_error(fp8_scaled_dot_product_attention(q, k, v, scale=0.05), ref) < 0.1
    assert relative_error(fp8_scaled_dot_product_attention(q, k, v), ref) > 0.2  # the default 1/sqrt(32) is another attention


def test_fp8_attention_op_passes_opcheck():
    q, k, v = (_bshd(1, 40, 2, 32, seed=s) for s in range(3))
    (q8, dq), (k8, dk), (v8, dv) = quantize_e4m3(q), quantize_e4m3(k), quantize_e4m3(v)
    torch.library.opcheck(torch.ops.convrot.fp8_attention.default,
                          (q8, k8, v8, dq, dk, dv, inverse_descale(dv), 1 / math.sqrt(32)),
                          test_utils=("test_faketensor", "test_aot_dispatch_static"))


def test_flux_attentions_run_in_fp8_when_asked():
    kwargs = make_flux_inputs(build_flux("flux-tiny"), 128, 128, 16).kwargs
    with torch.no_grad():
        ref = build_flux("flux-tiny")(**kwargs)[0]
    outs, reports = {}, {}
    for mode in ("keep", "fp8"):
        torch._dynamo.reset()
        reports[mode] = []
        compiled = cc.compile(build_flux("flux-tiny"), plan="none", attention=mode, progress=False, regional=False,
                              report=reports[mode].append)
        outs[mode] = compiled(**kwargs)[0]
    (keep,), (fp8,) = reports["keep"], reports["fp8"]
    assert [a.precision for a in keep.attention] == ["keep"] * 4
    assert [a.precision for a in fp8.attention] == ["fp8"] * 4
    assert sum(n.target is fp8_attention_e4m3_output for n in fp8.graph_modules["after"].graph.nodes) == 4
    assert relative_error(outs["keep"], ref) == 0
    assert 0 < relative_error(outs["fp8"], ref) < 0.05


def test_fp8_attention_with_w4a4_plan_and_inductor():
    model = build_flux("flux-tiny")
    kwargs = make_flux_inputs(model, 64, 64, 16).kwargs
    with torch.no_grad():
        ref = model(**kwargs)[0]
    reports = []
    compiled = cc.compile(model, plan="w4a4", attention="fp8", inductor=True, progress=False, regional=False, report=reports.append)
    out = compiled(**kwargs)[0]
    assert reports[0].rewritten > 0 and all(a.precision == "fp8" for a in reports[0].attention)
    assert 0 < relative_error(out, ref) < 0.5


def test_linears_after_fp8_attention_read_its_e4m3_output():
    """With a w4a4 plan, to_out, to_add_out and proj_out quantize fp8 attention's e4m3 output as it is
    (convrot::rotate_quantize_e4m3): no 16-bit copy is left in the graph, the decisions say who reads it, and the
    output is the dequantizing graph's bit for bit."""
    from convrot_compiler.ops import quantize_e4m3_activation

    model = build_flux("flux-tiny")
    kwargs = make_flux_inputs(model, 64, 64, 16).kwargs
    outs, reports = {}, {}
    for fuse in (True, False):
        torch._dynamo.reset()
        reports[fuse] = []
        compiled = cc.compile(build_flux("flux-tiny"), plan="w4a4", attention="fp8", fuse_attention_output=fuse,
                              inductor=False, progress=False, regional=False, report=reports[fuse].append)
        with torch.no_grad():
            outs[fuse] = compiled(**kwargs)[0]
    (fused,), (unfused,) = reports[True], reports[False]
    nodes = list(fused.graph_modules["after"].graph.nodes)
    assert sum(n.target is quantize_e4m3_activation for n in nodes) == 2 * 2 + 2  # 2 double blocks, 2 single
    assert not any(n.target is dequantize_e4m3 for n in nodes)
    assert sum(n.target is dequantize_e4m3 for n in unfused.graph_modules["after"].graph.nodes) == 4
    assert [a.output for a in fused.attention] == ["e4m3 into 2 rotate+quantize"] * 2 + ["e4m3 into 1 rotate+quantize"] * 2
    assert [a.output for a in unfused.attention] == ["dequantized"] * 4
    assert torch.equal(outs[True], outs[False])
    with pytest.raises(ValueError, match="fuse_attention_output"):
        ConvRotConfig(fuse_attention_output="yes")


def test_rewritten_graph_equals_the_eager_model_with_fp8_attention(monkeypatch):
    model = build_flux("flux-tiny")
    kwargs = make_flux_inputs(model, 128, 128, 16).kwargs
    compiled = cc.compile(model, plan="none", attention="fp8", attention_scales="absmax", inductor=False,
                          progress=False, regional=False)
    out = compiled(**kwargs)[0]
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", fp8_scaled_dot_product_attention)
    with torch.no_grad():
        ref = model(**kwargs)[0]
    assert torch.equal(out, ref)


class _Attentions(nn.Module):
    def forward(self, q, k, v, mask):
        return (F.scaled_dot_product_attention(q, k, v) + F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                + F.scaled_dot_product_attention(q, k, v, is_causal=True)
                + F.scaled_dot_product_attention(q[..., :24], k[..., :24], v[..., :24]).repeat(1, 1, 1, 2)[..., :32]
                + F.scaled_dot_product_attention(q.float(), k.float(), v.float()).bfloat16())


def test_attentions_fp8_cannot_run_are_kept_with_their_reason():
    q, k, v = (_bshd(1, 16, 2, 32, seed=s) for s in range(3))
    mask = torch.ones(16, 16, dtype=torch.bool)
    reports = []
    compiled = torch.compile(_Attentions(), backend="convrot",
                             options={"attention": "fp8", "report": reports.append})
    with torch.no_grad():
        out, ref = compiled(q, k, v, mask), _Attentions()(q, k, v, mask)
    decisions = reports[0].attention
    assert [d.precision for d in decisions] == ["fp8", "keep", "keep", "keep", "keep"]
    reasons = [d.reason for d in decisions[1:]]
    assert "mask" in reasons[0] and "causal" in reasons[1] and "head dim 24" in reasons[2]
    assert "float32" in reasons[3]
    assert 0 < relative_error(out, ref) < 0.05


def test_attention_option_is_validated_and_reported_by_inspect():
    with pytest.raises(ValueError, match="attention"):
        ConvRotConfig.from_backend_options({"attention": "int8"})
    model = build_flux("flux-tiny", device="meta")
    kwargs = make_flux_inputs(model, 64, 64, 16, device="meta").kwargs
    report = inspect(model, example_kwargs=kwargs, attention="fp8")
    assert report.totals()["attention_fp8"] == 4 and report.totals()["attention_kept"] == 0
    table = report.attention_table()
    assert "single_transformer_blocks.1.attn" in table and "1x4x32x64" in table
    assert "4 of 4 attentions in fp8, 4 with Q and K from one RMSNorm+RoPE kernel" in report.summary()
    kept = inspect(model, example_kwargs=kwargs)
    assert kept.totals()["attention_fp8"] == 0 and kept.totals()["attention_prologue_kernel"] == 4
    assert {a.prologue for a in kept.attention} == {"RMSNorm+RoPE kernel"}
    assert "0 of 4 attentions in fp8, 4 with Q and K" in kept.summary()
    unfused = inspect(model, example_kwargs=kwargs, fuse_attention_prologue=False)
    assert {a.prologue for a in unfused.attention} == {"Inductor"} and "RMSNorm+RoPE" not in unfused.summary()
