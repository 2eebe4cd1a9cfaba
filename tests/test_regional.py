"""Regional compilation: one graph per repeated block class, serving every instance."""

import pytest
import torch

import convrot_compiler as cc
from convrot_compiler.models import FLUX_CONFIGS, build_flux, make_flux_inputs
from convrot_compiler.modules import quantize_model


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _flux(seed=0):
    return build_flux({**FLUX_CONFIGS["flux-tiny"], "num_layers": 3, "num_single_layers": 4}, seed=seed)


def test_regional_compile_equals_eager_modules_with_one_graph_per_block_class():
    """3 double and 4 single blocks compile as 3 graphs (the first single block gets a hidden state
    with other strides, a second graph of its class), not 7; the forward equals the eager quantized
    modules with the same per-layer precisions, and linears outside the blocks stay bf16 with the reason."""
    model = _flux()
    kwargs = make_flux_inputs(model, 128, 128, 32).kwargs
    graphs = []
    compiled = cc.compile(model, regional=True, progress=False, gelu_epilogue=False, report=graphs.append)
    out = compiled(**kwargs)[0]
    assert len(graphs) <= 3, [g.plan for g in graphs]
    assert {g.plan for g in graphs} == {"w4a4 (FluxTransformerBlock)", "w4a4 (FluxSingleTransformerBlock)"}
    outside = [d for d in compiled.decisions if "outside the repeated blocks" in d.reason]
    assert outside and all(d.precision == "bf16" and not d.name.startswith(("transformer_blocks",
                                                                            "single_transformer_blocks"))
                           for d in outside)
    inside = [d for d in compiled.decisions if d.name.startswith("transformer_blocks.2.")]
    assert {d.precision for d in inside} == {"w4a4", "w4a16"}
    ref = _flux()
    quantize_model(ref, [(d.name, d.precision) for d in compiled.decisions], progress=False)
    with torch.no_grad():
        torch.testing.assert_close(out, ref(**kwargs)[0], rtol=0, atol=0)
    other = make_flux_inputs(model, 128, 128, 32, seed=1).kwargs
    n = len(graphs)
    compiled(**other)
    assert len(graphs) == n, "a second call recompiled"


def test_regional_compile_refuses_a_plan_that_tells_instances_apart():
    """Before any weight is prepared or released: the model stays usable."""
    from convrot_compiler.weights import is_released

    model = _flux()
    with pytest.raises(ValueError, match="one graph per block class.*transformer_blocks.0.* w8a8 and transformer_blocks.1"):
        cc.compile(model, plan=[("transformer_blocks.0.*", "w8a8"), ("*", "w4a4")], regional=True, progress=False)
    assert not any(is_released(p) for p in model.parameters())


def test_regional_compile_needs_block_classes():
    model = torch.nn.Sequential(torch.nn.Linear(256, 256))
    with pytest.raises(ValueError, match="_repeated_blocks"):
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


def test_regional_in_place_returns_the_model_with_its_blocks_compiled():
    model = _flux()
    kwargs = make_flux_inputs(model, 64, 64, 16).kwargs
    with torch.no_grad():
        out = cc.compile(model, regional=True, in_place=True, progress=False, gelu_epilogue=False)
        assert out is model
        assert all(b._compiled_call_impl is not None for b in model.single_transformer_blocks)
        ref = _flux()
        quantize_model(ref, [(d.name, d.precision) for d in model.convrot_decisions], progress=False)
        torch.testing.assert_close(model(**kwargs)[0], ref(**kwargs)[0], rtol=0, atol=0)
