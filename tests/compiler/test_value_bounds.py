"""Bounds on |Q| and |K| proven from the graph (compiler.value_bounds), and fp8 attention scaled by them."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import convrot_compiler as cc
from convrot_compiler.compiler.value_bounds import abs_bound, emit
from convrot_compiler.config import ConvRotConfig
from convrot_compiler.numerics.fp8_attention import E4M3_MAX, quantize_e4m3
from convrot_compiler.tools.models import build_flux, make_flux_inputs, relative_error

pytestmark = pytest.mark.usefixtures("fresh_dynamo", "no_grad")  # conftest: Dynamo reset, no_grad
HEADS, D = 4, 32


class _QueryPath(nn.Module):
    """FLUX's query path: two streams through a linear, per-head RMSNorm, concatenated, then RoPE with cos and sin
    either computed here (``freqs`` None) or passed in."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(HEADS * D, HEADS * D)
        self.norm_txt = nn.RMSNorm(D, eps=1e-6)
        self.norm_img = nn.RMSNorm(D, eps=1e-6)
        with torch.no_grad():
            self.norm_txt.weight.uniform_(0.5, 2.0)
            self.norm_img.weight.uniform_(0.5, 3.0)

    def forward(self, txt, img, pos, cos=None, sin=None):
        q = torch.cat([self.norm_txt(self.proj(txt).unflatten(-1, (HEADS, D))),
                       self.norm_img(self.proj(img).unflatten(-1, (HEADS, D)))], dim=1)
        if cos is None:
            freqs = torch.outer(pos, 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)).repeat_interleave(2, -1)
            cos, sin = freqs.cos(), freqs.sin()
        real, imag = q.reshape(*q.shape[:-1], -1, 2).unbind(-1)
        rotated = torch.stack([-imag, real], dim=-1).flatten(3)
        out = (q.float() * cos[None, :, None] + rotated.float() * sin[None, :, None]).to(q.dtype)
        return out.permute(0, 2, 1, 3), self.proj(img)


class _ComplexQueryPath(nn.Module):
    """Qwen-Image's query path: the RMSNorm written out, then RoPE on pairs seen as complex numbers."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(HEADS * D, HEADS * D)
        self.weight = nn.Parameter(torch.rand(D) * 2.5 + 0.5)

    def forward(self, x, freqs):
        h = self.proj(x).unflatten(-1, (HEADS, D))
        variance = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
        h = (h * torch.rsqrt(variance + 1e-6)).to(h.dtype) * self.weight
        rotated = torch.view_as_complex(h.float().reshape(*h.shape[:-1], -1, 2)) * freqs[:, None]
        return torch.view_as_real(rotated).flatten(3).type_as(h).permute(0, 2, 1, 3)


def _graph(module, *args) -> fx.GraphModule:
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch.compile(module, backend=capture, fullgraph=True)(*args)
    return graphs[0]


def _with_bound(gm: fx.GraphModule, index: int, max_numel: int):
    """The graph returning its output ``index`` and that output's bound (None where there is none)."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    target = out_node.args[0][index]
    bound = abs_bound(target, max_numel)
    if bound is None:
        return None
    with gm.graph.inserting_before(out_node):
        value = emit(gm.graph, bound)
    out_node.args = ((target, value),)
    gm.recompile()
    return gm


def _inputs(s_txt=5, s_img=11, one_hot=False):
    g = torch.Generator().manual_seed(0)
    txt, img = torch.randn(1, s_txt, HEADS * D, generator=g), torch.randn(1, s_img, HEADS * D, generator=g)
    return txt, img, torch.arange(s_txt + s_img).float()


