"""CUDA-graph replay of a compiled transformer under what pipelines do (GPU only)."""

import warnings

import pytest
import torch

import convrot_compiler as cc
from convrot_compiler.compiler.cudagraphs import CUDAGraphReplay
from convrot_compiler.tools.models import FLUX_CONFIGS, build_flux, make_flux_inputs
from convrot_compiler.tools.pipelines import random_pipeline, random_prompt_embeds

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.usefixtures("fresh_dynamo", "no_grad")]


def _inputs(model, size, batch=1, seed=0):
    return make_flux_inputs(model, size, size, 32, batch=batch, seed=seed, device="cuda").kwargs


def test_replay_equals_launch_across_timesteps_cfg_batches_and_resolutions():
    """New timestep and guidance tensors every call, batch 2 (classifier-free guidance), two resolutions
    alternating, a LoRA scale, return_dict=True: every replay equals the same compiled forward launched
    kernel by kernel, and an output stays valid after the next call."""
    model = build_flux("flux-tiny", device="cuda")
    cc.compile(model, progress=False)
    fwd = model.forward
    calls = []
    for step in range(3):
        for size, batch in ((128, 1), (256, 1), (128, 2)):
            kw = _inputs(model, size, batch, seed=step)
            kw["timestep"] = torch.full((batch,), 1.0 - 0.3 * step, device="cuda", dtype=torch.bfloat16)
            kw["guidance"] = torch.full((batch,), 3.5 + step, device="cuda", dtype=torch.bfloat16)
            calls.append(kw)
    calls.append({**calls[0], "joint_attention_kwargs": {"scale": 1.0}})
    kept = []
    for kw in calls:
        with torch._dynamo.config.patch(recompile_limit=16):  # 3 shapes, 2 single-block graphs each, + the LoRA kwargs
            out = model(**kw)[0]
        torch.testing.assert_close(out, fwd.inner(**kw)[0], rtol=0, atol=0)
        kept.append((out, out.clone()))
    for out, copy in kept:  # later calls did not overwrite earlier outputs
        assert torch.equal(out, copy)
    as_dict = model(**{**calls[0], "return_dict": True})
    assert torch.equal(as_dict.sample, fwd.inner(**calls[0])[0])
    assert len(fwd.replay.graphs) >= 3 and not fwd.replay.unreplayable


def test_graphs_are_bounded_least_recently_used_first_and_report_their_memory():
    model = build_flux("flux-tiny", device="cuda")
    cc.compile(model, progress=False, max_graphs=2)
    replay = model.forward.replay
    a, b, c = (_inputs(model, s) for s in (128, 192, 256))
    for kw in (a, b, a, c):  # c evicts b, the least recently used
        model(**kw)
    assert len(replay.graphs) == 2 and replay.evicted == 1
    memory = replay.memory()
    assert [m["shapes"][0] for m in memory] == [tuple(a["hidden_states"].shape), tuple(c["hidden_states"].shape)]
    assert all(m["static_bytes"] > 0 and m["pool_bytes"] >= 0 for m in memory)
    torch.testing.assert_close(model(**b)[0], model.forward.inner(**b)[0], rtol=0, atol=0)  # b captured again


def test_a_forward_that_cannot_be_captured_runs_without_replay_and_says_so():
    def syncs(x):
        return x * float(x.sum().item() > 0)

    replay = CUDAGraphReplay(syncs)
    x = torch.ones(8, device="cuda")
    with pytest.warns(UserWarning, match="could not be captured"):
        assert torch.equal(replay(x), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(replay(-x), -x * 0)
    assert not replay.graphs and len(replay.unreplayable) == 1


def test_pipeline_latents_with_replay_equal_the_unreplayed_run():
    """diffusers' FluxPipeline with the compiled transformer, guidance-distilled and not (schnell's config)."""
    for cfg in ("flux-tiny", {**FLUX_CONFIGS["flux-tiny"], "guidance_embeds": False}):
        torch._dynamo.reset()
        pipe = random_pipeline("flux-tiny", "cuda", transformer=build_flux(cfg, device="cuda"))
        pipe.set_progress_bar_config(disable=True)
        cc.compile(pipe, progress=False)
        embeds = random_prompt_embeds(pipe.transformer, 1, 32, "cuda")[0]

        def run():
            return pipe(**embeds, height=128, width=128, num_inference_steps=4, guidance_scale=3.5,
                        generator=torch.Generator().manual_seed(0), output_type="latent").images

        replayed = run()
        assert pipe.transformer.forward.replay.graphs
        pipe.transformer.forward.replay = None
        torch.testing.assert_close(replayed, run(), rtol=0, atol=0)
