"""The Inductor post-grad pass form of the rewrite, with the stock backend (CPU)."""

import pytest
import torch
import torch._inductor.config as inductor_config
from torch import nn

import convrot_compiler as cc
from convrot_compiler.compiler.inductor_pass import ConvRotInductorPass


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no Dynamo state and no Inductor/AOT cache hits between tests."""
    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False, autotune_local_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 256, bias=False), nn.Linear(256, 8)).eval()


@pytest.mark.parametrize("plan", ["w4a4", [("2", "w8a8"), ("*", "w4a4")]])
def test_post_grad_pass_matches_eager_modules(plan):
    model = _model()
    x = torch.randn(2, 24, 512)
    p = ConvRotInductorPass(plan=plan)
    bits = {"0": 4, "2": 8 if isinstance(plan, list) else 4}
    ref = nn.Sequential(cc.ConvLinear4bit.from_linear(model[0], bits=bits["0"]), nn.GELU(),
                        cc.ConvLinear4bit.from_linear(model[2], bits=bits["2"]), model[3])
    with torch.no_grad():
        expected = ref(x)
    with inductor_config.patch(freezing=True, post_grad_custom_post_pass=p, **{"cpp.weight_prepack": False}):
        with torch.no_grad():
            out = torch.compile(model)(x)
    d = {x.name: x for x in p.decisions}
    assert d["0"].precision == "w4a4" and d["2"].precision == ("w8a8" if isinstance(plan, list) else "w4a4")
    assert d["3"].precision == "bf16" and "too small" in d["3"].reason
    assert p.uuid() is None  # deliberately bypasses the FX graph cache (weights are constants here)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_post_grad_pass_without_freezing_says_why():
    p = ConvRotInductorPass()
    with inductor_config.patch(freezing=False, post_grad_custom_post_pass=p):
        with torch.no_grad():
            torch.compile(_model())(torch.randn(4, 512))
    assert p.decisions and all(d.precision == "bf16" and "freezing" in d.reason for d in p.decisions)


_PREPACK_SCRIPT = """
import torch, torch._inductor.config as ic
from torch import nn
from convrot_compiler.compiler.inductor_pass import ConvRotInductorPass
m = nn.Sequential(nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 256)).eval()
with ic.patch(freezing=True, post_grad_custom_post_pass=ConvRotInductorPass()), torch.no_grad():
    torch.compile(m)(torch.randn(2, 5, 512))
"""


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="CPU weight prepacking needs mkldnn")
def test_post_grad_pass_refuses_prepacked_cpu_linears():
    """Inductor registers its CPU prepack patterns once per process, only if weight_prepack is on the first
    time: a fresh process makes this independent of what other tests compiled."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _PREPACK_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "weight_prepack = False" in proc.stderr


class _SharedInput(nn.Module):
    """Q/K/V-like linears reading one activation (one without bias), and a linear reading another."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.q, self.k, self.v = nn.Linear(256, 256), nn.Linear(256, 256, bias=False), nn.Linear(256, 512)
        self.out = nn.Linear(256, 256)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        return self.out(q * k) + v[..., :256] - v[..., 256:]


@pytest.mark.parametrize("fuse_gemms", [True, False])
def test_post_grad_pass_shares_the_quantization_and_fuses_gemms(fuse_gemms):
    """Linears reading one activation share one rotate+quantize and (fuse_gemms) one GEMM sliced per
    linear, as in the convrot backend; the output equals the eager ConvLinear4bit modules either way."""
    model = _SharedInput().eval()
    x = torch.randn(3, 10, 256)
    with torch.no_grad():
        ref = nn.Module()
        for name in ("q", "k", "v", "out"):
            setattr(ref, name, cc.ConvLinear4bit.from_linear(getattr(model, name)))
        expected = _SharedInput.forward(ref, x)
    p = ConvRotInductorPass(fuse_gemms=fuse_gemms)
    with inductor_config.patch(freezing=True, post_grad_custom_post_pass=p, **{"cpp.weight_prepack": False}):
        with torch.no_grad():
            out = torch.compile(model)(x)
    assert sorted(d.name for d in p.decisions if d.precision == "w4a4") == ["k", "out", "q", "v"]
    assert p.activation_quantizations == 2  # x once for q/k/v, q * k once for out
    assert p.fused_gemms == (1 if fuse_gemms else 0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


class _QKV(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.q, self.k, self.v = (nn.Linear(256, 256) for _ in range(3))

    def forward(self, x):
        return self.q(x) * self.k(x) + self.v(x)


def _without_names(graph):
    """The concatenation with no name left anywhere after it: the pass cannot split it back."""
    _as_torch_2_11(graph)
    for n in graph.nodes:
        if n.target in (torch.ops.aten.reshape.default, torch.ops.aten.view.default):
            n.meta.pop("nn_module_stack", None)


def _as_torch_2_11(graph):
    """The concatenation as torch 2.11 leaves it (seen on the GPU image): ``chunk`` (aten.split.Tensor)
    instead of split_with_sizes, and the linears' names only on the reshapes after the getitems."""
    import operator

    for n in graph.nodes:
        if n.target is torch.ops.aten.split_with_sizes.default and len(set(n.args[1])) == 1:
            n.target, n.args = torch.ops.aten.split.Tensor, (n.args[0], n.args[1][0], *n.args[2:])
        elif n.target is operator.getitem:
            n.meta.pop("nn_module_stack", None)


