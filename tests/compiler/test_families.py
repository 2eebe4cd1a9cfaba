"""Other diffusers DiT families through the compiler, tiny configs with random weights (CPU): each compiles
with fullgraph, whole and regional, and stays near its bf16 output; their adaLN modulation and embedders get
their role from the shape probe (compiler/roles.py), never FLUX's module names."""

import copy

import pytest
import torch

import convrot_compiler as cc
from convrot_compiler.compiler.roles import PER_SAMPLE, decide_model
from convrot_compiler.families import example_inputs, sample_output
from convrot_compiler.numerics.error import relative_error
from convrot_compiler.plans import decide_linears, make_plan
from convrot_compiler.tools.models import build_family

pytestmark = pytest.mark.usefixtures("fresh_dynamo", "no_grad")


# family -> (built-in tiny config, names of its modulation and embedders)
FAMILIES = {
    "qwen-image": ("qwen-image-tiny", ("img_mod.1", "txt_mod.1")),
    "flux2": ("flux2-tiny", ("modulation",)),
    "sd3": ("sd3-tiny", ("norm1.linear", "norm1_context.linear", "time_text_embed")),
    "wan": ("wan-tiny", ("time_embedder", "time_proj")),
    "z-image": ("z-image-tiny", ("adaLN_modulation", "t_embedder")),
    "hunyuanvideo-1.5": ("hunyuanvideo-1.5-tiny", ("norm1.linear", "norm1_context.linear", "time_embed",
                                                   "time_text_embed", "refiner_blocks.0.norm_out")),
}

# W4A4 output error against bf16 on these random tiny models (measured: Z-Image's 0.18, the others' below 0.1)
NEAR_BF16 = {"z-image": 0.25}


def _built(family):
    config, modulation = FAMILIES[family]
    model = build_family(config, seed=0, device="cpu")
    return model, example_inputs(model, "cpu", height=128, width=128), modulation


