"""The compiler on a GPU at FLUX.1-dev widths (skipped without CUDA)."""

import pytest
import torch

import convrot_compiler as cc
from convrot_compiler.backend import REPORTS
from convrot_compiler.models import build_flux, make_flux_inputs, model_bytes, relative_error
from convrot_compiler.modules import plan_linears, quantize_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("plan", ["w4a4", "mix"])
def test_flux_dev_widths_compiled_with_inductor_match_eager_kernels(plan):
    torch._dynamo.reset()
    model = build_flux("flux-dev-short", seed=0, device="cuda")
    kwargs = make_flux_inputs(model, 512, 512, 128, device="cuda").kwargs
    with torch.no_grad():
        bf16 = model(**kwargs)[0]
    ref_model = build_flux("flux-dev-short", seed=0, device="cuda")
    quantize_model(ref_model, plan, progress=False)
    with torch.no_grad():
        ref = ref_model(**kwargs)[0]
    del ref_model
    before = model_bytes(model)
    expected = sum(d.precision != "bf16" for d in plan_linears(model, plan))
    compiled = cc.compile(model, plan=plan, inductor=True, progress=False)
    out = compiled(**kwargs)[0]
    assert REPORTS[-1].rewritten == expected
    assert torch.isfinite(out).all()
    # same kernels, Inductor around them: bf16 rounding of the surrounding ops may differ
    assert relative_error(out, ref) < 1e-2
    assert relative_error(out, bf16) < 0.2
    prepared = sum(d.bytes_after for d in compiled.decisions if d.precision != "bf16")
    torch.cuda.synchronize()
    assert model_bytes(model) + prepared < (0.3 if plan == "w4a4" else 0.4) * before
