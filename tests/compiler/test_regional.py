"""Regional compilation: one graph per repeated block class, serving every instance."""

import pytest
import torch
from torch import nn

import convrot_compiler as cc
from convrot_compiler.compiler.weights import is_released
from convrot_compiler.nn.linear import quantize_model
from convrot_compiler.plans import decide_linears
from convrot_compiler.tools.models import FLUX_CONFIGS, build_flux, make_flux_inputs

pytestmark = pytest.mark.usefixtures("fresh_dynamo", "no_grad")  # conftest: Dynamo reset, no_grad


def _flux(seed=0):
    return build_flux({**FLUX_CONFIGS["flux-tiny"], "num_layers": 3, "num_single_layers": 4}, seed=seed)


def test_regional_compile_equals_eager_modules_with_one_graph_per_block_class():
    """3 double and 4 single blocks compile as 3 graphs (the first single block gets a hidden state
    with other strides, a second graph of its class), not 7, plus one graph each for the embedders
    and norm_out, which hold quantized linears too: every linear gets the precision of a
    whole-model compile, and the forward equals the eager quantized modules."""
    model = _flux()
    kwargs = make_flux_inputs(model, 128, 128, 32).kwargs
    whole = {d.name: d.precision for d in decide_linears(model, "w4a4")}
    graphs = []
    compiled = cc.compile(model, regional=True, progress=False, gelu_epilogue=False, report=graphs.append)
    out = compiled(**kwargs)[0]
    assert compiled is model and {d.name: d.precision for d in model.convrot_decisions} == whole
    assert len(graphs) <= 5, [g.plan for g in graphs]
    assert {g.plan for g in graphs} == {"w4a4 (FluxTransformerBlock)", "w4a4 (FluxSingleTransformerBlock)",
                                        "w4a4 (time_text_embed)", "w4a4 (norm_out)"}
    ref = _flux()
    quantize_model(ref, "w4a4", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(out, ref(**kwargs)[0], rtol=0, atol=0)
    other = make_flux_inputs(model, 128, 128, 32, seed=1).kwargs
    n = len(graphs)
    compiled(**other)
    assert len(graphs) == n, "a second call recompiled"


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(256, 256)

    def forward(self, x):
        return x + self.lin(x)


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(256, 256)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class _Model(nn.Module):
    _repeated_blocks = ["_Block"]

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(256, 256)
        self.stack = _Stack()

    def forward(self, x):
        return self.stack(self.embed(x))


def test_regional_compile_says_why_a_linear_runs_eagerly():
    """A linear beside the blocks in one top-level module, and a top-level torch.nn module (which Dynamo
    does not compile alone), stay bf16 with the reason, and keep their float weights."""
    torch.manual_seed(0)
    model = _Model().eval()
    graphs = []
    compiled = cc.compile(model, plan=[("*", "w4a4")], regional=True, progress=False, report=graphs.append)
    x = torch.randn(2, 16, 256)
    out = compiled(x)
    d = {x.name: x for x in model.convrot_decisions}
    assert [d[f"stack.blocks.{i}.lin"].precision for i in (0, 1)] == ["w4a4", "w4a4"] and len(graphs) == 1
    assert d["stack.head"].precision == "bf16" and "also holds repeated blocks" in d["stack.head"].reason
    assert d["embed"].precision == "bf16" and "torch.nn Linear" in d["embed"].reason
    assert not is_released(model.embed.weight) and not is_released(model.stack.head.weight)
    assert is_released(model.stack.blocks[0].lin.weight)
    with torch.no_grad():
        h = model.stack.blocks[1](model.stack.blocks[0](model.embed(x)))  # the blocks compiled, weights prepared
        torch.testing.assert_close(out, model.stack.head(h), rtol=0, atol=0)


def test_instances_a_plan_tells_apart_get_graphs_of_their_own():
    """The FLUX mix keeps block 18's MLP outputs bf16: instances with other precisions are compiled under
    their own plan (a graph of their own), the others still share one, and the forward equals the eager
    modules with the same decisions."""
    model = _flux()
    kwargs = make_flux_inputs(model, 64, 64, 16).kwargs
    plan = [("transformer_blocks.2.ff.net.2", "bf16"), ("single_transformer_blocks.3.attn.to_v", "w8a8"),
            ("x_embedder", "bf16"), ("proj_out", "bf16"), ("*norm*.linear", "w4a16"), ("time_text_embed.*", "w4a16"),
            ("*", "w4a4")]
    graphs = []
    cc.compile(model, plan=plan, progress=False, gelu_epilogue=False, report=graphs.append)
    units = {tuple(u.modules) for u in model.forward.units}
    assert {("transformer_blocks.0", "transformer_blocks.1"), ("transformer_blocks.2",),
            ("single_transformer_blocks.0", "single_transformer_blocks.1", "single_transformer_blocks.2"),
            ("single_transformer_blocks.3",)} <= units
    out = model(**kwargs)[0]
    assert {g.plan for g in graphs} >= {"custom (FluxTransformerBlock: transformer_blocks.2)",
                                        "custom (FluxTransformerBlock: transformer_blocks.0 and 1 more)"}
    decisions = {d.name: d.precision for d in model.convrot_decisions}
    assert decisions["transformer_blocks.2.ff.net.2"] == "bf16" and decisions["transformer_blocks.1.ff.net.2"] == "w4a4"
    ref = _flux()
    quantize_model(ref, list(decisions.items()), progress=False)
    torch.testing.assert_close(out, ref(**kwargs)[0], rtol=0, atol=0)


def test_regional_compile_needs_block_classes():
    model = torch.nn.Sequential(torch.nn.Linear(256, 256))
    with pytest.raises(ValueError, match="_repeated_blocks.*regional=False"):
        cc.compile(model, regional=True, progress=False)
    with pytest.raises(ValueError, match="no module of class"):
        cc.compile(model, regional=["FluxTransformerBlock"], progress=False)


def test_running_out_of_recompiles_says_what_to_raise():
    model = _flux()
    compiled = cc.compile(model, regional=True, progress=False)
    with torch._dynamo.config.patch(recompile_limit=2):
        compiled(**make_flux_inputs(model, 64, 64, 16).kwargs)  # the single blocks' two graphs
        with pytest.raises(RuntimeError, match="recompile_limit"):
            compiled(**make_flux_inputs(model, 96, 96, 16).kwargs)


def test_regional_is_the_default_where_blocks_repeat_and_finds_module_lists():
    """FLUX declares _repeated_blocks; a model without it is searched for a ModuleList of one block class
    (SD3's case); regional=False and a model without repeated blocks compile the whole forward."""
    from convrot_compiler.compiler.regional import repeated_block_classes

    model = _flux()
    kwargs = make_flux_inputs(model, 64, 64, 16).kwargs
    cc.compile(model, progress=False, gelu_epilogue=False)
    assert all(b._compiled_call_impl is not None for b in model.single_transformer_blocks)
    assert {u.name for u in model.forward.units} == {"FluxTransformerBlock", "FluxSingleTransformerBlock",
                                                     "time_text_embed", "norm_out"}
    ref = _flux()
    quantize_model(ref, [(d.name, d.precision) for d in model.convrot_decisions], progress=False)
    torch.testing.assert_close(model(**kwargs)[0], ref(**kwargs)[0], rtol=0, atol=0)

    class Undeclared(_Model):
        _repeated_blocks = None

    assert repeated_block_classes(Undeclared()) == ["_Block"]
    assert repeated_block_classes(nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))) == []
    whole = _flux()
    cc.compile(whole, progress=False, regional=False)
    assert whole.forward.units == [] and all(b._compiled_call_impl is None for b in whole.single_transformer_blocks)
