"""Checkpoints and layer-by-layer preparation on a GPU (skipped without CUDA): a checkpoint loaded into the
kernels' own layout (mma channel order and W4A16 tiles on sm_90) and compile(model_on_cpu, device="cuda")
both give what compiling the model in GPU memory gives, bit for bit, without holding its bf16 weights."""

import copy

import pytest
import torch

import convrot_compiler as cc
from convrot_compiler.compiler.weights import model_bytes
from convrot_compiler.tools.models import build_flux, make_flux_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.usefixtures("fresh_dynamo", "no_grad")]


def test_a_checkpoint_loaded_on_the_gpu_equals_the_model_compiled_there(tmp_path):
    source = build_flux("flux-dev-short", seed=0, device="cuda")
    source.save_pretrained(tmp_path / "src")
    kwargs = make_flux_inputs(source, 256, 256, 64, device="cuda").kwargs
    cc.compile(source, progress=False)
    expected = source(**kwargs)[0]
    del source
    torch._dynamo.reset()
    cc.quantize(str(tmp_path / "src"), str(tmp_path / "ckpt"), device="cuda", progress=False)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = cc.load(str(tmp_path / "ckpt"), device="cuda")
    loaded = torch.cuda.max_memory_allocated() - before
    decisions = {d.name: d for d in cc.compile(model, progress=False).convrot_decisions}
    if torch.cuda.get_device_capability() == (9, 0):
        assert decisions["transformer_blocks.0.attn.to_q"].extra["act_order"] == "mma"
        assert decisions["transformer_blocks.0.norm1.linear"].extra["layout"] == "tiles"
    assert torch.equal(model(**kwargs)[0], expected)
    bf16 = sum(t.numel() * t.element_size() for t in build_flux("flux-dev-short", device="meta").state_dict().values())
    assert loaded < 0.35 * bf16  # the quantized weights, never the bf16 ones


def test_compiling_a_cpu_model_onto_the_gpu_prepares_it_layer_by_layer():
    cpu = build_flux("flux-dev-short", seed=0, device="cpu")
    gpu = copy.deepcopy(cpu).cuda()
    kwargs = make_flux_inputs(gpu, 256, 256, 64, device="cuda").kwargs
    cc.compile(gpu, progress=False)
    expected = gpu(**kwargs)[0]
    del gpu
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    bf16 = model_bytes(cpu)
    cc.compile(cpu, device="cuda", progress=False)
    prepared = torch.cuda.max_memory_allocated() - before
    assert next(cpu.parameters()).is_cuda and torch.equal(cpu(**kwargs)[0], expected)
    assert prepared < 0.5 * bf16  # the quantized model and one layer's working copies, never the bf16 model
