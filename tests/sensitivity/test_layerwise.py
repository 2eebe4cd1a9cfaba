"""Error after the first blocks and per-layer SQNR (sensitivity/layerwise.py), on a small FLUX (CPU)."""

import copy
import math

import pytest
import torch

from convrot_compiler.nn import quantize_model
from convrot_compiler.nn.linear import make_quantized_linear
from convrot_compiler.numerics.error import relative_error
from convrot_compiler.sensitivity import error_by_depth, layer_sqnr, layerwise
from convrot_compiler.sensitivity.layerwise import repeated_blocks
from convrot_compiler.tools.models import build_flux, make_flux_inputs
from convrot_compiler.tools.pipelines import capture_transformer_inputs, random_pipeline, random_prompt_embeds

pytestmark = pytest.mark.usefixtures("fresh_dynamo", "no_grad")


@pytest.fixture(scope="module")
def model():
    return build_flux("flux-tiny", seed=0, std=0.05)


@pytest.fixture(scope="module")
def inputs(model):
    return make_flux_inputs(model, 64, 64, 16).kwargs


def test_repeated_blocks_are_the_double_then_the_single_stream_blocks(model):
    names = [n for n, _ in repeated_blocks(model)]
    assert names == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                     "single_transformer_blocks.1"]


def test_error_after_the_first_block_matches_a_quantized_copy(model, inputs):
    def first_block_output(m):
        out = []
        handle = m.transformer_blocks[0].register_forward_hook(lambda mod, a, o: out.append(o))
        m(**inputs)
        handle.remove()
        return torch.cat([t.float().flatten() for t in out[0]])

    ref = first_block_output(model)
    quantized = copy.deepcopy(model)
    quantize_model(quantized, "w4a4", progress=False)
    expected = relative_error(first_block_output(quantized), ref)
    errors = error_by_depth(model, kwargs=inputs, plan="w4a4", depths=(1, 3, 99))
    assert list(errors) == [1, 3]  # beyond the model's 4 blocks: left out
    assert errors[1] == pytest.approx(expected, rel=1e-6) and expected > 0


def test_w8a8_error_by_depth_is_far_below_w4a4_and_the_model_is_left_as_it_was(model, inputs):
    before = model(**inputs)[0]
    w4, w8 = (error_by_depth(model, kwargs=inputs, plan=p, depths=(1, 2, 4)) for p in ("w4a4", "w8a8"))
    for k in (1, 2, 4):
        assert 0 < w8[k] and w4[k] > 5 * w8[k], (k, w4, w8)
    assert torch.equal(model(**inputs)[0], before)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("to_q"))


def test_layer_sqnr_is_each_layers_own_error_on_its_float_inputs(model, inputs):
    layers = {s.name: s for s in layer_sqnr(model, kwargs=inputs, plan="w4a4")}
    assert len(layers) == 46
    name = "transformer_blocks.1.ff.net.2"
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.append((a[0], o)))
    model(**inputs)
    handle.remove()
    x, y = seen[0]
    q = make_quantized_linear(model.get_submodule(name), "w4a4", 256, "regular")
    expected = 10 * math.log10(y.float().pow(2).sum() / (q(x).float() - y.float()).pow(2).sum())
    assert layers[name].sqnr_db == pytest.approx(expected, abs=1e-3) and layers[name].precision == "w4a4"
    w8 = {s.name: s for s in layer_sqnr(model, kwargs=inputs, plan="w8a8")}
    assert w8[name].sqnr_db > layers[name].sqnr_db + 18  # four more bits: about 24 dB


def test_layerwise_report_summarizes_by_kind_and_refuses_a_plan_that_quantizes_nothing(model, inputs):
    report = layerwise(model, kwargs=inputs, plan="w4a4", depths=(1, 2))
    kinds = report.sqnr_by_kind()
    ff = kinds["transformer_blocks.*.ff.net.2 (w4a4)"]
    assert ff["layers"] == 2 and ff["min"] <= ff["median"] <= ff["max"]
    assert "after 2 blocks" in report.table() and "SQNR dB min" in report.table()
    with pytest.raises(ValueError, match="quantizes none"):
        error_by_depth(model, kwargs=inputs, plan="none")
    with pytest.raises(ValueError, match="from 1"):
        error_by_depth(model, kwargs=inputs, depths=(0,))


def test_capture_transformer_inputs_takes_the_asked_steps_call_and_stops_there():
    pipe = random_pipeline("flux-tiny", "cpu", 0)
    pipe.set_progress_bar_config(disable=True)
    embeds = random_prompt_embeds(pipe.transformer, 1, 8, "cpu")[0]
    call = dict(**embeds, height=32, width=32, num_inference_steps=3, guidance_scale=3.5)
    first = capture_transformer_inputs(pipe, dict(call, generator=torch.Generator().manual_seed(0)), step=0)
    last = capture_transformer_inputs(pipe, dict(call, generator=torch.Generator().manual_seed(0)), step=2)
    assert first["timestep"].item() > last["timestep"].item()
    tokens = first["hidden_states"].shape[1]
    assert first["hidden_states"].shape == last["hidden_states"].shape == (1, tokens, 64) and tokens > 1
    assert not torch.equal(first["hidden_states"], last["hidden_states"])  # denoised twice in between
    assert torch.equal(first["encoder_hidden_states"], embeds["prompt_embeds"])
    assert pipe.transformer(**last)[0].shape == (1, tokens, 64)
    with pytest.raises(ValueError, match="outside the 3 denoising steps"):
        capture_transformer_inputs(pipe, call, step=3)


def test_the_measures_take_a_calibrated_method(model, inputs):
    import convrot_compiler as cc

    cal = cc.calibrate(model, [make_flux_inputs(model, 64, 64, 16, seed=i).kwargs for i in range(1, 4)],
                       progress=False)
    convrot = {s.name: s.sqnr_db for s in layer_sqnr(model, kwargs=inputs)}
    dirotq = {s.name: s.sqnr_db for s in layer_sqnr(model, kwargs=inputs, group_size=64, rotation="pca",
                                                    weights="gptq", calibration=cal)}
    name = "transformer_blocks.0.ff.net.2"
    w4a4 = [n for n in convrot if "norm" not in n and "embed" not in n]
    assert set(w4a4) <= dirotq.keys() and dirotq[name] > convrot[name] + 3
    depth = error_by_depth(model, kwargs=inputs, depths=(1,), group_size=64, rotation="pca", calibration=cal)
    assert 0 < depth[1] < error_by_depth(model, kwargs=inputs, depths=(1,))[1]
