"""convrot_compiler.compile returns the module itself, and diffusers' FluxPipeline runs it (CPU)."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import convrot_compiler as cc
from convrot_compiler.tools.models import relative_error
from convrot_compiler.tools.pipelines import (
    VAE_CONFIGS,
    VAE_TILE,
    decode_latents,
    enable_vae_tiling,
    random_pipeline,
    random_prompt_embeds,
)

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # conftest: Dynamo reset around each test


def _latents(pipe, steps=3, size=64, **kwargs):
    embeds = random_prompt_embeds(pipe.transformer, 1, 16, "cpu")[0]
    return pipe(**embeds, height=size, width=size, num_inference_steps=steps, guidance_scale=3.5,
                generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images


def test_compile_returns_the_transformer_itself_and_the_pipeline_runs_it():
    pipe = random_pipeline("flux-tiny")
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    config, cls = dict(transformer.config), type(transformer)
    ref = _latents(pipe)
    out = cc.compile(transformer, progress=False)
    assert out is transformer and type(out) is cls and dict(out.config) == config
    assert out.dtype == torch.bfloat16 and out.device.type == "cpu" and hasattr(out, "cache_context")
    pipe.transformer = out
    latents = _latents(pipe)
    err = relative_error(latents, ref)
    assert 0 < err < 0.1, err  # quantized: close to bf16, not equal
    assert sum(d.precision == "w4a4" for d in out.convrot_decisions) > 0
    assert out.convrot_reports and sum(r.rewritten for r in out.convrot_reports) > 0
    assert cc.is_compiled(out)


def test_compile_of_a_pipeline_compiles_its_transformer_in_place():
    pipe = random_pipeline("flux-tiny")
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    assert cc.compile(pipe, progress=False) is pipe
    assert pipe.transformer is transformer and cc.is_compiled(transformer)
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs) if not seen else None

    handle = transformer.register_forward_pre_hook(grab, with_kwargs=True)
    _latents(pipe, steps=2)
    handle.remove()
    with torch.no_grad():
        as_dict = transformer(**{**seen, "return_dict": True})
        as_tuple = transformer(**{**seen, "return_dict": False})
    assert type(as_dict).__name__ == "Transformer2DModelOutput" and torch.equal(as_dict.sample, as_tuple[0])


def test_compiled_guidance_free_model_and_a_lora_scale():
    """FLUX.1-schnell's config has no guidance embedding (guidance=None each call); a LoRA scale arrives in
    joint_attention_kwargs. Both run compiled, equal to the eager modules."""
    from convrot_compiler.nn.linear import quantize_model
    from convrot_compiler.tools.models import FLUX_CONFIGS, build_flux, make_flux_inputs

    cfg = {**FLUX_CONFIGS["flux-tiny"], "guidance_embeds": False}
    model = build_flux(cfg)
    kwargs = make_flux_inputs(model, 64, 64, 16).kwargs
    assert kwargs["guidance"] is None
    cc.compile(model, progress=False, gelu_epilogue=False)
    ref = build_flux(cfg)
    quantize_model(ref, [(d.name, d.precision) for d in model.convrot_decisions], progress=False)
    with torch.no_grad():
        for extra in ({}, {"joint_attention_kwargs": {"scale": 1.0}}):
            torch.testing.assert_close(model(**kwargs, **extra)[0], ref(**kwargs)[0], rtol=0, atol=0)


def test_each_float_weight_is_released_as_soon_as_it_is_prepared(monkeypatch):
    """The peak while compiling is the float model plus one layer's prepared weight, not plus all of them."""
    from convrot_compiler.compiler import weights
    from convrot_compiler.tools.models import build_flux

    model = build_flux("flux-tiny")
    seen = []
    get = weights.PREPARED.get

    def recording(param, spec):
        seen.append(sum(weights.is_released(p) for p in model.parameters()))
        return get(param, spec)

    monkeypatch.setattr(weights.PREPARED, "get", recording)
    cc.compile(model, progress=False)
    assert seen[:3] == [0, 1, 2] and len(seen) > 3


def test_bad_input_gets_a_clear_error():
    from diffusers import FluxPipeline

    pipe = random_pipeline("flux-tiny")
    empty = FluxPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=None, tokenizer=None,
                         text_encoder_2=None, tokenizer_2=None, transformer=None)
    with pytest.raises(ValueError, match="FluxPipeline has no transformer to compile"):
        cc.compile(empty)
    with pytest.raises(ValueError, match="has no nn.Linear"):
        cc.compile(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="takes an nn.Module or a diffusers pipeline, got function"):
        cc.compile(lambda x: x)
    with pytest.raises(ValueError, match="unknown plan 'w3a3'"):
        cc.compile(pipe.transformer, plan="w3a3")
    with pytest.raises(ValueError, match="option 'attention'"):
        cc.compile(pipe.transformer, attention="int8")
    with pytest.raises(TypeError, match="unknown convrot option.*'plann'.*valid options"):
        cc.compile(pipe.transformer, plann="w4a4")
    with pytest.raises(TypeError, match="config must be a ConvRotConfig, got dict"):
        cc.compile(pipe.transformer, {"plan": "w4a4"})
    model = cc.compile(pipe.transformer, progress=False)
    kwargs = {"hidden_states": torch.randn(1, 16, 64, dtype=torch.bfloat16)}
    with pytest.raises(RuntimeError, match="inference-only: call it under torch.no_grad"):
        model(**kwargs)
    with pytest.raises(RuntimeError, match="already compiled"):
        cc.compile(model)
    with pytest.raises(TypeError, match="cannot be copied"):
        copy.deepcopy(model)