@pytest.mark.parametrize("passed_in", [False, True])
def test_the_bound_holds_and_is_near_tight_on_an_adversarial_input(passed_in):
    module = _QueryPath()
    txt, img, pos = _inputs()
    extra = ()
    if passed_in:
        freqs = torch.outer(pos, torch.rand(D))
        extra = (freqs.cos(), freqs.sin())
    gm, example = _graph(module, txt, img, pos, *extra)
    assert _with_bound(gm, 0, max_numel=10**6) is not None
    # weights are graph inputs: the bound is recomputed from them at every call
    y, bound = gm(*example)
    root_d = math.sqrt(D)
    w_max = max(module.norm_txt.weight.abs().max(), module.norm_img.weight.abs().max()).item()
    rope = 2 if not passed_in else extra[0].abs().max().item() + extra[1].abs().max().item()
    assert bound.item() == pytest.approx(root_d * w_max * rope, rel=1e-5)
    assert y.abs().max() <= bound
    # an input whose projection is one-hot per head puts sqrt(D) w_i in one channel: the bound is that, times RoPE's
    with torch.no_grad():
        module.proj.weight.zero_()
        module.proj.bias.zero_()
        module.proj.bias[torch.arange(HEADS) * D + module.norm_img.weight.argmax()] = 1.0
    y, bound = gm(*example)
    assert y.abs().max() >= bound / rope * 0.9


