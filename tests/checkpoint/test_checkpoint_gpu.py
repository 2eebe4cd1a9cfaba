"""Checkpoints and layer-by-layer preparation on a GPU (skipped without CUDA): a checkpoint loaded into the
kernels' own layout (mma channel order and W4A16 tiles on sm_90) and compile(model_on_cpu, device="cuda")
both give what compiling the model in GPU memory gives, without holding its bf16 weights: the prepared weights
bit for bit, the outputs within what two compiles of one model differ by (an H100 measured 0.0156 at most on
outputs of magnitude ~2, bf16 rounding steps, and 0.0 between runs that happened to pick the same kernels)."""

import copy

import pytest
import torch

import convrot_compiler as cc
from convrot_compiler.compiler.weights import PREPARED, model_bytes, prepare_weight
from convrot_compiler.numerics.error import relative_error
from convrot_compiler.tools.models import build_flux, make_flux_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.usefixtures("fresh_dynamo", "no_grad")]


def test_a_checkpoint_loaded_on_the_gpu_equals_the_model_compiled_there(tmp_path):
    source = build_flux("flux-dev-short", seed=0, device="cuda")
    source.save_pretrained(tmp_path / "src")
    to_q = source.transformer_blocks[0].attn.to_q.weight.detach().clone()
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
    param = model.transformer_blocks[0].attn.to_q.weight
    spec = cc.ConvRotConfig().spec_for("w4a4", param)
    loaded_qw, fresh = PREPARED.get(param, spec), prepare_weight(to_q, spec)
    assert torch.equal(loaded_qw.values, fresh.values) and torch.equal(loaded_qw.scale, fresh.scale)
    assert relative_error(model(**kwargs)[0], expected) < 5e-3
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
    assert next(cpu.parameters()).is_cuda and relative_error(cpu(**kwargs)[0], expected) < 5e-3
    assert prepared < 0.5 * bf16  # the quantized model and one layer's working copies, never the bf16 model
