"""The convrot torch.compile backend on a small FluxTransformer2DModel (CPU)."""


import pytest
import torch
from torch import nn

import convrot_compiler as cc
from convrot_compiler.compiler.backend import REPORTS
from convrot_compiler.compiler.weights import PREPARED, model_bytes
from convrot_compiler.config import ConvRotConfig
from convrot_compiler.nn.linear import quantize_model
from convrot_compiler.ops import quantize_activation, quantized_linear, quantized_matmul
from convrot_compiler.plans import decide_linears
from convrot_compiler.tools.inspection import inspect
from convrot_compiler.tools.models import build_flux, make_flux_inputs, relative_error

pytestmark = pytest.mark.usefixtures("fresh_dynamo", "no_grad")  # conftest: Dynamo reset, no_grad


def _rewritten_nodes(gm) -> int:
    return sum(n.op == "call_function" and n.target in (quantized_linear, quantized_matmul) for n in gm.graph.nodes)


def _inputs(model, size=128, text=16, seed=0):
    return make_flux_inputs(model, size, size, text, seed=seed).kwargs


def _eager_reference(seed, plan, rotation, kwargs):
    ref = build_flux("flux-tiny", seed=seed)
    quantize_model(ref, plan, rotation=rotation, progress=False)
    with torch.no_grad():
        return ref(**kwargs)[0]


@pytest.mark.parametrize("plan,rotation", [("w4a4", "regular"), ("w8a8", "regular"), ("mix", "regular"),
                                           ("w4a4", "sylvester"), ("w4a4", "none")])
def test_compiled_equals_eager_modules_and_rewrites_what_the_plan_predicts(plan, rotation):
    model = build_flux("flux-tiny", seed=3)
    kwargs = _inputs(model)
    expected = sum(d.precision != "bf16" for d in decide_linears(model, plan))
    ref = _eager_reference(3, plan, rotation, kwargs)
    # the eager modules round each GEMM output to bf16 before the GELU; the default GELU epilogue does
    # not (tested against this path in test_gelu_runs_in_the_gemm_epilogue_...)
    compiled = cc.compile(model, plan=plan, rotation=rotation, progress=False, regional=False, gelu_epilogue=False)
    out = compiled(**kwargs)[0]
    report = REPORTS[-1]
    assert report.rewritten == expected > 0
    assert report.fused_gemms > 0  # Q/K/V
    gemms = expected - report.fused_linears + report.fused_gemms
    assert _rewritten_nodes(report.graph_modules["after"]) == gemms
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_mix_plan_keeps_exactly_the_paper_exceptions():
    model = build_flux("flux-tiny", seed=0)
    cc.compile(model, plan="mix", progress=False, regional=False)(**_inputs(model))
    by_name = {d.name: d.precision for d in REPORTS[-1].decisions}
    w8 = sorted(n for n, p in by_name.items() if p == "w8a8")
    assert w8 == ["single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.1.attn.to_v",
                  "transformer_blocks.0.attn.to_out.0", "transformer_blocks.1.attn.to_out.0"]


def test_weights_are_prepared_once_and_float_storage_released():
    model = build_flux("flux-tiny", seed=1)
    kwargs = _inputs(model)
    before_bytes = model_bytes(model)
    n_quant = sum(d.precision != "bf16" for d in decide_linears(model, "w4a4"))
    start = PREPARED.prepared_count
    compiled = cc.compile(model, progress=False, regional=False)
    assert PREPARED.prepared_count - start == n_quant
    compiled(**kwargs)
    compiled(**kwargs)
    assert PREPARED.prepared_count - start == n_quant
    prepared = sum(d.bytes_after for d in compiled.convrot_decisions if d.precision != "bf16")
    assert model_bytes(model) + prepared < 0.3 * before_bytes


