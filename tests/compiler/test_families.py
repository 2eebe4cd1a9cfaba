"""Other diffusers DiT families through the compiler, tiny configs with random weights (CPU): each compiles
with fullgraph, whole and regional, and stays near its bf16 output; their adaLN modulation and embedders get
their role from the shape probe (compiler/roles.py), never FLUX's module names."""

import copy

import pytest
import torch

import convrot_compiler as cc
from convrot_compiler.compiler.roles import PER_SAMPLE, decide_model
from convrot_compiler.numerics.error import relative_error
from convrot_compiler.plans import decide_linears, make_plan

pytestmark = pytest.mark.usefixtures("fresh_dynamo", "no_grad")


def qwen_image():
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                        attention_head_dim=128, num_attention_heads=2, joint_attention_dim=256,
                                        axes_dims_rope=(16, 56, 56))
    inputs = dict(hidden_states=torch.randn(1, 64, 16), encoder_hidden_states=torch.randn(1, 16, 256),
                  encoder_hidden_states_mask=torch.ones(1, 16, dtype=torch.long), timestep=torch.tensor([0.5]),
                  img_shapes=[(1, 8, 8)])
    return model, inputs, ("img_mod.1", "txt_mod.1")


def flux2():
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                    attention_head_dim=128, num_attention_heads=2, joint_attention_dim=256,
                                    timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32))
    ids = torch.zeros(64, 4)
    ids[:, 1], ids[:, 2] = torch.arange(64) // 8, torch.arange(64) % 8
    inputs = dict(hidden_states=torch.randn(1, 64, 16), encoder_hidden_states=torch.randn(1, 16, 256),
                  timestep=torch.tensor([0.5]), img_ids=ids, txt_ids=torch.zeros(16, 4), guidance=torch.tensor([3.5]))
    return model, inputs, ("modulation",)


def sd3():
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=128,
                                  num_attention_heads=2, joint_attention_dim=256, caption_projection_dim=256,
                                  pooled_projection_dim=256, out_channels=16, pos_embed_max_size=32)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, 16), encoder_hidden_states=torch.randn(1, 16, 256),
                  pooled_projections=torch.randn(1, 256), timestep=torch.tensor([500.0]))
    return model, inputs, ("norm1.linear", "norm1_context.linear", "time_text_embed")


def wan():
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=4,
                                  out_channels=4, text_dim=256, freq_dim=256, ffn_dim=512, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 16, 16), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 16, 256))
    return model, inputs, ("time_embedder", "time_proj")


FAMILIES = {"qwen-image": qwen_image, "flux2": flux2, "sd3": sd3, "wan": wan}


def _built(family):
    torch.manual_seed(0)
    model, inputs, modulation = FAMILIES[family]()
    model = model.to(torch.bfloat16).eval()
    bf16 = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 1 and
            not k.endswith("_ids") else v for k, v in inputs.items()}
    return model, {**bf16, "return_dict": False}, modulation


@pytest.mark.parametrize("regional", [None, False], ids=["regional", "whole"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_compiles_with_fullgraph_and_stays_near_bf16(family, regional):
    model, inputs, _ = _built(family)
    ref = model(**inputs)[0]
    compiled = cc.compile(copy.deepcopy(model), regional=regional, progress=False)
    assert relative_error(compiled(**inputs)[0], ref) < 0.1
    decisions = compiled.convrot_decisions
    assert sum(d.precision != "bf16" for d in decisions) >= 0.75 * len(decisions)
    assert all(r.rewritten > 0 for r in compiled.convrot_reports)


@pytest.mark.parametrize("plan,weight_only", [("w4a4", "w4a16"), ("w8a8", "w8a16"), ("mix", "w8a16")])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_familys_modulation_is_never_activation_quantized(family, plan, weight_only):
    """Under every preset the modulation and embedders, found by the shape probe whatever their names, get the
    preset's weight-only precision; by FLUX's names alone (decide_linears) Qwen-Image's, FLUX.2's and Wan's ran
    W4A4."""
    model, _, modulation = _built(family)
    decisions, _ = decide_model(model, make_plan(plan), 256)
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
    found = [d for d in compiled.convrot_decisions if any(m in d.name for m in modulation)]
    assert found and all(d.precision == "w4a16" for d in found)
    compiled(**inputs)  # the graphs take the decisions: weight-only GEMMs for them, no W4A4 weight missing
    torch._dynamo.reset()
    mine = cc.compile(copy.deepcopy(model), plan=[("*", "w4a4")], progress=False)
    assert all(d.precision == "w4a4" for d in mine.convrot_decisions if any(m in d.name for m in modulation))


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
