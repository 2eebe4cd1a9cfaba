import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from convrot_compiler.nn.linear import ConvLinear4bit, Int4WeightOnlyLinear, quantize_model
from convrot_compiler.numerics.quant import quantize_weight, reference_linear
from convrot_compiler.numerics.rotations import make_rotation
from convrot_compiler.plans import decide_linears, make_plan
from convrot_compiler.tools.models import build_flux, make_flux_inputs, relative_error


@pytest.mark.parametrize("bits,scheme", [(4, "w4a4"), (8, "w8a8")])
@pytest.mark.parametrize("rotation", ["regular", "sylvester", "none"])
def test_conv_linear_equals_reference_linear(bits, scheme, rotation):
    torch.manual_seed(0)
    lin = nn.Linear(300, 40).to(torch.bfloat16)
    x = torch.randn(2, 5, 300, dtype=torch.bfloat16)
    mod = ConvLinear4bit.from_linear(lin, group_size=64 if rotation != "sylvester" else 32, rotation=rotation, bits=bits)
    qw = quantize_weight(lin.weight, scheme, make_rotation(rotation, mod.group_size), group_size=mod.group_size)
    assert torch.equal(mod(x), reference_linear(x, qw, lin.bias))
    assert not any(isinstance(t, nn.Parameter) and t.dtype == torch.bfloat16 and t.dim() == 2 for t in mod.parameters())
    expected_bytes = 40 * 320 // (2 if bits == 4 else 1)
    assert mod.qweight.numel() * mod.qweight.element_size() == expected_bytes


def test_weight_only_linear_and_repr():
    lin = nn.Linear(512, 64)
    mod = Int4WeightOnlyLinear.from_linear(lin)
    x = torch.randn(1, 512)
    assert relative_error(mod(x), lin(x)) < 0.15
    assert "w4a16" in repr(mod)


def test_from_linear_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        ConvLinear4bit.from_linear(nn.Linear(256, 16), bits=3)
    with pytest.raises(TypeError, match="nn.Linear"):
        ConvLinear4bit.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="power of 4"):
        ConvLinear4bit.from_linear(nn.Linear(256, 16), group_size=128)


def test_plan_rules_first_match_wins_and_validation():
    plan = make_plan([("a.*", "w8a8"), ("*", "w4a4")])
    assert plan.match("a.b") == ("w8a8", "a.*") and plan.match("c")[0] == "w4a4"
    with pytest.raises(ValueError, match="unknown precision"):
        make_plan([("*", "int3")])
    with pytest.raises(ValueError, match="unknown plan"):
        make_plan("fast")


@pytest.fixture(scope="module")
def tiny():
    return build_flux("flux-tiny", seed=0)


def test_tiny_flux_plan_covers_every_token_linear(tiny):
    decisions = {d.name: d for d in decide_linears(tiny, "w4a4")}
    assert decisions["x_embedder"].precision == "bf16"
    assert decisions["transformer_blocks.0.norm1.linear"].precision == "w4a16"
    assert decisions["time_text_embed.text_embedder.linear_1"].precision == "bf16"
    assert "smaller than the group size" in decisions["time_text_embed.text_embedder.linear_1"].reason
    token = [n for n in decisions if ".attn." in n or ".ff" in n or "proj_mlp" in n or n.endswith("blocks.0.proj_out")
             or n.endswith("blocks.1.proj_out")]
    assert token and all(decisions[n].precision == "w4a4" for n in token)


def test_mix_plan_applies_paper_exceptions():
    model = build_flux("flux-tiny", seed=0)
    d = {x.name: x.precision for x in decide_linears(model, "mix")}
    assert d["transformer_blocks.1.attn.to_out.0"] == "w8a8"
    assert d["single_transformer_blocks.0.attn.to_v"] == "w8a8"
    assert d["single_transformer_blocks.0.attn.to_q"] == "w4a4"


def test_quantized_tiny_flux_is_close_and_small():
    model = build_flux("flux-tiny", seed=1)
    inputs = make_flux_inputs(model, 128, 128, 16, seed=1)
    with torch.no_grad():
        ref = model(**inputs.kwargs)[0]
        quantize_model(model, "w8a8", progress=False)
        e8 = relative_error(model(**inputs.kwargs)[0], ref)
    model4 = build_flux("flux-tiny", seed=1)
    with torch.no_grad():
        quantize_model(model4, "w4a4", progress=False)
        e4 = relative_error(model4(**inputs.kwargs)[0], ref)
    assert e8 < 0.02 and e4 < 0.1 and e8 < e4


def test_demo_cli_runs_on_cpu(tmp_path):
    out = tmp_path / "demo.json"
    proc = subprocess.run([sys.executable, "-m", "convrot_compiler", "demo", "--device", "cpu", "--no-progress",
                           "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "convrot w4a4" in proc.stdout and "output error: ||out - ref|| / ||ref||" in proc.stdout
    r = json.loads(out.read_text())
    assert r["layers"]["w4a4"] > 0 and 0 < r["rel_error"] < 0.3
    assert r["yardstick_plan"] == "w8a8" and 0 < r["yardstick_error"] < r["rel_error"] / 5
    assert f"with the w8a8 plan in this run: {r['yardstick_error']:.4f}" in proc.stdout
    assert r["weight_bytes_quantized"] < 0.35 * r["weight_bytes_bf16"]


def test_demo_regional_default_quantizes_what_the_whole_model_compile_does():
    from convrot_compiler.tools.demo import format_demo, run_demo

    whole, regional = (run_demo(device="cpu", progress=False, whole_model=flag) for flag in (True, False))
    assert regional.layers == whole.layers and regional.weight_bytes_quantized == whole.weight_bytes_quantized
    assert 0 < regional.rel_error < 0.3 and regional.rel_error == pytest.approx(whole.rel_error, rel=0.05)
    assert "regional" in format_demo(regional) and "regional" not in format_demo(whole)


def test_int8_weight_only_is_closer_than_int4_and_compiles_to_the_same_linear():
    import convrot_compiler as cc
    from convrot_compiler.nn import Int8WeightOnlyLinear

    torch.manual_seed(0)
    lin = nn.Linear(512, 96)
    x = torch.randn(3, 512)
    ref = lin(x)
    int8 = Int8WeightOnlyLinear.from_linear(lin)
    int4 = Int4WeightOnlyLinear.from_linear(lin)
    e8, e4 = ((m(x) - ref).norm() / ref.norm() for m in (int8, int4))
    assert e8 < e4 / 8 and e8 < 0.01
    assert torch.equal(int8(x), reference_linear(x, int8.quantized_weight, lin.bias))
    model = nn.Sequential(nn.Linear(512, 96)).bfloat16()
    eager = nn.Sequential(nn.Linear(512, 96)).bfloat16()
    eager.load_state_dict(model.state_dict())
    quantize_model(eager, [("*", "w8a16")], progress=False)
    assert isinstance(eager[0], Int8WeightOnlyLinear)
    xb = x.bfloat16()
    with torch.no_grad():
        cc.compile(model, plan=[("*", "w8a16")], progress=False)
        assert torch.equal(model(xb), eager(xb)) and model.convrot_decisions[0].precision == "w8a16"