def test_convrot_generate_writes_a_png_and_says_it_is_noise(tmp_path):
    out = tmp_path / "fox.png"
    proc = subprocess.run([sys.executable, "-m", "convrot_compiler", "generate", "--device", "cpu", "--no-progress",
                           "--steps", "3", "--height", "48", "--out", str(out), "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    assert Image.open(out).size == (48, 48)
    assert "its image is noise" in proc.stdout and "per step after the first" in proc.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["step_ms"] > 0 and result["steps"] == 3 and result["noise"]
    assert result["vae_tiled"] is False  # memory to spare: decoded whole
    bad = subprocess.run([sys.executable, "-m", "convrot_compiler", "generate", "--device", "cpu", "--height", "50"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "multiples of 16" in bad.stderr


def test_the_vae_decodes_in_tiles_only_where_the_whole_image_runs_out_of_memory(monkeypatch):
    pipe = random_pipeline("flux-tiny")
    latents = torch.randn(1, 256, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # 64x64 px
    whole = decode_latents(pipe, latents, 64, 64, tiling="auto")
    assert not pipe.vae.use_tiling
    tiled = decode_latents(random_pipeline("flux-tiny"), latents, 64, 64, tiling="on")
    assert tiled.shape == whole.shape and not torch.equal(tiled, whole)  # tiles blend at their seams
    decode = pipe.vae.decode

    def short_of_memory(z, *args, **kwargs):
        if not pipe.vae.use_tiling:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return decode(z, *args, **kwargs)

    monkeypatch.setattr(pipe.vae, "decode", short_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        decode_latents(pipe, latents, 64, 64, tiling="off")
    with pytest.warns(UserWarning, match="decoding again in tiles"):
        again = decode_latents(pipe, latents, 64, 64, tiling="auto")
    assert pipe.vae.use_tiling and torch.equal(again, tiled)
    with pytest.raises(ValueError, match="choose one of"):
        decode_latents(pipe, latents, 64, 64, tiling="yes")


def test_vae_tiling_splits_a_1024_image_of_fluxs_vae():
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**VAE_CONFIGS["flux"])
    assert vae.tile_latent_min_size == 1024 // 8  # diffusers' tiles: a 1024² image is one tile
    enable_vae_tiling(vae)
    assert vae.use_tiling and vae.tile_sample_min_size == VAE_TILE and vae.tile_latent_min_size == VAE_TILE // 8


def test_pipeline_benchmark_times_steps_and_checks_latents(tmp_path):
    from convrot_compiler.tools import bench_pipeline

    result = bench_pipeline.main(["--config", "flux-tiny", "--resolution", "32", "--text-tokens", "16",
                                      "--steps", "3", "--iters", "1", "--device", "cpu", "--variants", "bf16,w4a4",
                                      "--out", str(tmp_path), "--name", "smoke"])
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["bf16"]["latent_err_vs_bf16"] == 0 and 0 < rows["w4a4"]["latent_err_vs_bf16"] < 0.1
    assert rows["w4a4"]["ms_per_step"] > 0 and rows["w4a4"]["ms_per_forward"] > 0
    assert rows["w4a4"]["weight_bytes"] < 0.5 * rows["bf16"]["weight_bytes"]
    assert "ms/step" in (tmp_path / "smoke.md").read_text()
    with pytest.raises(SystemExit):
        bench_pipeline.main(["--variants", "int3", "--device", "cpu", "--config", "flux-tiny"])


def test_pipeline_benchmark_calibrates_dirotq_on_a_call_of_the_pipeline(tmp_path):
    from convrot_compiler.tools import bench_pipeline

    result = bench_pipeline.main(["--config", "flux-tiny", "--resolution", "32", "--text-tokens", "16",
                                  "--steps", "2", "--iters", "1", "--device", "cpu", "--variants", "bf16,w4a4-dirotq",
                                  "--out", str(tmp_path), "--name", "dirotq"])
    rows = {r["variant"]: r for r in result["rows"]}
    dirotq = rows["w4a4-dirotq"]
    assert dirotq["ms_per_step"] > 0, dirotq.get("note")
    assert "calibrated on one call of the measured pipeline" in dirotq["note"]
    assert 0 < dirotq["latent_err_vs_bf16"] < 0.1
    with pytest.raises(ValueError, match="calibrates on a pipeline call"):
        next(bench_pipeline.setups("w4a4-dirotq", bench_pipeline.build_flux("flux-tiny", seed=0)))