def test_two_instances_of_one_class_keep_their_own_weights():
    """pytorch#139272: a second instance must not reuse the first one's folded weights."""
    a, b = build_flux("flux-tiny", seed=10), build_flux("flux-tiny", seed=11)
    kwargs = _inputs(a)
    ref_a = _eager_reference(10, "w4a4", "regular", kwargs)
    ref_b = _eager_reference(11, "w4a4", "regular", kwargs)
    opts = {"plan": "w4a4", "gelu_epilogue": False}  # bit-equal to the eager modules (see above)
    ca = torch.compile(a, backend="convrot", options=opts, fullgraph=True)
    cb = torch.compile(b, backend="convrot", options=opts, fullgraph=True)
    with torch.no_grad():
        out_a, out_b = ca(**kwargs)[0], cb(**kwargs)[0]
        out_a2 = ca(**kwargs)[0]
    assert relative_error(ref_a, ref_b) > 0.1
    torch.testing.assert_close(out_a, ref_a, rtol=0, atol=0)
    torch.testing.assert_close(out_b, ref_b, rtol=0, atol=0)
    torch.testing.assert_close(out_a2, ref_a, rtol=0, atol=0)


def test_new_sequence_length_recompiles_and_stays_correct():
    model = build_flux("flux-tiny", seed=4)
    small, large = _inputs(model, 128, 16), _inputs(model, 192, 24, seed=1)
    refs = [_eager_reference(4, "w4a4", "regular", k) for k in (small, large)]
    graphs = []
    compiled = cc.compile(model, progress=False, regional=False, gelu_epilogue=False,  # bit-equal to the eager modules
                          report=graphs.append)
    outs = [compiled(**k)[0] for k in (small, large)]
    assert len(graphs) == 2  # dynamic=False: one graph per sequence length
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_compiled_graph_holds_no_weight_constants():
    """Prepared weights are graph inputs, so nothing large can land in a compile-cache entry."""
    model = build_flux("flux-tiny", seed=0)
    cc.compile(model, progress=False, regional=False)(**_inputs(model))
    gm = REPORTS[-1].graph_modules["after"]
    assert not any(n.op == "get_attr" for n in gm.graph.nodes)
    assert sum(t.numel() for t in list(gm.parameters()) + list(gm.buffers())) == 0
    assert not [v for v in vars(gm).values() if isinstance(v, torch.Tensor)]


def test_empty_plan_leaves_the_graph_identical():
    model = build_flux("flux-tiny", seed=0)
    kwargs = _inputs(model)
    with torch.no_grad():
        ref = model(**kwargs)[0]
        out = torch.compile(model, backend="convrot", options={"plan": "none"})(**kwargs)[0]
    r = REPORTS[-1]
    assert r.rewritten == 0 and r.graph_after == r.graph_before
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_bad_options_and_grad_mode_give_clear_errors():
    with pytest.raises(TypeError, match="unknown convrot option.*bits.*valid options"):
        ConvRotConfig.from_backend_options({"plan": "w4a4", "bits": 4})
    with pytest.raises(TypeError, match="apply to convrot_compiler.compile, not to the torch.compile backend"):
        ConvRotConfig.from_backend_options({"release_weights": False})
    with pytest.raises(TypeError, match="unknown convrot option.*plann"):
        ConvRotConfig().replace(plann="w4a4")
    with pytest.raises(ValueError, match="unknown plan"):
        ConvRotConfig.from_backend_options({"plan": "int3"})
    with pytest.raises(ValueError, match="power of 4"):
        ConvRotConfig.from_backend_options({"group_size": 128})
    lin = nn.Sequential(nn.Linear(256, 64))
    with torch.enable_grad(), pytest.raises(Exception, match="inference-only"):
        torch.compile(lin, backend="convrot")(torch.randn(4, 256))


