"""Calibration (calibration.py): second moments of the quantized linears' inputs, shared per input, saved and
checked against the model."""

import pytest
import torch

import convrot_compiler as cc
from convrot_compiler.calibration import Calibration, CalibrationError, Calibrator, calibrate
from convrot_compiler.tools.models import build_flux, make_flux_inputs
from convrot_compiler.tools.pipelines import random_pipeline, random_prompt_embeds

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module")
def model():
    return build_flux("flux-tiny", seed=0, std=0.05)


@pytest.fixture(scope="module")
def batches(model):
    return [make_flux_inputs(model, 64, 64, 16, seed=i).kwargs for i in range(3)]


@pytest.fixture(scope="module")
def cal(model, batches):
    with torch.no_grad():
        return calibrate(model, batches, progress=False)


def test_each_input_is_summed_once_and_equals_x_transpose_x(model, batches, cal):
    assert cal.shared["transformer_blocks.0.attn.to_k"] == "transformer_blocks.0.attn.to_q"
    assert cal.shared["single_transformer_blocks.1.attn.to_q"] == "single_transformer_blocks.1.proj_mlp"
    assert "transformer_blocks.0.attn.to_k" not in cal.moments and len(cal.moments) == 20
    assert not any(n.startswith("time_text_embed") or n.endswith("norm1.linear") for n in cal.layers)  # weight-only
    seen = []
    handle = model.transformer_blocks[1].ff.net[2].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    for b in batches:
        model(**b)
    handle.remove()
    rows = torch.cat([x.reshape(-1, x.shape[-1]).float() for x in seen])
    name = "transformer_blocks.1.ff.net.2"
    assert cal.tokens[name] == rows.shape[0]
    assert torch.allclose(cal.second_moment(name), rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(cal.second_moment("transformer_blocks.0.attn.to_v"),
                       cal.second_moment("transformer_blocks.0.attn.to_q"))


def test_a_calibration_round_trips_and_refuses_other_models_and_layers(model, cal, tmp_path):
    path = tmp_path / "cal.safetensors"
    cal.save(str(path))
    back = Calibration.load(str(path))
    assert back.shared == cal.shared and back.tokens == cal.tokens
    assert all(torch.equal(back.moments[k], cal.moments[k]) for k in cal.moments)
    back.check_model(model)
    other = build_flux({**dict(model.config), "num_layers": 1}, seed=0)
    with pytest.raises(CalibrationError, match="calibrate this model"):
        back.check_model(other)
    with pytest.raises(CalibrationError, match="never saw"):
        back.second_moment("transformer_blocks.0.norm1.linear")
    with pytest.raises(CalibrationError, match="another model"):
        back.second_moment("transformer_blocks.0.attn.to_q", 512)
    (tmp_path / "x.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(Exception, match="not a convrot calibration|header|deserializ"):
        Calibration.load(str(tmp_path / "x.safetensors"))


def test_bad_batches_and_plans_are_refused(model):
    with pytest.raises(TypeError, match="tuple of arguments or a dict"):
        calibrate(model, [torch.zeros(1)], progress=False)
    with pytest.raises(CalibrationError, match="nothing to calibrate"):
        Calibrator(model, plan="none")
    with pytest.raises(CalibrationError, match="not a linear"):
        Calibrator(model, layers=["transformer_blocks.0.attn"])


def test_a_calibrator_around_a_pipeline_sees_every_denoising_step():
    pipe = random_pipeline("flux-tiny", "cpu", 0)
    pipe.set_progress_bar_config(disable=True)
    embeds = random_prompt_embeds(pipe.transformer, 1, 8, "cpu")[0]
    with Calibrator(pipe.transformer) as cal:
        pipe(**embeds, height=32, width=32, num_inference_steps=3, guidance_scale=3.5)
    per_step = cal.tokens["transformer_blocks.0.attn.to_q"]
    assert per_step % 3 == 0 and per_step > 0
    assert cal.tokens["transformer_blocks.0.attn.add_q_proj"] == 3 * 8  # text tokens per step
    assert not pipe.transformer._forward_pre_hooks  # hooks gone after the block
    assert cc.Calibration is Calibration


def test_wide_inputs_keep_the_diagonal_blocks_of_the_full_second_moment(model, batches, cal):
    blocked = calibrate(model, batches, progress=False, block=256)
    name = "transformer_blocks.1.ff.net.2"  # 1024 inputs: four blocks of 256
    full, parts = cal.second_moment(name)[0], blocked.second_moment(name, 1024)
    assert parts.shape == (4, 256, 256)
    for j in range(4):
        assert torch.allclose(parts[j], full[256 * j:256 * (j + 1), 256 * j:256 * (j + 1)], rtol=1e-5, atol=1e-6)
    assert blocked.second_moment("transformer_blocks.1.attn.to_q").shape == (1, 256, 256)


def test_second_moments_that_cannot_fit_on_the_gpu_are_refused_before_any_forward(model, monkeypatch):
    from convrot_compiler.calibration import check_fits

    calibrator = Calibrator(model)
    measured = calibrate(model, [make_flux_inputs(model, 64, 64, 16).kwargs], progress=False)
    assert calibrator.estimated_bytes() >= measured.nbytes() > 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 1 << 30))
    check_fits(1 << 19, 3, torch.device("cuda", 0))
    with pytest.raises(CalibrationError, match="need up to .* GiB is free: calibrate fewer linears"):
        check_fits(1 << 21, 3, torch.device("cuda", 0))
    check_fits(1 << 40, 3, torch.device("cpu"))  # host memory is the operating system's to refuse