@pytest.mark.parametrize("regional", [None, False], ids=["regional", "whole"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_compiles_with_fullgraph_and_stays_near_bf16(family, regional):
    model, inputs, _ = _built(family)
    if family == "hunyuanvideo-1.5" and regional is False:  # its forward branches on its inputs' values
        compiled = cc.compile(model, regional=False, progress=False)
        with pytest.raises(RuntimeError, match="cannot take HunyuanVideo15Transformer3DModel's whole forward as one "
                                               "graph .*compile it regionally"):
            compiled(**inputs)
        return
    ref = sample_output(model(**inputs))
    compiled = cc.compile(copy.deepcopy(model), regional=regional, progress=False)
    assert relative_error(sample_output(compiled(**inputs)), ref) < NEAR_BF16.get(family, 0.1)
    decisions = compiled.convrot_decisions
    assert sum(d.precision != "bf16" for d in decisions) >= 0.75 * len(decisions)
    assert all(r.rewritten > 0 for r in compiled.convrot_reports if r.decisions)  # HunyuanVideo's patch embed: none


@pytest.mark.parametrize("plan,weight_only", [("w4a4", "w4a16"), ("w8a8", "w8a16"), ("mix", "w8a16")])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_familys_modulation_is_never_activation_quantized(family, plan, weight_only):
    """Under every preset the modulation and embedders, found by the shape probe whatever their names, get the
    preset's weight-only precision; by FLUX's names alone (decide_linears) Qwen-Image's, FLUX.2's and Wan's ran
    W4A4."""
    model, _, modulation = _built(family)
    decisions, _, note = decide_model(model, make_plan(plan), 256)
    found = [d for d in decisions if any(m in d.name for m in modulation)]
    assert found and all(d.precision == weight_only and d.extra["role"] == PER_SAMPLE for d in found), \
        [(d.name, d.precision) for d in found]
    by_names = decide_linears(model, plan)
    if family != "sd3":  # SD3's names happen to be FLUX's
        assert any(d.precision in ("w4a4", "w8a8") for d in by_names if any(m in d.name for m in modulation))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compile_gives_a_familys_modulation_its_role_and_a_users_rules_win(family):
    model, inputs, modulation = _built(family)
    compiled = cc.compile(copy.deepcopy(model), progress=False)
    assert compiled.convrot_roles.startswith("roles from a shape probe")
    found = [d for d in compiled.convrot_decisions if any(m in d.name for m in modulation)]
    assert any(d.precision == "w4a16" for d in found) and not any(d.precision in ("w4a4", "w8a8") for d in found)
    compiled(**inputs)  # the graphs take the decisions: weight-only GEMMs for them, no W4A4 weight missing
    torch._dynamo.reset()
    mine = cc.compile(copy.deepcopy(model), plan=[("*", "w4a4")], progress=False)
    assert all(d.precision == "w4a4" for d in mine.convrot_decisions if any(m in d.name for m in modulation) and
               not d.reason.startswith("regional compilation runs it eagerly"))


@pytest.mark.parametrize("family,warned", [("wan", "time_embedder.linear_1"), ("qwen-image", "img_mod.1"),
                                           ("sd3", "timestep_embedder.linear_1")])
def test_linears_that_see_one_row_per_sample_and_quantize_activations_are_warned_of(family, warned):
    """A user's plan that quantizes their activations is kept, and warned of; a preset gives them their role."""
    import warnings

    model, inputs, _ = _built(family)
    for plan in ([("*", "w4a4")], "w4a4"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = cc.inspect(model, example_kwargs=inputs, regional=False, plan=plan)
        messages = [str(w.message) for w in caught if "one row per sample quantize" in str(w.message)]
        if plan == "w4a4":
            assert not messages
            assert all(d.precision in ("w4a16", "bf16") for d in report.decisions if d.extra.get("role") == PER_SAMPLE)
        else:
            assert len(messages) == 1 and warned in messages[0] and "weight-only rule" in messages[0]
        roles = [d for d in report.decisions if d.extra.get("role") == PER_SAMPLE]
        assert roles and all(d.rows == min(x.rows for x in report.decisions if x.rows) for d in roles)
        assert "sees one row per sample" in report.table()


@pytest.mark.parametrize("name,billions", [("flux2-dev", 32.2), ("qwen-image", 20.4), ("sd3.5-large", 8.1),
                                           ("wan2.1-14b", 14.3), ("wan2.2-a14b", 14.3), ("wan2.2-ti2v-5b", 5.0),
                                           ("z-image", 6.2), ("hunyuanvideo-1.5", 8.3)])
def test_the_published_configs_build_their_models_on_the_meta_device(name, billions):
    """FLUX.2-dev 32B, Qwen-Image 20B, SD3.5 Large 8B, Wan 2.1 14B and 2.2 A14B (each expert), Wan 2.2 TI2V 5B,
    Z-Image 6B, HunyuanVideo 1.5 8.3B: a wrong width or depth shows in the count."""
    model = build_family(name)
    assert all(p.is_meta for p in model.parameters())
    assert abs(sum(p.numel() for p in model.parameters()) / 1e9 - billions) < 0.05


def test_convrot_inspect_takes_a_familys_config(capsys):
    from convrot_compiler.tools import cli

    assert cli.main(["inspect", "--config", "qwen-image-tiny", "--height", "128", "--width", "128",
                     "--text-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "roles from a shape probe of QwenImageTransformer2DModel" in out
    row = next(line for line in out.splitlines() if "transformer_blocks.0.img_mod.1" in line)
    assert "w4a16" in row and "sees one row per sample" in row


def test_video_token_counts_follow_each_models_latents():
    """Wan 2.1 and 2.2 A14B: 8x VAE and 2x2 patches, one token per 16 px; Wan 2.2 TI2V 5B: its 16x VAE, one per
    32 px; HunyuanVideo 1.5: 16x VAE, 1x1 patches, 16 px. Frames: 4x temporal compression, the first alone."""
    from convrot_compiler.families import image_tokens

    wan21, wan22, hunyuan = (build_family(n) for n in ("wan2.1-14b", "wan2.2-ti2v-5b", "hunyuanvideo-1.5"))
    assert image_tokens(wan21, 480, 832, 81) == 30 * 52 * 21
    assert image_tokens(wan22, 704, 1280, 121) == 22 * 40 * 31
    assert image_tokens(hunyuan, 480, 848, 121) == 30 * 53 * 31
    assert example_inputs(wan22, height=704, width=1280, frames=5)["hidden_states"].shape == (1, 48, 2, 44, 80)
    with pytest.raises(ValueError, match="multiples of 32"):
        example_inputs(wan22, height=720, width=1280)


def test_a_family_the_meta_device_cannot_run_gets_its_roles_from_a_miniature():
    """HunyuanVideo 1.5 branches on its inputs' values (text to video or image to video) and selects text tokens
    by mask: the full 54-block config on the meta device is probed through a two-block miniature of its own
    config on the CPU, every block's modulation found."""
    from convrot_compiler.compiler.roles import probe_roles

    model = build_family("hunyuanvideo-1.5")
    state = torch.random.get_rng_state()
    probe = probe_roles(model)
    assert torch.equal(torch.random.get_rng_state(), state)  # the miniature's random init leaves the caller's
    assert "miniature HunyuanVideo15Transformer3DModel" in probe.note
    per_sample = {n for n, r in probe.roles.items() if r == PER_SAMPLE}
    assert {f"transformer_blocks.{i}.norm1.linear" for i in range(54)} <= per_sample
    assert {f"transformer_blocks.{i}.norm1_context.linear" for i in range(54)} <= per_sample
    assert not any(".attn." in n or ".ff." in n for n in per_sample)
    assert probe.roles["proj_out"] != PER_SAMPLE and all(p.is_meta for p in model.parameters())


def test_convrot_demo_takes_a_familys_config(capsys):
    from convrot_compiler.tools import cli

    assert cli.main(["demo", "--config", "wan-tiny", "--device", "cpu", "--frames", "5", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "wan-tiny (random weights, seed 0)" in out and "128 image + 16 text" in out  # 8 x 8 tokens x 2 frames
    row = next(line for line in out.splitlines() if line.startswith("| convrot w4a4"))
    error = float(row.split("|")[5])
    assert 0 < error < 0.1
    assert cli.main(["demo", "--config", "wan-tiny", "--model", "/nowhere", "--device", "cpu"]) != 0
    assert "--model loads a FLUX.1 checkpoint" in capsys.readouterr().err


def test_inspect_names_the_linears_of_a_graph_that_starts_inside_a_submodule():
    """HunyuanVideo 1.5's whole forward breaks into graphs, some starting inside a block's submodule: their
    linears carry the model's names (the plan's rules by name reach them), and none seeing one row per sample
    quantizes its activations."""
    from convrot_compiler.plans import iter_linears

    model, inputs, _ = _built("hunyuanvideo-1.5")
    report = cc.inspect(model, example_kwargs=inputs)
    names = {name for name, _ in iter_linears(model)}
    assert report.decisions and all(d.name in names for d in report.decisions)
    one_row = [d for d in report.decisions if d.rows == 1]
    assert one_row and all(d.precision in ("w4a16", "bf16") for d in one_row)


def test_compiling_a_pipeline_with_two_experts_compiles_both():
    """Wan 2.2 A14B denoises its high-noise steps with ``transformer`` and the rest with ``transformer_2``:
    compiling the pipeline quantizes both, where it left the second in bf16 for half the steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from convrot_compiler.compiler.compile_model import is_compiled

    high, low = (build_family("wan-tiny", seed=s, device="cpu") for s in (0, 1))
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=high, transformer_2=low, boundary_ratio=0.875)
    cal = cc.calibrate(high, [example_inputs(high, "cpu", frames=5)], progress=False)
    with pytest.raises(ValueError, match="compile each with its own calibration"):
        cc.compile(pipe, rotation="pca", calibration=cal, progress=False)
    assert not is_compiled(high) and not is_compiled(low)
    assert cc.compile(pipe, progress=False) is pipe
    assert is_compiled(pipe.transformer) and is_compiled(pipe.transformer_2)
    inputs = example_inputs(low, "cpu", frames=5)
    assert any(d.precision == "w4a4" for d in pipe.transformer_2.convrot_decisions)
    assert torch.isfinite(sample_output(pipe.transformer_2(**inputs))).all()
