"""Where does the compiled GPU model depart from the eager quantized one? Prints one line per check."""
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import convrot_compiler as cc  # noqa: E402
from convrot_compiler.models import build_flux, make_flux_inputs, relative_error  # noqa: E402
from convrot_compiler.modules import quantize_model  # noqa: E402


def line(name, a, b):
    print(f"{name:55s} rel err {relative_error(a, b):.3e}", flush=True)


torch.manual_seed(0)
for dims in ((3072, 3072), (15360, 3072)):
    lin = nn.Linear(*dims).cuda().bfloat16()
    x = torch.randn(1, 700, dims[0], device="cuda", dtype=torch.bfloat16)
    q = cc.ConvLinear4bit.from_linear(lin)
    with torch.no_grad():
        ref = q(x)
        for ind in (False, True):
            torch._dynamo.reset()
            m = nn.Sequential(nn.Linear(*dims).cuda().bfloat16())
            m[0].load_state_dict(lin.state_dict())
            out = cc.compile(m, inductor=ind, progress=False, release_weights=False)(x)
            line(f"single linear {dims} inductor={ind} vs eager module", out, ref)
        torch._dynamo.reset()
        m = nn.Sequential(nn.Linear(*dims).cuda().bfloat16(), nn.GELU())
        m[0].load_state_dict(lin.state_dict())
        out = cc.compile(m, inductor=True, progress=False, release_weights=False)(x)
        line(f"linear+gelu {dims} inductor=True vs eager", out, nn.functional.gelu(ref))

model = build_flux("flux-dev-short", seed=0, device="cuda")
kwargs = make_flux_inputs(model, 512, 512, 128, device="cuda").kwargs
with torch.no_grad():
    bf16 = model(**kwargs)[0]
ref_model = build_flux("flux-dev-short", seed=0, device="cuda")
with torch.no_grad():
    line("second build vs first (same seed), bf16", ref_model(**kwargs)[0], bf16)
quantize_model(ref_model, "w4a4", progress=False)
with torch.no_grad():
    ref = ref_model(**kwargs)[0]
line("eager quantized modules vs bf16", ref, bf16)
for ind in (False, True):
    torch._dynamo.reset()
    m = build_flux("flux-dev-short", seed=0, device="cuda")
    with torch.no_grad():
        out = cc.compile(m, inductor=ind, progress=False, release_weights=False)(**kwargs)[0]
    line(f"compiled inductor={ind} vs eager quantized", out, ref)
    line(f"compiled inductor={ind} vs bf16", out, bf16)
torch._dynamo.reset()
with torch.no_grad():
    out = torch.compile(build_flux("flux-dev-short", seed=0, device="cuda"))(**kwargs)[0]
line("bf16 torch.compile (inductor) vs bf16 eager", out, bf16)