def test_the_written_out_rms_norm_and_complex_rope_are_bounded_too():
    module = _ComplexQueryPath()
    x = torch.randn(1, 16, HEADS * D)
    freqs = torch.polar(torch.ones(16, D // 2), torch.rand(16, D // 2) * 6)
    gm, example = _graph(module, x, freqs)
    assert _with_bound(gm, 0, max_numel=10**6) is not None
    y, bound = gm(*example)
    assert bound.item() == pytest.approx(math.sqrt(D) * math.sqrt(2) * module.weight.max().item(), rel=1e-4)
    assert y.abs().max() <= bound
    with torch.no_grad():  # one channel pair per head: its modulus reaches sqrt(D) w_i, a part of it sqrt(D/2) w_i
        module.proj.weight.zero_()
        module.proj.bias.zero_()
        module.proj.bias[torch.arange(HEADS) * D + module.weight.argmax()] = 1.0
    y, bound = gm(*example)
    assert y.abs().max() >= bound / 2 * 0.95
    # x * rsqrt(mean(y^2)) of another tensor y is not a normalization of x
    gm, _ = _graph(lambda a, b: a * torch.rsqrt(b.pow(2).mean(-1, keepdim=True) + 1e-6), x, x + 1)
    assert _with_bound(gm, 0, max_numel=10**6) is None


def test_tensors_without_a_proof_have_no_bound():
    module = _QueryPath()
    txt, img, pos = _inputs()
    gm, _ = _graph(module, txt, img, pos)
    assert _with_bound(gm, 1, max_numel=10**6) is None  # a linear's output
    freqs = torch.outer(pos, torch.rand(D))
    gm, _ = _graph(module, txt, img, pos, freqs.cos(), freqs.sin())
    assert _with_bound(gm, 0, max_numel=freqs.numel() - 1) is None  # cos and sin too large to reduce every call


def test_a_bound_that_no_longer_holds_saturates_instead_of_turning_nan():
    x = torch.tensor([0.5, -2.0, 1.0, 100.0])
    q8, d = quantize_e4m3(x, 4.0)
    assert d.item() == pytest.approx(4.0 / E4M3_MAX, rel=1e-6)
    assert q8.float().tolist()[-1] == E4M3_MAX and q8.float()[1].item() == -2.0 * E4M3_MAX / 4.0
    exact, d_exact = quantize_e4m3(x, x.abs().max())
    assert torch.equal(exact.float(), quantize_e4m3(x)[0].float()) and torch.equal(d_exact, quantize_e4m3(x)[1])
    assert torch.isnan(quantize_e4m3(torch.tensor([1.0, math.nan]), 4.0)[0].float()[1])


@pytest.mark.parametrize("regional", [False, None])
def test_flux_q_and_k_are_scaled_by_their_norm_bound_recomputed_at_every_call(regional):
    kwargs = make_flux_inputs(build_flux("flux-tiny"), 128, 128, 16).kwargs
    errors = {}
    for scales in ("bound", "absmax"):
        torch._dynamo.reset()
        reports, model = [], build_flux("flux-tiny")
        compiled = cc.compile(model, plan="none", attention="fp8", attention_scales=scales, inductor=False,
                              progress=False, regional=regional, report=reports.append)
        errors[scales] = relative_error(compiled(**kwargs)[0], build_flux("flux-tiny")(**kwargs)[0])
        labels = {a.scales for r in reports for a in r.attention}
        assert labels == ({"Q and K by RMSNorm bound; V by absmax"} if scales == "bound" else {"Q, K, V by absmax"})
        if scales == "bound":
            ref = build_flux("flux-tiny")
            for m in (model, ref):  # weights changed after compiling: a bound fixed at compile time would saturate
                for name, p in m.named_parameters():
                    if ".norm_q." in name or ".norm_k." in name or ".norm_added_" in name:
                        p.mul_(16)
            assert relative_error(compiled(**kwargs)[0], ref(**kwargs)[0]) < 0.03
    assert 0 < errors["bound"] < 1.5 * errors["absmax"] + 1e-3


def test_attention_scales_option_is_validated():
    with pytest.raises(ValueError, match="attention_scales"):
        ConvRotConfig(attention="fp8", attention_scales="static")


def test_the_inspection_table_says_how_each_fp8_attention_is_scaled():
    from convrot_compiler.tools.inspection import inspect

    model = build_flux("flux-tiny", device="meta")
    kwargs = make_flux_inputs(model, 64, 64, 16, device="meta").kwargs
    table = inspect(model, example_kwargs=kwargs, attention="fp8").attention_table()
    assert "Q and K by RMSNorm bound; V by its projection's operands" in table
    table = inspect(model, example_kwargs=kwargs, attention="fp8", attention_scales="qk-bound").attention_table()
    assert "Q and K by RMSNorm bound; V by absmax" in table


@pytest.mark.parametrize("packed,bits", [(True, 4), (False, 8)])
def test_a_quantized_linears_output_stays_within_its_operand_bound(packed, bits):
    """quant.quantized_linear_bound holds on any operands and is reached where each token's values take the sign of
    the weight row that gives the bound, at the largest token scale; row_bounds reads packed int4 and int8 alike."""
    from convrot_compiler.numerics.quant import pack_int4, qmax, quantized_linear_bound, reference_int_gemm, row_bounds

    g = torch.Generator().manual_seed(0)
    m, k, n, top = 6, 512, 8, qmax(bits)
    w = torch.randint(-top, top + 1, (n, k), generator=g, dtype=torch.int8)
    w[2, :3] = -8 if bits == 4 else -127  # the int4 grid's one extra value
    sw, sx = torch.rand(n, generator=g) + 0.5, torch.rand(m, generator=g) + 0.5
    bias = torch.randn(n, generator=g)
    rows = row_bounds(pack_int4(w, 256) if packed else w, sw, packed)
    torch.testing.assert_close(rows, sw * w.float().abs().sum(-1), rtol=1e-6, atol=0)
    q = torch.randint(-top, top + 1, (m, k), generator=g, dtype=torch.int8)
    assert reference_int_gemm(q, sx, w, sw, bias, torch.float32).abs().max() <= quantized_linear_bound(sx, rows, bias,
                                                                                                       bits)
    q[int(sx.argmax())] = top * w[int(rows.argmax())].sign()
    y = reference_int_gemm(q, sx, w, sw, None, torch.float32)
    torch.testing.assert_close(y.abs().max(), quantized_linear_bound(sx, rows, None, bits), rtol=1e-6, atol=0)


def test_row_bounds_are_kept_until_the_weight_changes_and_inference_tensors_work():
    """QuantizedWeight.row_bounds is computed once and again after an in-place change; a weight prepared under
    torch.inference_mode (no version counter) gets its row bounds too, computed at every call, so a change shows."""
    from convrot_compiler.numerics.quant import quantize_weight, row_bounds
    from convrot_compiler.numerics.rotations import GroupHadamardRotation

    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    rotation = GroupHadamardRotation("regular", 256)
    qw = quantize_weight(w, "w4a4", rotation, group_size=256)
    first = qw.row_bounds()
    assert qw.row_bounds() is first
    qw.scale.mul_(2)
    torch.testing.assert_close(qw.row_bounds(), 2 * first)
    with torch.inference_mode():
        frozen = quantize_weight(w, "w4a4", rotation, group_size=256)
        torch.testing.assert_close(frozen.row_bounds(), row_bounds(frozen.values, frozen.scale, True))
        frozen.scale.mul_(2)
        torch.testing.assert_close(frozen.row_bounds(), row_bounds(frozen.values, frozen.scale, True))


def test_flux_v_is_scaled_by_its_projections_operands():
    """FLUX's V comes out of the Q/K/V GEMMs (fused, the text stream's concatenated before the image's): scaled by the
    larger of the two projections' operand bounds, recomputed from the token scales and weights at every call; the
    attention output stays within the absmax form's error of bf16's. A GELU'd column block has no such bound."""
    from convrot_compiler.compiler.backend import REPORTS
    from convrot_compiler.compiler.value_bounds import linear_bound
    from convrot_compiler.numerics.quant import quantized_linear_bound

    kwargs = make_flux_inputs(build_flux("flux-tiny", seed=2), 128, 128, 16, seed=0).kwargs
    ref = build_flux("flux-tiny", seed=2)(**kwargs)[0]
    errors = {}
    for scales in ("bound", "qk-bound"):
        torch._dynamo.reset()
        out = cc.compile(build_flux("flux-tiny", seed=2), plan="w4a4", attention="fp8", attention_scales=scales,
                         progress=False, regional=False)(**kwargs)[0]
        report = REPORTS[-1]
        labels = {a.scales for a in report.attention}
        assert labels == {"Q and K by RMSNorm bound; V by " + ("its projection's operands" if scales == "bound"
                                                               else "absmax")}
        errors[scales] = relative_error(out, ref)
    gm = report.graph_modules["after"]
    assert sum(n.target is quantized_linear_bound for n in gm.graph.nodes) == 0  # the qk-bound graph
    assert errors["bound"] < 1.5 * errors["qk-bound"] + 1e-3
    torch._dynamo.reset()
    cc.compile(build_flux("flux-tiny", seed=2), plan="w4a4", attention="fp8", progress=False, regional=False)(**kwargs)
    gm = REPORTS[-1].graph_modules["after"]
    bounds = [n for n in gm.graph.nodes if n.target is quantized_linear_bound]
    assert len(bounds) == 2 * 2 + 2  # each double block's two streams, each single block's one
    gemms = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "quantized_matmul"]
    gelu = next(n for n in gemms if n.args[9] is not None)
    assert linear_bound(gelu) is None and linear_bound(gelu, gelu.args[9], 1024) is None


def test_sdpa_helper_matches_the_reference_with_bounds():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 16, D, generator=g).bfloat16() for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    from convrot_compiler.ops import fp8_scaled_dot_product_attention

    loose = fp8_scaled_dot_product_attention(q, k, v, query_bound=4 * q.abs().max().float(),
                                             key_bound=4 * k.abs().max().float())
    assert relative_error(loose, ref) < 0.1


