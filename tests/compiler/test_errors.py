"""Nothing silently wrong: released weights, state dicts, the recompile limit, plans that do nothing,
and errors a user can read (CPU)."""

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import convrot_compiler as cc
from convrot_compiler.compiler.weights import is_released
from convrot_compiler.plans import decide_linears, iter_linears
from convrot_compiler.tools.models import build_flux, make_flux_inputs, relative_error

pytestmark = pytest.mark.usefixtures("fresh_dynamo", "no_grad")  # conftest: Dynamo reset, no_grad


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "convrot_compiler", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_a_compiled_model_refuses_to_save_or_load_its_state_dict():
    model = build_flux("flux-tiny")
    cc.compile(model, progress=False)
    with pytest.raises(RuntimeError, match="state_dict would hold placeholders.*before compiling"):
        model.state_dict()
    with pytest.raises(RuntimeError, match="state_dict would hold placeholders"):
        model.transformer_blocks[0].state_dict()  # a block holding released weights, too
    with pytest.raises(RuntimeError, match="load them into a fresh model"):
        model.load_state_dict(build_flux("flux-tiny").state_dict())
    kept = build_flux("flux-tiny")
    cc.compile(kept, progress=False, release_weights=False)
    assert set(kept.state_dict()) == set(build_flux("flux-tiny").state_dict())


@pytest.mark.parametrize("regional", [None, False])
def test_a_linear_whose_weight_was_released_refuses_to_run_on_its_own(regional):
    model = build_flux("flux-tiny")
    kwargs = make_flux_inputs(model, 64, 64, 16).kwargs
    cc.compile(model, progress=False, regional=regional)
    assert model(**kwargs)[0].shape == (1, 16, 64)
    x = torch.randn(1, 8, 256, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="transformer_blocks.0.attn.to_q: its float weight was released"):
        model.transformer_blocks[0].attn.to_q(x)
    if regional is False:  # the blocks are not compiled on their own
        with pytest.raises(RuntimeError, match="runs only inside the compiled model"):
            model.transformer_blocks[0].ff(x)


@pytest.mark.parametrize("entry", ["backend", "compile"])
def test_past_the_recompile_limit_every_entry_point_raises_and_never_runs_unquantized(entry):
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(256, 64)).bfloat16()
    ref = nn.Sequential(nn.Linear(256, 64)).bfloat16()
    ref.load_state_dict(lin.state_dict())
    model = torch.compile(lin, backend="convrot") if entry == "backend" else cc.compile(lin, progress=False)
    outputs = []
    with pytest.raises((RuntimeError, torch._dynamo.exc.FailOnRecompileLimitHit), match="recompile_limit"):
        for rows in range(1, 11):  # 10 shapes; the limit is 8
            x = torch.randn(rows, 256, dtype=torch.bfloat16)
            outputs.append((model(x), ref(x)))
    assert 0 < len(outputs) <= 8
    assert all(not torch.equal(out, bf16) for out, bf16 in outputs)  # every call that ran was quantized


def test_plans_that_quantize_nothing_or_little_are_warned_of():
    def stack(*ks):
        return nn.Sequential(*(nn.Linear(k, 256) for k in ks))

    for plan in ([], [("nothing.*", "w4a4")]):
        with pytest.warns(UserWarning, match="quantizes none of the 2 linears"):
            cc.compile(stack(256, 256), plan=plan, progress=False)
    with pytest.warns(UserWarning, match="group_size=1024 leaves 2 of the 3 linears"):
        cc.compile(nn.Sequential(nn.Linear(1024, 256), nn.Linear(256, 256), nn.Linear(256, 1024)), group_size=1024,
                   progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cc.compile(stack(256, 256), progress=False)
        cc.compile(stack(256, 256), plan="none", progress=False)


def test_inputs_that_do_not_fit_the_model_are_one_line_before_tracing():
    model = build_flux("flux-tiny")
    inputs = make_flux_inputs(model, 64, 64, 16)
    cc.compile(model, progress=False)
    assert model(**inputs)[0].shape == (1, 16, 64)  # FluxInputs is a mapping: ** works
    cases = {"hidden_states": (torch.randn(1, 16, 32), "hidden_states: expected a tensor of shape (batch, image "
                                                       "tokens, 64), got (1, 16, 32)"),
             "encoder_hidden_states": (torch.randn(1, 16, 100), "encoder_hidden_states: expected shape (1, text "
                                                                "tokens, 256), got (1, 16, 100)"),
             "img_ids": (torch.zeros(15, 3), "img_ids: expected shape (16, 3), got (15, 3)"),
             "timestep": (torch.ones(3), "timestep: expected a tensor of 1 value, got (3,)")}
    for name, (value, message) in cases.items():
        with pytest.raises(ValueError) as info:
            model(**{**inputs.kwargs, name: value})
        assert str(info.value) == message


def test_models_that_cannot_be_compiled_say_why():
    with pytest.raises(ValueError, match="on the meta device.*load its weights"):
        cc.compile(build_flux("flux-tiny", device="meta"))
    with pytest.raises(ValueError, match="unknown config 'flux-huge'; choose one of"):
        build_flux("flux-huge")


def test_cli_errors_are_one_line_unless_debug(tmp_path):
    proc = _cli("eval", "--prompts", str(tmp_path / "none.txt"), "--device", "cpu")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: --prompts {tmp_path / 'none.txt'}: no such file" in proc.stderr
    proc = _cli("demo", "--device", "cpu", "--height", "100", "--no-progress")
    assert proc.returncode == 2 and "error: height and width must be positive multiples of 16" in proc.stderr
    assert "Traceback" not in proc.stderr
    debug = _cli("demo", "--device", "cpu", "--height", "100", "--no-progress", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_eval_checks_its_arguments_before_any_work_and_results_go_outside_the_package(tmp_path, monkeypatch):
    proc = _cli("eval", "--plans", "w4a4,w3a3", "--device", "cpu", "--out", str(tmp_path / "o"), timeout=120)
    assert proc.returncode == 2 and "unknown plan 'w3a3'" in proc.stderr and not (tmp_path / "o").exists()
    from convrot_compiler.tools import bench_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OUT", raising=False)
    paths = bench_model.write_results("x", {"rows": []}, "# x\n")
    assert all(p.startswith("convrot-out/bench/") for p in paths) and (tmp_path / "convrot-out/bench/x.md").exists()


def test_the_demo_model_depends_on_the_linears_it_quantizes():
    """Zeroing every linear the w4a4 plan quantizes moves the demo's built-in model far more than
    quantizing them does; with the adaLN gates of a random init (gate_bias 0) it hardly moves at all."""
    from convrot_compiler.nn.linear import quantize_model
    from convrot_compiler.tools.demo import DEMO_GATE_BIAS

    def moved(gate_bias, how):
        model = build_flux("flux-tiny", gate_bias=gate_bias)
        kwargs = make_flux_inputs(model, 128, 128, 32).kwargs
        ref = build_flux("flux-tiny", gate_bias=gate_bias)(**kwargs)[0]
        quantized = {d.name for d in decide_linears(model, "w4a4") if d.precision == "w4a4"}
        if how == "zero":
            for name, lin in iter_linears(model):
                if name in quantized:
                    lin.weight.zero_()
                    lin.bias.zero_()
        else:
            quantize_model(model, how, progress=False)
        return relative_error(model(**kwargs)[0], ref)

    zero, w4a4, w8a8 = (moved(DEMO_GATE_BIAS, how) for how in ("zero", "w4a4", "w8a8"))
    assert zero > 3 * w4a4 and w4a4 > 5 * w8a8, (zero, w4a4, w8a8)
    assert moved(0.0, "zero") < 0.1 < zero


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(256, 256) * 0.05)
        self.lin = nn.Linear(256, 256)

    def forward(self, x):
        return self.lin(torch.nn.functional.linear(x, self.w))


class _FunctionalStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Functional(), _Functional()])

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


