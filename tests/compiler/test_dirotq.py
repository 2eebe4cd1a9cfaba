"""DiRotQ and GPTQ through the compiler: the compiled model computes what the eager modules do, shares one
rotate+split+quantize per input, and refuses calibrations that do not fit (CPU)."""

import copy

import pytest
import torch

import convrot_compiler as cc
from convrot_compiler.calibration import CalibrationError
from convrot_compiler.numerics.error import relative_error
from convrot_compiler.tools.models import build_flux, make_flux_inputs

pytestmark = pytest.mark.usefixtures("fresh_dynamo", "no_grad")


@pytest.fixture(scope="module")
def model():
    return build_flux("flux-tiny", seed=0, std=0.05)


@pytest.fixture(scope="module")
def cal(model):
    with torch.no_grad():
        return cc.calibrate(model, [make_flux_inputs(model, 128, 128, 64, seed=i).kwargs for i in range(4)],
                            progress=False)


@pytest.fixture(scope="module")
def inputs(model):
    return make_flux_inputs(model, 128, 128, 64, seed=99).kwargs


@pytest.mark.parametrize("rotation,weights", [("pca-hadamard", "gptq")])
def test_compiled_dirotq_equals_the_eager_modules_and_shares_one_quantization_per_input(model, cal, inputs, rotation,
                                                                                           weights):
    eager = copy.deepcopy(model)
    cc.quantize_model(eager, "w4a4", rotation=rotation, weights=weights, calibration=cal, progress=False)
    compiled = cc.compile(copy.deepcopy(model), rotation=rotation, weights=weights, calibration=cal, progress=False)
    assert torch.equal(compiled(**inputs)[0], eager(**inputs)[0])
    assert relative_error(compiled(**inputs)[0], model(**inputs)[0]) < 0.3
    dirotq = [d for d in compiled.convrot_decisions if d.extra.get("method") == "dirotq"]
    assert len(dirotq) == 34 and all(d.extra["rank"] == 64 and d.extra["weights"] == weights for d in dirotq
                                     if d.in_features == 256)
    block = next(r for r in compiled.convrot_reports if any(d.name.endswith("ff.net.2") for d in r.decisions))
    # a double block reads 8 inputs through 12 DiRotQ linears: Q/K/V and their context twins share theirs
    assert block.activation_quantizations == 8 and block.shared_activation_quantizations == 4


def _after_two_blocks(model, inputs, **options) -> float:
    """Error of the second block's output with the model's linears swapped for the eager quantized modules."""
    quantized = copy.deepcopy(model)
    cc.quantize_model(quantized, "w4a4", progress=False, **options)
    states = []
    for m in (model, quantized):
        seen = []
        handle = m.transformer_blocks[1].register_forward_hook(lambda mod, a, out: seen.append(out))
        m(**inputs)
        handle.remove()
        states.append(torch.cat([t.float().flatten() for t in seen[0]]))
    return relative_error(states[1], states[0])


def test_dirotq_beats_convrot_after_the_first_blocks_on_a_calibrated_model(model, cal, inputs):
    convrot = _after_two_blocks(model, inputs)
    dirotq = _after_two_blocks(model, inputs, rotation="pca", weights="gptq", calibration=cal)
    assert dirotq < 0.8 * convrot, (dirotq, convrot)


def test_calibrated_methods_refuse_what_does_not_fit(model, cal):
    with pytest.raises(ValueError, match="needs a calibration"):
        cc.compile(copy.deepcopy(model), rotation="pca")
    with pytest.raises(ValueError, match="needs a calibration"):
        cc.ConvRotConfig(weights="gptq")
    other = build_flux({**dict(model.config), "num_layers": 1}, seed=0)
    with pytest.raises(CalibrationError, match="calibrate this model"):
        cc.compile(other, rotation="pca", calibration=cal, progress=False)
    with pytest.raises(ValueError, match="W4A4 method"):
        cc.compile(copy.deepcopy(model), plan="mix", rotation="pca", calibration=cal, progress=False)
    partial = cc.calibrate(model, [make_flux_inputs(model, 64, 64, 16).kwargs],
                           layers=["transformer_blocks.0.attn.to_q"], progress=False)
    fresh = copy.deepcopy(model)
    with pytest.raises(CalibrationError, match="never saw"):
        cc.compile(fresh, rotation="pca", calibration=partial, progress=False)
    assert all(not cc.is_compiled(m) for m in (fresh,)) and fresh.transformer_blocks[0].ff.net[2].weight.numel() > 1
    with pytest.raises(TypeError, match="Calibration"):
        cc.ConvRotConfig(rotation="pca", calibration={"a": 1})
    assert cc.ConvRotConfig(rotation="pca", calibration=cal).group_size == 64
    assert cc.ConvRotConfig().replace(rotation="pca", calibration=cal).group_size == 64


def test_a_compiled_model_lets_go_of_its_calibrations_moments(model, inputs):
    import gc
    import weakref

    cal = cc.calibrate(model, [inputs], progress=False)
    kept = cc.calibrate(model, [inputs], progress=False)
    compiled = cc.compile(copy.deepcopy(model), rotation="pca", weights="gptq", calibration=cal, progress=False)
    held = cc.compile(copy.deepcopy(model), rotation="pca", calibration=kept, release_weights=False, progress=False)
    refs = [weakref.ref(t) for t in cal.moments.values()]
    name = next(iter(cal.shared))
    assert cal.second_moment(name).shape[-1] > 0  # the caller's calibration is whole
    del cal
    gc.collect()
    assert all(r() is None for r in refs), "the compiled model pins the second moments"
    assert torch.isfinite(compiled(**inputs)[0]).all()
    # without release_weights a weight can change and be prepared again: the moments stay
    refs = [weakref.ref(t) for t in kept.moments.values()]
    del kept
    gc.collect()
    assert all(r() is not None for r in refs) and torch.isfinite(held(**inputs)[0]).all()


def test_a_released_calibration_says_so():
    from convrot_compiler.calibration import Calibration

    cal = Calibration({"a": torch.eye(2)[None]}, {"a": "a"}, {"a": 1})
    copy_ = cal.shallow_copy()
    copy_.release_moments()
    assert cal.second_moment("a").shape == (1, 2, 2)
    with pytest.raises(CalibrationError, match="let its calibration's moments go"):
        copy_.second_moment("a")
