"""FLUX.1-dev's attention at 1024² (4096 image + 512 text tokens, 24 heads of 128) from the RMSNorm to the output,
compiled as the convrot compiler runs it: bf16 with Inductor's RMSNorm + RoPE or with the one kernel
(convrot::rms_rope, the compiler's default), and fp8 with Q and K scaled by their absmax or by their RMSNorm's
bound (compiler/value_bounds.py), the last with Inductor's RMSNorm + RoPE + cast or with the one kernel
(convrot::rms_rope_e4m3, the compiler's default), in one process.

Per form: the attention error against float32 on the same Q, K, V, and the time of the compiled step (per-head
RMSNorm of Q and K, their concatenation, RoPE, the e4m3 casts and attention; a CUDA-graph replay, L2 flushed).
The norm weights are drawn (no FLUX weights are reachable here): uniform in [0.5, 2] with 4 channels of each head at 8,
so that the bound sqrt(128) max|w| is what a model with outlier norm channels would get.

    python benchmarks/fp8_attention.py [--name STEM] [--out DIR]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from args import gpu_benchmark_args  # benchmarks/args.py
from timing import bench_graph_ms  # benchmarks/timing.py

from convrot_compiler.numerics.error import relative_error
from convrot_compiler.ops import (
    fp8_attention_from_e4m3,
    fp8_scaled_dot_product_attention,
    rms_rope_16bit,
    rms_rope_quantize_e4m3,
)
from convrot_compiler.tools.bench_model import environment, write_results

TXT, IMG, HEADS, D = 512, 4096, 24, 128
FORMS = ("bf16", "bf16, one kernel", "fp8 absmax", "fp8 RMSNorm bound", "fp8 RMSNorm bound, one kernel")


def norm_weight(seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.rand(D, device="cuda", generator=g) * 1.5 + 0.5
    w[torch.randperm(D, device="cuda", generator=g)[:4]] = 8.0
    return w.bfloat16()


def rope_tables() -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(TXT + IMG, device="cuda").float()
    freqs = torch.outer(pos, 1.0 / 10000 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    freqs = freqs.repeat_interleave(2, -1)
    return freqs.cos(), freqs.sin()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos[None, :, None] + rotated.float() * sin[None, :, None]).to(x.dtype)


def qk(txt, img, w_txt, w_img, cos, sin):
    heads = [F.rms_norm(t.unflatten(-1, (HEADS, D)), (D,), w, 1e-6) for t, w in ((txt, w_txt), (img, w_img))]
    return rope(torch.cat(heads, dim=1), cos, sin).transpose(1, 2)


def attention(form: str):
    def run(xq_txt, xq_img, xk_txt, xk_img, v, wq_txt, wq_img, wk_txt, wk_img, cos, sin):
        heads = [t.unflatten(-1, (HEADS, D)) for t in (xq_txt, xq_img, xk_txt, xk_img)]
        if form == "bf16, one kernel":
            q, k = (rms_rope_16bit(h, w, [1e-6] * 2, cos, sin).transpose(1, 2)
                    for h, w in ((heads[:2], [wq_txt, wq_img]), (heads[2:], [wk_txt, wk_img])))
            return F.scaled_dot_product_attention(q, k, v)
        q = qk(xq_txt, xq_img, wq_txt, wq_img, cos, sin)
        k = qk(xk_txt, xk_img, wk_txt, wk_img, cos, sin)
        if form == "bf16":
            return F.scaled_dot_product_attention(q, k, v)
        if form == "fp8 absmax":
            return fp8_scaled_dot_product_attention(q, k, v)
        bound = math.sqrt(D) * (cos.abs().amax() + sin.abs().amax())  # compiler/value_bounds.py's rules
        q_bound = bound * torch.maximum(wq_txt.float().abs().amax(), wq_img.float().abs().amax())
        k_bound = bound * torch.maximum(wk_txt.float().abs().amax(), wk_img.float().abs().amax())
        if form == "fp8 RMSNorm bound":
            return fp8_scaled_dot_product_attention(q, k, v, query_bound=q_bound, key_bound=k_bound)
        q8, dq = rms_rope_quantize_e4m3(heads[:2], [wq_txt, wq_img], [1e-6] * 2, cos, sin, q_bound)
        k8, dk = rms_rope_quantize_e4m3(heads[2:], [wk_txt, wk_img], [1e-6] * 2, cos, sin, k_bound)
        return fp8_attention_from_e4m3(q8.transpose(1, 2), dq, k8.transpose(1, 2), dk, v)
    return run


def main() -> None:
    args = gpu_benchmark_args("fp8_attention", __doc__.splitlines()[0])
    from tabulate import tabulate

    g = torch.Generator(device="cuda").manual_seed(0)
    acts = [torch.randn(1, s, HEADS * D, device="cuda", generator=g).bfloat16() for s in (TXT, IMG, TXT, IMG)]
    v = (torch.randn(1, HEADS, TXT + IMG, D, device="cuda", generator=g) * 2).bfloat16()
    inputs = (*acts, v, *(norm_weight(i) for i in range(4)), *rope_tables())
    exact = attention("bf16")(*(t.float() if t.dtype == torch.bfloat16 else t for t in inputs))
    rows = []
    for form in FORMS:
        torch._dynamo.reset()
        fn = torch.compile(attention(form))
        with torch.no_grad():
            out = fn(*inputs)
            ms = bench_graph_ms(lambda: fn(*inputs))
        rows.append(dict(form=form, us=ms * 1e3, err_vs_fp32=relative_error(out, exact)))
        print(rows[-1], flush=True)
    base = {r["form"]: r for r in rows}
    for r in rows:
        r["vs_absmax"] = base["fp8 absmax"]["us"] / r["us"]
    env = environment()
    table = tabulate([[r["form"], f"{r['us']:.0f}", f"{r['vs_absmax']:.2f}x", f"{r['err_vs_fp32']:.4f}"] for r in rows],
                     headers=["attention", "us (norms, RoPE, casts, attention)", "speed vs fp8 absmax",
                              "error vs float32"], tablefmt="github")
    md = (f"# FLUX.1-dev attention at 1024², fp8 scalings\n\nGPU {env.get('gpu')} | torch {env['torch']} | "
          f"triton {env['triton']} | {env['date']}\n\n{table}\n\n{__doc__.split(chr(10) + chr(10))[1]}\n")
    write_results(args.name, {"env": env, "rows": rows}, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