@pytest.mark.parametrize("regional", [None, False])
def test_a_functional_linear_on_a_parameter_appears_in_the_decisions(regional):
    """Whole-model: quantized by the plan, and its float storage freed once its graph is compiled, without a
    second compile. Regional: the block's plan names its nn.Linear modules, so it stays bf16, and the
    decision says how to quantize it."""
    torch.manual_seed(0)
    model = _FunctionalStack().bfloat16()
    x = torch.randn(2, 8, 256, dtype=torch.bfloat16)
    cc.compile(model, progress=False, regional=regional)
    assert [d.name for d in model.convrot_decisions] == ["blocks.0.lin", "blocks.1.lin"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = model(x)
    d = {x.name: x for x in model.convrot_decisions}
    for i in (0, 1):
        w = d[f"blocks.{i}.w"]
        if regional is False:
            assert w.precision == "w4a4" and "its float storage was freed" in w.reason
            assert is_released(model.blocks[i].w) and model.blocks[i].w.untyped_storage().nbytes() == 0
        else:
            assert w.precision == "bf16" and "compile with regional=False to quantize it" in w.reason
            assert not is_released(model.blocks[i].w)
    assert torch.equal(model(x), first)
    assert len(model.convrot_decisions) == 4  # a second call adds nothing
    if regional is False:
        assert len(model.convrot_reports) == 1  # and compiles nothing: the release left the guards as they were
        with pytest.raises(RuntimeError):
            torch.nn.functional.linear(x, model.blocks[0].w)  # never zeros
        with pytest.raises(RuntimeError, match="state_dict would hold placeholders"):
            model.state_dict()


def test_a_functional_linear_is_quantized_like_the_nn_linears_and_kept_only_when_shared():
    torch.manual_seed(0)
    model = _FunctionalStack().bfloat16()
    kept = _FunctionalStack().bfloat16()
    kept.load_state_dict(model.state_dict())
    x = torch.randn(2, 8, 256, dtype=torch.bfloat16)
    cc.compile(model, progress=False, regional=False)
    cc.compile(kept, progress=False, regional=False, release_weights=False)
    assert torch.equal(model(x), kept(x))
    assert all(not is_released(p) for p in kept.parameters())
    shared = _FunctionalStack().bfloat16()
    buffer = torch.randn(2, 256, 256, dtype=torch.bfloat16) * 0.05
    for i, b in enumerate(shared.blocks):
        b.w = nn.Parameter(buffer[i])  # two weights, one storage: freeing it would free both
    cc.compile(shared, progress=False, regional=False)
    with pytest.warns(UserWarning, match="blocks.0.w: .* stays resident: another tensor shares its storage"):
        shared(x)
    assert not is_released(shared.blocks[0].w)
    assert "another tensor shares its storage" in {d.name: d for d in shared.convrot_decisions}["blocks.1.w"].reason


def test_the_stock_backend_warns_of_a_graph_its_plan_leaves_unquantized():
    x = torch.randn(4, 256)

    def stack():
        return nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))

    for options in ({"plan": []}, {"plan": [("nothing.*", "w4a4")]}, {"group_size": 1024}):
        torch._dynamo.reset()
        with pytest.warns(UserWarning, match="of the 2 linears of this graph"):
            torch.compile(stack(), backend="convrot", options=options)(x)
    for options in ({}, {"plan": "none"}, {"plan": [("*", "bf16")]}):  # quantized, or kept on purpose
        torch._dynamo.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.compile(stack(), backend="convrot", options=options)(x)
