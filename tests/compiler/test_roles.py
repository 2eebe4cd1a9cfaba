"""Roles from the shape probe (compiler/roles.py): FLUX.1's presets decide as their names always did; a model
the probe cannot run, or of a family it has no inputs for, is decided by names and says why."""

import pytest
import torch
from torch import nn

from convrot_compiler.compiler.roles import (
    INPUT_PROJECTION,
    OUTPUT_PROJECTION,
    PER_SAMPLE,
    ROLE_RULE,
    decide_model,
    probe_roles,
)
from convrot_compiler.plans import decide_linears, make_plan
from convrot_compiler.tools.models import build_flux


def test_flux_roles_agree_with_the_names_the_presets_give():
    model = build_flux("flux-dev", device="meta")
    probe = probe_roles(model)
    assert probe.roles["transformer_blocks.0.norm1.linear"] == PER_SAMPLE
    assert probe.roles["norm_out.linear"] == PER_SAMPLE
    assert probe.roles["x_embedder"] == INPUT_PROJECTION and probe.roles["proj_out"] == OUTPUT_PROJECTION
    assert "transformer_blocks.0.attn.to_q" not in probe.roles
    for preset in ("w4a4", "w8a8", "mix"):
        by_names = decide_linears(model, preset)
        decisions, plan, note = decide_model(model, make_plan(preset), 256)
        assert [(d.name, d.precision, d.reason) for d in decisions] == [(d.name, d.precision, d.reason)
                                                                         for d in by_names]
        assert plan == make_plan(preset) and "shape probe of FluxTransformer2DModel" in note


class _Tiny(nn.Module):
    def __init__(self, fail: bool = False):
        super().__init__()
        self.fail = fail
        self.a, self.b = nn.Linear(256, 256), nn.Linear(256, 256)

    def forward(self, x):
        if self.fail:
            x = x + x.sum().item()  # data-dependent: the meta device cannot run it
        return self.b(self.a(x))


def test_a_model_without_example_inputs_is_decided_by_names_and_says_so():
    probe = probe_roles(_Tiny())
    assert probe.roles == {} and "no example inputs for _Tiny" in probe.note
    decisions, plan, note = decide_model(_Tiny(), make_plan("w4a4"), 256)
    assert all(d.precision == "w4a4" and d.rule != ROLE_RULE for d in decisions) and plan == make_plan("w4a4")
    assert note == probe.note


def test_a_forward_the_probe_cannot_run_falls_back_to_names_with_the_reason(monkeypatch):
    from convrot_compiler.compiler import roles

    monkeypatch.setattr(roles, "example_inputs", lambda model: {"x": torch.zeros(4, 256, device="meta")})
    with pytest.warns(UserWarning, match="shape probe of _Tiny failed"):
        probe = probe_roles(_Tiny(fail=True))
    assert probe.roles == {} and "shape probe of _Tiny failed" in probe.note
    ok = probe_roles(_Tiny())
    assert ok.roles == {"a": INPUT_PROJECTION, "b": OUTPUT_PROJECTION}


def test_the_probe_leaves_no_meta_tensor_behind():
    """Z-Image caches its RoPE table on the first forward, on the inputs' device, in a plain object the model
    holds: the probe puts it back, so the model still runs on its own device afterwards."""
    from convrot_compiler.families import example_inputs, sample_output
    from convrot_compiler.tools.models import build_family

    model = build_family("z-image-tiny", device="cpu")
    before = model.rope_embedder.freqs_cis
    assert PER_SAMPLE in probe_roles(model).roles.values()
    assert model.rope_embedder.freqs_cis is before
    with torch.no_grad():
        assert torch.isfinite(sample_output(model(**example_inputs(model, "cpu")))).all()
