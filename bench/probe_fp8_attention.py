"""Probe: cuDNN's fp8 flash attention against the bf16 SDPA the model runs, at FLUX.1-dev's attention shapes.

Attention is the largest part of a w4a4 forward that convrot does not quantize (22.5 of 102.8 ms at 1024²,
bench/NOTES.md). Hopper's fp8 tensor cores run at twice the bf16 rate; cuDNN's fp8 SDPA (per-tensor scaled
e4m3 Q, K, V; the softmax quantized with a fixed scale; e4m3 output on Hopper) is reached through
nvidia-cudnn-frontend. This probe times, as CUDA-graph replays with L2 flushed:

- ``bf16``: ``F.scaled_dot_product_attention`` on the model's layout (a [B, S, H, D] tensor seen as [B, H, S, D]),
  with PyTorch's backend choice and with cuDNN's (which the compiled model ran);
- ``fp8 kernel``: the cuDNN fp8 kernel alone, inputs already in e4m3;
- ``fp8 + casts``: with the work around it: per-tensor absmax of Q, K, V, the casts to e4m3 and the output
  back to bf16 (Inductor-compiled, as the model would run them);

and the relative error of each against an fp32 reference, on diffuse (logit std 1) and peaky (std 9) inputs
with outlier channels in V.

    pip install nvidia-cudnn-frontend==1.16.0   # not a dependency of the package: this probe only
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
from convrot_compiler.models import relative_error  # noqa: E402

E4M3_MAX = 448.0
# (batch, tokens): FLUX.1-dev at 512², 1024², 2048² (image + 512 text tokens) and batch 4 at 1024²
SHAPES = [(1, 1536), (1, 4608), (1, 16896), (4, 4608)]
HEADS, HEAD_DIM = 24, 128


class CudnnFp8Attention:
    """One cuDNN fp8 SDPA graph for one [B, S, H, D] shape: e4m3 Q, K, V and O, fp32 per-tensor
    descales as 1-element device tensors (so that a CUDA graph can replay it with new scales)."""

    def __init__(self, batch: int, tokens: int, heads: int, head_dim: int, device: torch.device):
        import cudnn

        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32,
                              handle=self.handle)
        dims = [batch, heads, tokens, head_dim]
        strides = [tokens * heads * head_dim, head_dim, heads * head_dim, 1]  # [B, S, H, D] memory
        self.q, self.k, self.v = (graph.tensor(name=n, dim=dims, stride=strides, data_type=e4m3) for n in "qkv")
        scalar = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
        self.scalars = [graph.tensor(name=n, **scalar)
                        for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
        o, _, amax_s, amax_o = graph.sdpa_fp8(q=self.q, k=self.k, v=self.v, descale_q=self.scalars[0],
                                              descale_k=self.scalars[1], descale_v=self.scalars[2],
                                              descale_s=self.scalars[3], scale_s=self.scalars[4],
                                              scale_o=self.scalars[5], is_inference=True,
                                              attn_scale=1.0 / math.sqrt(head_dim), use_causal_mask=False,
                                              name="sdpa_fp8")
        o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(e4m3)
        for t in (amax_s, amax_o):
            t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
        self.o, self.amax_s, self.amax_o = o, amax_s, amax_o
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph = graph
        self.workspace = torch.empty(graph.get_workspace_size(), device=device, dtype=torch.uint8)
        self.amax_buf = torch.empty(2, device=device, dtype=torch.float32)
        s = torch.tensor([1.0 / E4M3_MAX, E4M3_MAX], device=device)
        self.descale_s, self.scale_s = s[0:1].view(1, 1, 1, 1), s[1:2].view(1, 1, 1, 1)

    def __call__(self, q8, k8, v8, descale_q, descale_k, descale_v, scale_o, out8):
        """q8, k8, v8, out8: e4m3 [B, S, H, D]; the scales: fp32 [1, 1, 1, 1]."""
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        pack = {self.q: q8, self.k: k8, self.v: v8, self.o: out8,
                self.scalars[0]: descale_q, self.scalars[1]: descale_k, self.scalars[2]: descale_v,
                self.scalars[3]: self.descale_s, self.scalars[4]: self.scale_s, self.scalars[5]: scale_o,
                self.amax_s: self.amax_buf[0:1].view(1, 1, 1, 1), self.amax_o: self.amax_buf[1:2].view(1, 1, 1, 1)}
        self.graph.execute(pack, self.workspace, handle=self.handle)


def quantize_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor e4m3: values x * 448 / absmax(x) and the descale absmax / 448 as [1, 1, 1, 1] fp32."""
    amax = x.abs().amax().float().clamp_min(1e-12)
    return (x.float() * (E4M3_MAX / amax)).to(torch.float8_e4m3fn), (amax / E4M3_MAX).view(1, 1, 1, 1)


