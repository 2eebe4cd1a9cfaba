"""Probe: cuDNN's fp8 flash attention against the bf16 SDPA the model runs, at FLUX.1-dev's attention shapes.

Attention is the largest part of a w4a4 forward that convrot does not quantize (22.5 of 102.8 ms at 1024²,
bench/NOTES.md). Hopper's fp8 tensor cores run at twice the bf16 rate; cuDNN's fp8 SDPA (per-tensor scaled
e4m3 Q, K, V; the softmax quantized with a fixed scale; e4m3 output on Hopper) is reached through
nvidia-cudnn-frontend. This probe times, as CUDA-graph replays with L2 flushed:

- ``bf16``: ``F.scaled_dot_product_attention`` on the model's layout (a [B, S, H, D] tensor seen as [B, H, S, D]),
  with PyTorch's backend choice and with cuDNN's (which the compiled model ran);
- ``fp8 kernel``: the cuDNN fp8 kernel alone (kernels/cudnn_attention.py, what attention="fp8" runs), inputs
  already in e4m3;
- ``fp8 + casts``: with the work around it: per-tensor absmax of Q, K, V, the casts to e4m3 and the output
  back to bf16 (Inductor-compiled, as the model would run them);

and the relative error of each against an fp32 reference, on diffuse (logit std 1) and peaky (std 9) inputs
with outlier channels in V.

    pip install 'convrot-compiler[fp8-attention]'   # nvidia-cudnn-frontend
    python bench/probe_fp8_attention.py --out bench/results
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._common import bench_graph_ms, environment, write_results  # noqa: E402
from convrot_compiler.attention import dequantize_e4m3, inverse_descale, quantize_e4m3  # noqa: E402
from convrot_compiler.kernels.cudnn_attention import fp8_attention, unavailable_reason  # noqa: E402
from convrot_compiler.models import relative_error  # noqa: E402

# (batch, tokens): FLUX.1-dev at 512², 1024², 2048² (image + 512 text tokens) and batch 4 at 1024²
SHAPES = [(1, 1536), (1, 4608), (1, 16896), (4, 4608)]
HEADS, HEAD_DIM = 24, 128


def make_inputs(batch: int, tokens: int, logit_std: float, device, seed: int = 0):
    """Q, K, V as the model hands them to attention: [B, H, S, D] views of [B, S, H, D] bf16 memory."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, tokens, HEADS, HEAD_DIM)
    q = torch.randn(shape, device=device, generator=g) * math.sqrt(logit_std)
    k = torch.randn(shape, device=device, generator=g) * math.sqrt(logit_std)
    v = torch.randn(shape, device=device, generator=g)
    v[..., :4] *= 20.0  # outlier channels
    return [t.to(torch.bfloat16).permute(0, 2, 1, 3) for t in (q, k, v)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default="fp8_attention")
    args = ap.parse_args()
    from tabulate import tabulate

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (Hopper or newer for fp8 attention)")
    why = unavailable_reason()
    if why:
        sys.exit(f"fp8 attention {why}")
    import cudnn

    dev = torch.device("cuda")
    env = environment() | {"cudnn_backend": cudnn.backend_version(), "cudnn_frontend": cudnn.__version__}
    scale = 1.0 / math.sqrt(HEAD_DIM)

    @torch.compile
    def prologue(q, k, v):
        (q8, dq), (k8, dk), (v8, dv) = quantize_e4m3(q), quantize_e4m3(k), quantize_e4m3(v)
        return q8, dq, k8, dk, v8, dv, inverse_descale(dv)

    epilogue = torch.compile(lambda o8, dv: dequantize_e4m3(o8, dv, torch.bfloat16))

    def full(q, k, v):
        q8, dq, k8, dk, v8, dv, inv = prologue(q, k, v)
        return epilogue(fp8_attention(q8, k8, v8, dq, dk, dv, inv, scale), dv)

    rows = []
    for batch, tokens in SHAPES:
        flops = 4 * batch * HEADS * tokens * tokens * HEAD_DIM
        errs = {}
        for logit_std in (1.0, 9.0):
            q, k, v = make_inputs(batch, tokens, logit_std, dev)
            with torch.no_grad():
                ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
                bf16 = F.scaled_dot_product_attention(q, k, v)
                fp8 = full(q, k, v)
            errs[logit_std] = (relative_error(bf16, ref), relative_error(fp8, ref))
            del ref
        q, k, v = make_inputs(batch, tokens, 1.0, dev)
        q8, dq, k8, dk, v8, dv, inv = prologue(q, k, v)

        t_bf16 = bench_graph_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            t_bf16_cudnn = bench_graph_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        t_kernel = bench_graph_ms(lambda: fp8_attention(q8, k8, v8, dq, dk, dv, inv, scale))
        t_full = bench_graph_ms(lambda: full(q, k, v))
        rows.append({"batch": batch, "tokens": tokens, "bf16_us": t_bf16 * 1e3, "bf16_cudnn_us": t_bf16_cudnn * 1e3,
                     "fp8_kernel_us": t_kernel * 1e3, "fp8_full_us": t_full * 1e3, "bf16_tflops": flops / t_bf16 / 1e9,
                     "fp8_tflops": flops / t_kernel / 1e9,
                     "err_bf16_diffuse": errs[1.0][0], "err_fp8_diffuse": errs[1.0][1],
                     "err_bf16_peaky": errs[9.0][0], "err_fp8_peaky": errs[9.0][1]})
        print(rows[-1], flush=True)
    table = tabulate([[r["batch"], r["tokens"], f"{r['bf16_us']:.1f}", f"{r['bf16_cudnn_us']:.1f}",
                       f"{r['fp8_kernel_us']:.1f}", f"{r['fp8_full_us']:.1f}", f"{r['bf16_tflops']:.0f}", f"{r['fp8_tflops']:.0f}",
                       f"{r['bf16_us'] / r['fp8_kernel_us']:.2f}", f"{r['bf16_us'] / r['fp8_full_us']:.2f}",
                       f"{r['err_bf16_diffuse']:.4f} / {r['err_fp8_diffuse']:.4f}",
                       f"{r['err_bf16_peaky']:.4f} / {r['err_fp8_peaky']:.4f}"] for r in rows],
                     headers=["batch", "tokens", "bf16 us", "bf16 cuDNN us", "fp8 kernel us", "fp8 + casts us",
                              "bf16 TFLOPS", "fp8 TFLOPS", "x kernel", "x with casts", "err bf16 / fp8 (logit std 1)",
                              "err bf16 / fp8 (std 9)"], tablefmt="github")
    md = (f"# cuDNN fp8 attention vs bf16 SDPA, FLUX.1-dev shapes ({HEADS} heads x {HEAD_DIM})\n\n"
          f"GPU {env.get('gpu')} | torch {env['torch']} | triton {env['triton']} | cuDNN {env['cudnn_backend']} | "
          f"cudnn-frontend {env['cudnn_frontend']} | {env['date']}\n\n"
          "CUDA-graph replays, L2 flushed. Errors: relative Frobenius error against fp32 attention of the same "
          "bf16 inputs (V with 4 outlier channels x20).\n\n" + table + "\n")
    print(md)
    write_results(args.name, {"env": env, "rows": rows}, md, args.out)


if __name__ == "__main__":
    main()