def test_qwen_image_q_and_k_are_scaled_by_their_norm_bound():
    """Qwen-Image writes its RMSNorm out and turns pairs into complex numbers for RoPE; at 1024² its frequency table
    is small beside Q (every call reduces it), and the attention matches the absmax form's closely."""
    from convrot_compiler.families import example_inputs
    from convrot_compiler.tools.models import build_model

    kwargs = example_inputs(build_model("qwen-image-tiny", seed=0, device="cpu"), torch.device("cpu"), height=1024, width=1024,
                            text_tokens=16, frames=1, batch=1)
    outs = {}
    for scales in ("bound", "absmax"):
        torch._dynamo.reset()
        reports = []
        model = cc.compile(build_model("qwen-image-tiny", seed=0, device="cpu"), plan="none", attention="fp8",
                           attention_scales=scales, inductor=False, progress=False, report=reports.append)
        outs[scales] = model(**kwargs)[0]
        assert {a.scales for r in reports for a in r.attention} == (
            {"Q and K by RMSNorm bound; V by absmax"} if scales == "bound" else {"Q, K, V by absmax"})
    ref = build_model("qwen-image-tiny", seed=0, device="cpu")(**kwargs)[0]
    assert relative_error(outs["bound"], ref) < 1.5 * relative_error(outs["absmax"], ref) + 1e-3