@pytest.mark.parametrize("torch_form", ["2.13", "2.11"])
def test_post_grad_pass_splits_gemms_inductor_concatenated_and_applies_the_plan_by_name(torch_form):
    """Inductor's freezing concatenates linears reading one input (on CUDA always; here on CPU through
    cpp.enable_concat_linear) before the pass runs, and the merged GEMM has no name: the pass splits it
    back so that a plan giving v another precision (as mix does for FLUX's to_v) still applies by name."""
    model = _QKV().eval()
    x = torch.randn(2, 12, 256)
    ref = nn.Module()
    ref.q, ref.k = (cc.ConvLinear4bit.from_linear(lin) for lin in (model.q, model.k))
    ref.v = cc.ConvLinear4bit.from_linear(model.v, bits=8)
    with torch.no_grad():
        expected = _QKV.forward(ref, x)
    p = ConvRotInductorPass(plan=[("v", "w8a8"), ("*", "w4a4")])
    run = p if torch_form == "2.13" else (lambda graph: (_as_torch_2_11(graph), p(graph)))
    with inductor_config.patch(freezing=True, post_grad_custom_post_pass=run,
                               **{"cpp.weight_prepack": False, "cpp.enable_concat_linear": True}):
        with torch.no_grad():
            out = torch.compile(model)(x)
    assert {d.name: d.precision for d in p.decisions} == {"q": "w4a4", "k": "w4a4", "v": "w8a8"}
    assert (p.activation_quantizations, p.fused_gemms) == (2, 1)  # x at 4 and at 8 bits; q and k in one GEMM
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_post_grad_pass_gives_the_hadamard_factor_in_the_weights_dtype():
    """As the backend does: an fp32 factor would be cast to the activations' dtype on every call."""
    seen = []
    p = ConvRotInductorPass()

    def run(graph):
        p(graph)
        seen.append(graph.owning_module._convrot_h.dtype)

    model = nn.Sequential(nn.Linear(256, 256)).eval().bfloat16()
    with inductor_config.patch(freezing=True, post_grad_custom_post_pass=run, **{"cpp.weight_prepack": False}):
        with torch.no_grad():
            torch.compile(model)(torch.randn(4, 256, dtype=torch.bfloat16))
    assert seen == [torch.bfloat16] and p.decisions[0].precision == "w4a4"


def test_post_grad_pass_says_when_a_gemm_has_no_name():
    """A concatenated GEMM whose linears' names are gone stays one GEMM, planned by the rule matching its
    placeholder name, and its decision says so (not a silent catch-all)."""
    p = ConvRotInductorPass(plan=[("v", "w8a8"), ("*", "w4a4")])
    with inductor_config.patch(freezing=True, post_grad_custom_post_pass=lambda graph: (_without_names(graph), p(graph)),
                               **{"cpp.weight_prepack": False, "cpp.enable_concat_linear": True}):
        with torch.no_grad():
            torch.compile(_QKV().eval())(torch.randn(2, 12, 256))
    [d] = p.decisions
    assert d.name.startswith("<") and d.out_features == 768 and "has no module name" in d.reason


def test_the_pass_reads_a_config_and_refuses_the_backend_only_options():
    from convrot_compiler import ConvRotConfig

    p = ConvRotInductorPass(ConvRotConfig(plan="w8a8", group_size=64), fuse_gemms=False)
    assert (p.plan.name, p.group_size, p.fuse_gemms) == ("w8a8", 64, False)
    with pytest.raises(ValueError, match=r"\['attention'\] are the convrot backend's only"):
        ConvRotInductorPass(attention="fp8")
    with pytest.raises(ValueError, match=r"\['fuse_norms'\] are the convrot backend's only"):
        ConvRotInductorPass(fuse_norms=True)
    with pytest.raises(TypeError, match="unknown convrot option"):
        ConvRotInductorPass(plann="w4a4")


@pytest.mark.parametrize("rotation,weights", [("pca", "rtn"), ("pca-hadamard", "gptq"), ("regular", "gptq")])
def test_post_grad_pass_runs_the_calibrated_methods_as_the_backend_does(rotation, weights):
    """DiRotQ (one basis per input, shared by Q/K/V-like linears and one constant) and GPTQ weights, their
    statistics found by the frozen GEMMs' module names: the same output as convrot_compiler.compile's."""
    model = _SharedInput().eval()
    x = torch.randn(3, 10, 256)
    cal = cc.calibrate(model, [(torch.randn(4, 10, 256),)], progress=False)
    options = dict(rotation=rotation, weights=weights, calibration=cal, group_size=64)
    with torch.no_grad():
        import copy

        expected = cc.compile(copy.deepcopy(model), progress=False, **options)(x)
    torch._dynamo.reset()
    p = ConvRotInductorPass(**options)
    seen = []

    def run(graph):
        p(graph)
        seen.append([n.target for n in graph.nodes if n.op == "get_attr" and "basis" in str(n.target)])

    with inductor_config.patch(freezing=True, post_grad_custom_post_pass=run, **{"cpp.weight_prepack": False}):
        with torch.no_grad():
            out = torch.compile(model)(x)
    assert sorted(d.name for d in p.decisions if d.precision == "w4a4") == ["k", "out", "q", "v"]
    if rotation.startswith("pca"):
        assert len(seen[0]) == 2 and p.activation_quantizations == 2  # x's basis for q/k/v, q * k's for out
        assert all(d.extra["rank"] > 0 for d in p.decisions)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_post_grad_pass_refuses_a_calibrated_method_for_a_linear_the_calibration_never_saw():
    model = _SharedInput().eval()
    cal = cc.calibrate(model, [(torch.randn(2, 4, 256),)], progress=False)
    del cal.shared["out"]
    p = ConvRotInductorPass(rotation="pca", calibration=cal, group_size=64)
    with inductor_config.patch(freezing=True, post_grad_custom_post_pass=p, **{"cpp.weight_prepack": False}):
        with torch.no_grad(), pytest.raises(Exception, match="out: the calibration never saw this linear"):
            torch.compile(model)(torch.randn(2, 4, 256))
