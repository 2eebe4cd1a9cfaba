"""FLUX's Q and K chain (per-head RMSNorm, concatenation, RoPE on pairs) as one op, in 16 bits
(``convrot::rms_rope``) or with its e4m3 cast (``convrot::rms_rope_e4m3``): the kernel against the reference (the
Triton interpreter on CPU), the graph match, and the rewritten model against the unfused one."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import convrot_compiler as cc
from convrot_compiler.compiler.qk_prologue import match_rms_rope
from convrot_compiler.families import example_inputs
from convrot_compiler.kernels.triton.common import interpreting
from convrot_compiler.kernels.triton.rms_rope import rms_rope, unsupported_reason
from convrot_compiler.numerics.fp8_attention import E4M3_MAX, quantize_e4m3, rms_rope_e4m3_reference
from convrot_compiler.numerics.rope import rms_rope_reference, rope_pairs
from convrot_compiler.ops import custom_ops, rms_rope_16bit, rms_rope_quantize_e4m3
from convrot_compiler.tools.models import build_flux, build_model, make_flux_inputs, relative_error

pytestmark = pytest.mark.usefixtures("fresh_dynamo", "no_grad")  # conftest: Dynamo reset, no_grad
DEV = "cuda" if torch.cuda.is_available() else "cpu"
HEADS, D = 3, 32


def _streams(seqs, seed=0, heads=HEADS, d=D, batch=2):
    """Per-head views [B, S_i, H, D] into wider projections (a fused QKV output's columns), as FLUX's are."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in seqs:
        proj = torch.randn(batch, s, 3 * heads * d, generator=g).bfloat16()
        proj[..., heads * d:heads * d + 4] *= 30  # outlier channels in the first head
        out.append(proj[..., heads * d:2 * heads * d].unflatten(-1, (heads, d)))
    return out


def _tables(seq, seed=1, d=D):
    angles = torch.rand(seq, d, generator=torch.Generator().manual_seed(seed)) * 7
    return angles.cos(), angles.sin()


def _weights(n, seed=2, none_at=None):
    g = torch.Generator().manual_seed(seed)
    ws = [(torch.rand(D, generator=g) * 2 + 0.5).bfloat16() for _ in range(n)]
    if none_at is not None:
        ws[none_at] = None
    return ws


def _bound(weights):
    w_max = max([1.0] + [w.float().abs().max().item() for w in weights if w is not None])
    return torch.tensor(math.sqrt(D) * w_max * 2)


def _assert_same_e4m3(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Bit for bit under the interpreter. On a GPU the row's sum of squares is reduced in another order, so a
    value on a rounding boundary may land one e4m3 step away: at most 1 in 1000 values, each by one step."""
    out, ref = out.cpu().float(), ref.float()
    if interpreting():
        assert torch.equal(out, ref)
        return
    step = torch.exp2(torch.floor(torch.log2(torch.maximum(out.abs(), ref.abs()).clamp_min(2.0 ** -6))) - 3)
    off = out != ref
    assert off.float().mean() <= 1e-3 and ((out - ref).abs() <= step)[off].all()


@pytest.mark.parametrize("seqs,none_at", [((5, 11), None), ((13,), None), ((7, 4), 0), ((3, 9), 1), ((6,), 0)])
def test_kernel_matches_the_reference_exactly(seqs, none_at):
    sources, weights = _streams(seqs), _weights(len(seqs), none_at=none_at)
    cos, sin = _tables(sum(seqs))
    eps = [1e-6, 1e-5][:len(seqs)]
    bound = _bound(weights)
    ref, descale = rms_rope_e4m3_reference(sources, weights, eps, cos, sin, bound)
    out = rms_rope([s.to(DEV) for s in sources], [None if w is None else w.to(DEV) for w in weights], eps,
                        cos.to(DEV), sin.to(DEV), bound.to(DEV))
    assert out.shape == ref.shape == (2, sum(seqs), HEADS, D) and out.is_contiguous()
    _assert_same_e4m3(out, ref)
    assert (ref.float().abs() > E4M3_MAX / 4).any()  # the scale is not so loose that few e4m3 steps are used
    assert descale.item() == pytest.approx(bound.item() / E4M3_MAX)


@pytest.mark.parametrize("seqs,none_at", [((5, 11), None), ((13,), None), ((7, 4), 0), ((3, 9), 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_in_16_bits_matches_the_reference(seqs, none_at, dtype):
    """The row's 1 / RMS is computed otherwise than torch's rms_norm (and on a GPU its sum of squares reduced in
    another order), so a value on a rounding boundary may land one step of its dtype away: at most 1 in 1000."""
    sources = [s.to(dtype) for s in _streams(seqs)]
    weights = [None if w is None else w.to(dtype) for w in _weights(len(seqs), none_at=none_at)]
    cos, sin = _tables(sum(seqs))
    eps = [1e-6, 1e-5][:len(seqs)]
    ref = rms_rope_reference(sources, weights, eps, cos, sin)
    out = rms_rope([s.to(DEV) for s in sources], [None if w is None else w.to(DEV) for w in weights], eps,
                   cos.to(DEV), sin.to(DEV)).cpu()
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape == (2, sum(seqs), HEADS, D)
    assert out.is_contiguous()
    mantissa = 7 if dtype == torch.bfloat16 else 10
    out, ref = out.float(), ref.float()
    step = torch.exp2(torch.floor(torch.log2(torch.maximum(out.abs(), ref.abs()).clamp_min(2.0 ** -14))) - mantissa)
    off = out != ref
    assert off.float().mean() <= 1e-3 and ((out - ref).abs() <= step)[off].all()
    assert relative_error(out, torch.cat(sources, 1).float()) > 0.5  # normalized and rotated, not copied


def test_a_bound_exceeded_saturates_a_zero_bound_gives_zeros_and_a_nan_row_stays_nan():
    sources, weights = _streams((4, 6)), _weights(2)
    cos, sin = _tables(10)
    tight = torch.tensor(0.5)
    ref, _ = rms_rope_e4m3_reference(sources, weights, [1e-6] * 2, cos, sin, tight)
    out = rms_rope([s.to(DEV) for s in sources], [w.to(DEV) for w in weights], [1e-6] * 2, cos.to(DEV),
                        sin.to(DEV), tight.to(DEV)).cpu()
    _assert_same_e4m3(out, ref)
    assert out.float().abs().max() == E4M3_MAX
    zero = rms_rope([s.to(DEV) for s in sources], [w.to(DEV) for w in weights], [1e-6] * 2, cos.to(DEV),
                         sin.to(DEV), torch.tensor(0.0, device=DEV)).cpu()
    assert not zero.float().any()
    if interpreting():  # the interpreter casts NaN to e4m3 as 384, where the GPU's conversion keeps NaN
        return
    sources[1][0, 2, 1, 5] = math.nan
    bad = rms_rope([s.to(DEV) for s in sources], [w.to(DEV) for w in weights], [1e-6] * 2, cos.to(DEV),
                        sin.to(DEV), _bound(weights).to(DEV)).cpu().float()
    assert bad[0, 6, 1].isnan().all() and not bad[0, 5].isnan().any() and not bad[1].isnan().any()


def test_the_kernel_says_what_it_cannot_take():
    assert "power of two" in unsupported_reason(torch.bfloat16, 96, 1)
    assert "streams" in unsupported_reason(torch.bfloat16, 128, 3)
    assert "dtype" in unsupported_reason(torch.float32, 128, 1)
    assert unsupported_reason(torch.float16, 128, 2) is None
    sources = _streams((4, 6))
    cos, sin = _tables(9)
    with pytest.raises(ValueError, match="one weight"):
        rms_rope([s.to(DEV) for s in sources], [None], [1e-6] * 2, *(t.to(DEV) for t in _tables(10)),
                      torch.tensor(1.0, device=DEV))
    with pytest.raises(ValueError, match=r"cos, sin are \(9, 32\)"):
        rms_rope([s.to(DEV) for s in sources], [None, None], [1e-6] * 2, cos.to(DEV), sin.to(DEV),
                      torch.tensor(1.0, device=DEV))


def test_rope_pairs_rotates_each_pair_by_its_angle():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 2, 8, dtype=torch.float64, generator=g)
    angles = torch.rand(4, 4, dtype=torch.float64, generator=g) * 6
    cos, sin = angles.repeat_interleave(2, -1).cos(), angles.repeat_interleave(2, -1).sin()
    as_complex = torch.view_as_complex(x.reshape(1, 4, 2, 4, 2).contiguous()) * torch.polar(
        torch.ones_like(angles), angles)[:, None]
    # rope_pairs computes in float32, as the model does
    assert torch.allclose(rope_pairs(x, cos, sin), torch.view_as_real(as_complex).flatten(-2), atol=1e-6)


class _Attention(nn.Module):
    """FLUX's attention as diffusers writes it: per-head RMSNorm of both streams, text first, RoPE on pairs
    with the tables passed in, the native backend's permute. With ``out_features``, also the attention's output
    projection (a linear for the compiler to quantize), its result returned beside the attention's."""

    def __init__(self, written_out_rope: bool = False, d: int = D, out_features: int | None = None):
        super().__init__()
        self.norms = nn.ModuleList(nn.RMSNorm(d, eps=1e-6, dtype=torch.bfloat16) for _ in range(4))
        self.proj = nn.Linear(out_features, out_features, dtype=torch.bfloat16) if out_features else None
        self.written_out_rope = written_out_rope
        with torch.no_grad():
            for n in self.norms:
                n.weight.uniform_(0.5, 2.5)

    def rope(self, x, cos, sin):
        if self.written_out_rope:  # the same rotation as complex numbers: not FLUX's form, not matched
            pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            freqs = torch.complex(cos[:, ::2], sin[:, ::2])[None, :, None]
            return torch.view_as_real(pairs * freqs).flatten(3).type_as(x)
        real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        rotated = torch.stack([-imag, real], dim=-1).flatten(3)
        return (x.float() * cos[None, :, None] + rotated.float() * sin[None, :, None]).to(x.dtype)

    def forward(self, q_txt, q_img, k_img, v, cos, sin):
        q = torch.cat([self.norms[0](q_txt), self.norms[1](q_img)], dim=1)
        k = torch.cat([self.norms[2](q_txt * 0.5), self.norms[3](k_img)], dim=1)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        out = F.scaled_dot_product_attention(*(t.permute(0, 2, 1, 3) for t in (q, k, v)))
        return out if self.proj is None else (out, self.proj(out.transpose(1, 2).flatten(2)))


def _attention_inputs(txt=4, img=12, **shape):
    q_txt, q_img = _streams((txt, img), seed=3, **shape)
    k_img, v = _streams((img, txt + img), seed=4, **shape)
    return q_txt, q_img, k_img, v, *_tables(txt + img, d=shape.get("d", D))


def _sdpa_args(module, *inputs) -> tuple[fx.Node, fx.Node]:
    graphs = []
    torch.compile(module, backend=lambda gm, ex: graphs.append(gm) or gm.forward, fullgraph=True)(*inputs)
    sdpa = next(n for n in graphs[0].graph.nodes if n.target is F.scaled_dot_product_attention)
    return sdpa.kwargs.get("query", sdpa.args[0] if sdpa.args else None), sdpa.kwargs.get(
        "key", sdpa.args[1] if len(sdpa.args) > 1 else None)


def test_flux_chain_is_matched_with_its_streams_weights_and_tables():
    module = _Attention()
    q, k = _sdpa_args(module, *_attention_inputs())
    chain = match_rms_rope(q)
    assert chain is not None and len(chain.sources) == 2 and chain.eps == (1e-6, 1e-6)
    assert (chain.seq, chain.head_dim) == (16, D)
    assert all(w is not None for w in chain.weights)
    assert match_rms_rope(k) is not None  # K's text stream is a product, not a graph input: still one stream
    assert match_rms_rope(q.args[0]) is None  # the [B, S, H, D] tensor before the permute is not an attention input


def test_other_rope_forms_are_not_matched():
    q, k = _sdpa_args(_Attention(written_out_rope=True), *_attention_inputs())
    assert match_rms_rope(q) is None and match_rms_rope(k) is None


@pytest.mark.parametrize("config,regional,attention", [
    ("flux-tiny", False, "fp8"), ("flux-tiny", None, "fp8"), ("flux2-tiny", False, "fp8"),
    ("flux-tiny", None, "keep"), ("flux2-tiny", False, "keep")])
def test_flux_compiled_with_the_fused_chain_equals_the_unfused_graph(config, regional, attention, monkeypatch):
    """On CPU the op runs its reference, the model's own ops: the fused and unfused graphs agree bit for bit, and
    every attention's Q and K take the op (FLUX.1's and FLUX.2's), with fp8 attention or kept in 16 bits (in a
    graph whose linears are quantized: an empty plan leaves a 16-bit graph as it was)."""
    kwargs = example_inputs(build_model(config, device="cpu"), "cpu", height=128, width=128, text_tokens=16)
    op, label = {"fp8": (rms_rope_quantize_e4m3, "RMSNorm+RoPE+e4m3 kernel"),
                 "keep": (rms_rope_16bit, "RMSNorm+RoPE kernel")}[attention]
    reference = {"fp8": "rms_rope_e4m3_reference", "keep": "rms_rope_reference"}[attention]
    plan = {"fp8": "none", "keep": "w4a4"}[attention]
    ran = []
    counted = getattr(custom_ops, reference)
    monkeypatch.setattr(custom_ops, reference, lambda *a: ran.append(1) or counted(*a))
    outs = {}
    for fuse in (True, False):
        torch._dynamo.reset()
        reports = []
        ran.clear()
        compiled = cc.compile(build_model(config, device="cpu"), plan=plan, attention=attention, inductor=False,
                              progress=False, regional=regional, fuse_attention_prologue=fuse, report=reports.append)
        outs[fuse] = compiled(**kwargs)[0]
        assert bool(ran) == fuse  # the compiled model ran the op (the graph it returned is the rewritten one)
        labels = {a.prologue for r in reports for a in r.attention}
        ops = sum(n.target is op for r in reports for n in r.graph_modules["after"].graph.nodes)
        taken = sum(a.precision == attention for r in reports for a in r.attention)
        assert labels == ({label} if fuse else {"Inductor"})
        assert ops == (2 * taken if fuse else 0) and taken > 0
        norms = sum(n.target in (torch.rms_norm, F.rms_norm) for r in reports
                    for n in r.graph_modules["after"].graph.nodes)
        assert (norms == 0) == fuse  # the chain the kernel computes is gone from the graph
    assert torch.equal(outs[True], outs[False])


def test_q_and_k_by_absmax_are_not_fused():
    kwargs = make_flux_inputs(build_flux("flux-tiny"), 64, 64, 16).kwargs
    reports = []
    cc.compile(build_flux("flux-tiny"), plan="none", attention="fp8", attention_scales="absmax", inductor=False,
               progress=False, regional=False, report=reports.append)(**kwargs)
    assert {a.prologue for a in reports[0].attention} == {"Inductor"}


def test_the_op_returns_quantize_e4m3s_descale_and_passes_opcheck():
    sources, weights = _streams((3, 5)), _weights(2)
    cos, sin = _tables(8)
    q8, descale = rms_rope_quantize_e4m3(sources, weights, [1e-6] * 2, cos, sin, 5.0)
    y = rope_pairs(torch.cat([F.rms_norm(s, (D,), w, 1e-6) for s, w in zip(sources, weights)], dim=1), cos, sin)
    ref, ref_descale = quantize_e4m3(y, 5.0)
    assert torch.equal(q8.float(), ref.float()) and torch.equal(descale, ref_descale)
    torch.library.opcheck(torch.ops.convrot.rms_rope_e4m3.default,
                          (sources, weights, [1e-6] * 2, cos, sin, torch.tensor([5.0])),
                          test_utils=("test_faketensor", "test_aot_dispatch_static"))
    assert torch.equal(rms_rope_16bit(sources, weights, [1e-6] * 2, cos, sin), y)
    torch.library.opcheck(torch.ops.convrot.rms_rope.default, (sources, weights, [1e-6] * 2, cos, sin),
                          test_utils=("test_faketensor", "test_aot_dispatch_static"))


def _cudnn_missing() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    from convrot_compiler.kernels.cudnn.fp8_attention import unavailable_reason

    return unavailable_reason()


def _flux_width_attention_both_ways(**options) -> tuple[dict, dict, dict]:
    """FLUX.1-dev's attention shape (24 heads of 128, 512 text tokens) and its output projection compiled by the
    convrot backend with Inductor (the Q, K fusion applies to a graph whose linears are quantized), Q and K by the
    kernel (True) and by Inductor's chain (False): (attention outputs, prologue labels, errors against the float32
    attention), each keyed by the fusion."""
    inputs = [t.cuda() for t in _attention_inputs(txt=512, img=1024, heads=24, d=128, batch=1)]
    module = _Attention(d=128, out_features=24 * 128).cuda()
    exact = module.float()(*(t.float() for t in inputs))[0]
    module = module.bfloat16()
    outs, labels = {}, {}
    for fuse in (True, False):
        torch._dynamo.reset()
        reports = []
        compiled = torch.compile(module, backend="convrot", options={
            **options, "fuse_attention_prologue": fuse, "report": reports.append})
        outs[fuse] = compiled(*inputs)[0]
        labels[fuse] = {a.prologue for r in reports for a in r.attention}
        assert sum(r.rewritten for r in reports) == 1, "the output projection was not quantized"
    return outs, labels, {fuse: relative_error(out, exact) for fuse, out in outs.items()}


@pytest.mark.gpu
@pytest.mark.skipif(_cudnn_missing() is not None, reason=str(_cudnn_missing()))
def test_fused_chain_on_cudnn_at_flux_widths_is_as_accurate_as_inductors():
    outs, labels, errors = _flux_width_attention_both_ways(attention="fp8")
    assert labels == {True: {"RMSNorm+RoPE+e4m3 kernel"}, False: {"Inductor"}}
    assert torch.isfinite(outs[True]).all() and 0 < errors[True] <= 1.1 * errors[False] + 1e-3, errors
    assert relative_error(outs[True], outs[False]) < errors[False], errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_chain_before_16_bit_attention_at_flux_widths_matches_inductors():
    outs, labels, errors = _flux_width_attention_both_ways()
    assert labels == {True: {"RMSNorm+RoPE kernel"}, False: {"Inductor"}}
    assert 0 < errors[True] <= 1.1 * errors[False] + 1e-4, errors
    assert relative_error(outs[True], outs[False]) < 2 * errors[False], errors


def test_an_empty_plan_leaves_a_16_bit_attentions_chain_to_the_model():
    model = build_flux("flux-tiny")
    kwargs = make_flux_inputs(model, 64, 64, 16).kwargs
    reports = []
    cc.compile(model, plan="none", inductor=False, progress=False, regional=False, report=reports.append)(**kwargs)
    assert {a.prologue for a in reports[0].attention} == {"Inductor"}
    assert reports[0].graph_after == reports[0].graph_before