def dequantize(o8: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    return (o8.float() * descale.view(())).to(torch.bfloat16)


def make_inputs(batch: int, tokens: int, logit_std: float, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, tokens, HEADS, HEAD_DIM)
    q = torch.randn(shape, device=device, generator=g) * math.sqrt(logit_std)
    k = torch.randn(shape, device=device, generator=g) * math.sqrt(logit_std)
    v = torch.randn(shape, device=device, generator=g)
    v[..., :4] *= 20.0  # outlier channels
    return [t.to(torch.bfloat16) for t in (q, k, v)]


def bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 1, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default="fp8_attention")
    args = ap.parse_args()
    from tabulate import tabulate

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (Hopper or newer for fp8 attention)")
    try:
        import cudnn
    except ImportError:
        sys.exit("needs cuDNN's Python frontend: pip install nvidia-cudnn-frontend==1.16.0 (it uses the cuDNN "
                 "library that PyTorch installed)")
    dev = torch.device("cuda")

    env = environment() | {"cudnn_backend": cudnn.backend_version(), "cudnn_frontend": cudnn.__version__}
    prologue = torch.compile(lambda q, k, v: (*quantize_e4m3(q), *quantize_e4m3(k), *quantize_e4m3(v)))
    epilogue = torch.compile(dequantize)
    rows = []
    for batch, tokens in SHAPES:
        flops = 4 * batch * HEADS * tokens * tokens * HEAD_DIM
        attn = CudnnFp8Attention(batch, tokens, HEADS, HEAD_DIM, dev)
        errs = {}
        for logit_std in (1.0, 9.0):
            q, k, v = make_inputs(batch, tokens, logit_std, dev)
            with torch.no_grad():
                ref = bhsd(F.scaled_dot_product_attention(*(bhsd(t.float()) for t in (q, k, v))))
                bf16 = bhsd(F.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v)))
                q8, dq, k8, dk, v8, dv = prologue(q, k, v)
                o8 = torch.empty_like(q8)
                attn(q8, k8, v8, dq, dk, dv, 1.0 / dv, o8)
                fp8 = epilogue(o8, dv)
            errs[logit_std] = (relative_error(bf16, ref), relative_error(fp8, ref))
            del ref
        q, k, v = make_inputs(batch, tokens, 1.0, dev)
        q8, dq, k8, dk, v8, dv = prologue(q, k, v)
        o8 = torch.empty_like(q8)
        inv = 1.0 / dv

        def full():
            q8_, dq_, k8_, dk_, v8_, dv_ = prologue(q, k, v)
            attn(q8_, k8_, v8_, dq_, dk_, dv_, 1.0 / dv_, o8)
            return epilogue(o8, dv_)

        t_bf16 = bench_graph_ms(lambda: F.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v)))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            t_bf16_cudnn = bench_graph_ms(lambda: F.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v)))
        t_kernel = bench_graph_ms(lambda: attn(q8, k8, v8, dq, dk, dv, inv, o8))
        t_full = bench_graph_ms(full)
        rows.append({"batch": batch, "tokens": tokens, "bf16_us": t_bf16 * 1e3, "bf16_cudnn_us": t_bf16_cudnn * 1e3,
                     "fp8_kernel_us": t_kernel * 1e3, "fp8_full_us": t_full * 1e3, "bf16_tflops": flops / t_bf16 / 1e9,
                     "fp8_tflops": flops / t_kernel / 1e9,
                     "err_bf16_diffuse": errs[1.0][0], "err_fp8_diffuse": errs[1.0][1],
                     "err_bf16_peaky": errs[9.0][0], "err_fp8_peaky": errs[9.0][1]})
        print(rows[-1], flush=True)
        del attn
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