def test_the_stock_backend_without_options_is_the_w4a4_default():
    """torch.compile drops an empty options dict: no options, {} and the explicit default all quantize alike."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(256, 64)).bfloat16()
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    outs = []
    for kwargs in ({}, {"options": {}}, {"options": {"plan": "w4a4"}}):
        torch._dynamo.reset()
        outs.append(torch.compile(lin, backend="convrot", **kwargs)(x))
        assert REPORTS[-1].rewritten == 1 and REPORTS[-1].plan == "w4a4"
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], lin(x))
    torch._dynamo.reset()
    w8 = torch.compile(lin, backend="convrot", options={"config": ConvRotConfig(plan="w8a8")})(x)
    assert REPORTS[-1].plan == "w8a8" and not torch.equal(w8, outs[0])


def test_layers_left_alone_carry_their_reason():
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 32))
    with torch.no_grad():
        ref = model(torch.randn(8, 64))
    report = inspect(model, (torch.randn(8, 64),))
    d = {x.name: x for x in report.decisions}
    assert d["0"].precision == "bf16" and "smaller than the group size" in d["0"].reason
    assert d["2"].precision == "w4a4" and d["2"].rows == 8
    assert ref.shape == (8, 32)


def test_inspect_flux_tiny_on_meta_device(tmp_path):
    model = build_flux("flux-tiny", device="meta")
    kwargs = make_flux_inputs(model, 128, 128, 16, device="meta").kwargs
    report = inspect(model, example_kwargs=kwargs, plan="w4a4")
    t = report.totals()
    assert t["graphs"] == 1 and t["linears_matched"] == 50
    assert t["by_precision"]["w4a4"] == 34 and t["by_precision"]["w4a16"] == 12
    assert 0.2 < t["ratio"] < 0.3
    # Q/K/V of each stream (and the single blocks' MLP input) share one rotate+quantize:
    # per double block 2 streams x (qkv, out, ff up, ff down), per single block (qkv+mlp, proj_out)
    assert t["activation_quantizations"] == 2 * 8 + 2 * 2 and t["shared_activation_quantizations"] == 2 * 4 + 2 * 3
    gm = report.reports[0].graph_modules["after"]
    # the single blocks' proj_out input is a concatenation, read by rotate+quantize from both parts
    assert sum(n.target is quantize_activation for n in gm.graph.nodes) == 20 - 2 == 20 - t["fused_producers"]
    assert "kept by plan rule 'x_embedder'" in report.table()
    assert '"linears_matched": 50' in report.to_json()
    # ... and one GEMM: per double block Q/K/V of each stream, per single block Q/K/V + MLP input
    assert t["fused_gemms"] == 2 * 2 + 2 and t["fused_linears"] == 2 * 6 + 2 * 4
    assert "20 linears computed by 6 fused GEMMs" in report.summary()
    written = report.dump(str(tmp_path))
    assert _rewritten_nodes(report.reports[0].graph_modules["after"]) == 12 + 20
    code = (tmp_path / "graph0_after.py").read_text()
    assert code.count("custom_ops_quantized_matmul(") == 20 and written
    assert code.count("custom_ops_quantized_linear(") == 12
    assert code.count("torch.narrow(") == 20

    unfused = inspect(model, example_kwargs=kwargs, plan="w4a4", fuse_gemms=False)
    assert unfused.totals()["fused_gemms"] == 0
    assert _rewritten_nodes(unfused.reports[0].graph_modules["after"]) == 46


def test_inductor_path_on_cpu_matches_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 128))
    x = torch.randn(2, 24, 512)
    ref = nn.Sequential(cc.ConvLinear4bit.from_linear(model[0]), nn.GELU(), cc.ConvLinear4bit.from_linear(model[2]))
    with torch.no_grad():
        expected = ref(x)
    out = cc.compile(model, inductor=True, progress=False, regional=False)(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_prepared_weights_reach_inductor_with_static_shapes(monkeypatch):
    """Graph inputs Dynamo never saw would get dynamic sizes without a guard source; an Inductor
    kernel that indexes one then fails while building guards."""
    from torch._inductor import compile_fx as cfx

    seen = []
    real = cfx.compile_fx

    def spy(gm, inputs, **kwargs):
        mode = torch._guards.TracingContext.get().fake_mode
        seen.extend((tuple(mode.from_tensor(t).shape), t.dtype) for t in inputs[-3:])
        return real(gm, inputs, **kwargs)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    model = nn.Sequential(nn.Linear(512, 256), nn.GELU()).to(torch.bfloat16)
    cc.compile(model, inductor=True, progress=False, regional=False)(torch.randn(24, 512, dtype=torch.bfloat16))
    # packed int4 values, scales, the 16x16 Hadamard factor (in the activations' dtype: no cast per call)
    assert seen == [((256, 256), torch.int8), ((256,), torch.float32), ((16, 16), torch.bfloat16)]


@pytest.mark.parametrize("enabled", [True, False])
def test_inductor_compiles_with_persistent_rows_unless_told_not_to(monkeypatch, enabled):
    import torch.compiler.config as compiler_config
    from torch._inductor import compile_fx as cfx
    from torch._inductor.virtualized import V

    calls = []

    def spy(gm, inputs, **kwargs):
        calls.append((type(V.choices).__name__, compiler_config.cache_key_tag, kwargs.get("config_patches")))
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", spy)
    model = nn.Sequential(nn.Linear(512, 256), nn.GELU())
    options = {} if enabled else {"persistent_rows": False}
    with compiler_config.patch(cache_key_tag="the user's tag"):
        cc.compile(model, inductor=True, progress=False, regional=False, **options)(torch.randn(24, 512))
        assert compiler_config.cache_key_tag == "the user's tag"
    # Inductor's cache does not key on the choices handler: the tag it keys on carries the choice
    ((handler, tag, patches),) = calls
    assert handler == ("PersistentRows" if enabled else "InductorChoices") and patches is None
    assert tag.startswith("the user's tag|convrot-inductor-choices:") and tag.endswith(f"persistent_rows={int(enabled)}")
    assert type(V.choices).__name__ == "InductorChoices"  # restored after the compile


def test_each_persistent_rows_choice_has_its_own_graphs_in_inductors_cache():
    """Compiled by Inductor (on CPU here) with one choice and then the other, each misses Inductor's FX graph cache
    the first time and hits it the second: a graph cached under one choice never comes back under the other."""
    import copy

    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_inductor_cache

    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(256), nn.Linear(256, 128))
    x = torch.randn(8, 256)
    seen = []
    with fresh_inductor_cache():
        for enabled in (True, False, True, False):
            torch._dynamo.reset()
            counters.clear()
            cc.compile(copy.deepcopy(model), inductor=True, progress=False, regional=False,
                       persistent_rows=enabled)(x)
            seen.append({k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")})
    assert seen == [{"fxgraph_cache_miss": 1}] * 2 + [{"fxgraph_cache_hit": 1}] * 2


def test_gelu_runs_in_the_gemm_epilogue_and_the_concatenation_in_the_quantization():
    """The defaults: each MLP up-projection's GELU runs in its GEMM's epilogue (in the single blocks the
    MLP goes last in the fused Q/K/V/MLP GEMM, which applies the GELU from its first MLP column), and
    the single blocks' cat([attn, mlp]) is read by rotate+quantize from both parts. No GELU or cat is
    left; the output stays within bf16 rounding of the unfused graph's (the GELU now reads the GEMM's
    float32 output instead of its bf16 rounding)."""
    from convrot_compiler.ops.custom_ops import quantize_cat_activation, quantized_matmul

    model = build_flux("flux-tiny", seed=2)
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    kwargs = _inputs(model)
    plain = cc.compile(build_flux("flux-tiny", seed=2), plan="w4a4", progress=False, regional=False, fuse_producers=False,
                       gelu_epilogue=False)(**kwargs)[0]
    cats_before = sum(n.target is torch.cat for n in REPORTS[-1].graph_modules["after"].graph.nodes)
    torch._dynamo.reset()
    out = cc.compile(model, plan="w4a4", progress=False, regional=False)(**kwargs)[0]
    report = REPORTS[-1]
    gm = report.graph_modules["after"]
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    gelu_gemms = [n for n in nodes if n.target is quantized_matmul and n.args[9] is not None]
    assert report.gelu_epilogues == len(gelu_gemms) == 2 * 2 + 2
    assert sorted(n.args[9] for n in gelu_gemms) == [0] * 4 + [3 * dim] * 2  # single blocks: after Q, K, V
    cats = [n for n in nodes if n.target is quantize_cat_activation]
    assert report.fused_producers == len(cats) == 2
    assert not any(n.target is torch._C._nn.gelu for n in nodes)
    assert sum(n.target is torch.cat for n in nodes) == cats_before - 2
    assert relative_error(out, plain) < 2e-2
    assert "6 GELUs computed in their GEMM's epilogue" in inspect(
        build_flux("flux-tiny", device="meta"), example_kwargs=make_flux_inputs(
            build_flux("flux-tiny", device="meta"), 128, 128, 16, device="meta").kwargs, plan="w4a4").summary()


def test_producer_fusion_leaves_other_patterns_alone():
    from convrot_compiler.compiler.producers import match_cat_producer

    g = torch.fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    tanh = g.call_function(torch._C._nn.gelu, (b,), {"approximate": "tanh"})
    assert match_cat_producer(tanh, 256) is None  # a GELU is not a concatenation
    cat = g.call_function(torch.cat, ([a, tanh],), {"dim": -1})
    for n, v in ((a, torch.empty(2, 100)), (b, torch.empty(2, 512)), (tanh, torch.empty(2, 512)),
                 (cat, torch.empty(2, 612))):
        n.meta["example_value"] = v
    assert match_cat_producer(cat, 256) is None  # 100 channels before the second part: off the group grid
    a.meta["example_value"] = torch.empty(2, 256)
    cat.meta["example_value"] = torch.empty(2, 768)
    assert match_cat_producer(cat, 256) == (a, tanh)  # the GELU's output read as the second part
    plain_cat = g.call_function(torch.cat, ([a, b],), {"dim": -1})
    plain_cat.meta["example_value"] = torch.empty(2, 768)
    assert match_cat_producer(plain_cat, 256) == (a, b)
    a.meta["example_value"] = torch.empty(2, 256, dtype=torch.float16)
    assert match_cat_producer(plain_cat, 256) is None  # two dtypes


def test_inspect_reports_folded_producers(tmp_path):
    import subprocess
    import sys

    model = build_flux("flux-tiny", device="meta")
    kwargs = make_flux_inputs(model, 128, 128, 16, device="meta").kwargs
    assert inspect(model, example_kwargs=kwargs, plan="w4a4", fuse_producers=False).totals()["fused_producers"] == 0
    report = inspect(model, example_kwargs=kwargs, plan="w4a4", gelu_epilogue=False)
    assert report.totals()["fused_producers"] == 2 and report.totals()["gelu_epilogues"] == 0
    assert "2 concatenations read inside their rotate+quantize" in report.summary()
    proc = subprocess.run([sys.executable, "-m", "convrot_compiler", "inspect", "--config", "flux-tiny", "--height",
                           "128", "--width", "128", "--text-tokens", "16", "--no-gelu-epilogue"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "2 concatenations read inside" in proc.stdout and "GELUs computed" not in proc.stdout


def test_compile_takes_a_config_object_and_overrides_by_name():
    config = ConvRotConfig(plan="w8a8", regional=False)
    model = build_flux("flux-tiny")
    assert cc.compile(model, config, progress=False) is model
    precisions = {d.precision for d in model.convrot_decisions}
    assert "w8a8" in precisions and "w4a4" not in precisions and model.forward.units == []
    other = cc.compile(build_flux("flux-tiny"), config, plan="w4a4", progress=False)
    assert "w4a4" in {d.precision for d in other.convrot_decisions} and config.plan.name == "w8a8"
    with pytest.raises(ValueError, match="option 'gelu_epilogue' must be a bool"):
        config.replace(gelu_epilogue=None)
    with pytest.raises(TypeError, match="unknown convrot option"):
        config.replace(gemm="template")


@pytest.mark.parametrize("gelu_epilogue", [False, True])
def test_a_linear_feeding_a_linear_is_rewritten_in_order(gelu_epilogue):
    """The matches are taken before any rewrite: a linear whose input is another rewritten linear's output
    (or a GELU moved into that linear's epilogue) must read the new node, not the erased one (the graph
    failed with "used before it has been defined", as on Wan)."""
    def stack():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256), nn.GELU(approximate="tanh"),
                             nn.Linear(256, 256)).bfloat16()

    ref = stack()
    quantize_model(ref, [("*", "w4a4")], progress=False)
    model = stack()
    cc.compile(model, plan=[("*", "w4a4")], progress=False, gelu_epilogue=gelu_epilogue)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    out = model(x)
    assert REPORTS[-1].rewritten == 3 and REPORTS[-1].gelu_epilogues == int(gelu_epilogue)
    if gelu_epilogue:  # the epilogue skips the eager modules' bf16 rounding before the GELU, and the int4
        # quantization after it turns a few of those roundings into whole steps: 0.025 measured, where one W4A4
        # linear alone departs ~0.18 from bf16
        assert relative_error(out, ref(x)) < 0.05
    else:
        torch.testing.assert_close(out, ref(x), rtol=0, atol=0)
