"""FLUX.1-dev's adaLN normalization and the rotate+quantize after it at 1024²: Inductor's LayerNorm + modulation kernel
then the rotate+quantize (the compiler's default) against both in one kernel (convrot::rotate_quantize_adaln, option
``fuse_norms``), in one process.

Per input: a double block's image stream (4096 tokens) and text stream (512) from norm1, and a single block's text
and image tokens normalized together (512 + 4096, read as two row ranges by the fused kernel, concatenated by
Inductor's). The unfused form is compiled by torch.compile with the compiler's Inductor choices (``persistent_rows``);
each form is timed as CUDA-graph replays of 8 calls back to back, each on its own inputs, L2 flushed before each
replay; the fused form's quantized integers and token scales are compared with the unfused form's in the same run
(they differ where a normalized value rounds to the neighbouring bf16: numerics/adaln.py).

    python benchmarks/adaln.py [--name STEM] [--out DIR]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from args import gpu_benchmark_args  # benchmarks/args.py
from timing import bench_graph_per_call_ms  # benchmarks/timing.py

from convrot_compiler.compiler.inductor_choices import inductor_choices
from convrot_compiler.config import ConvRotConfig
from convrot_compiler.numerics.hadamard import hadamard_matrix
from convrot_compiler.ops import quantize_activation, quantize_adaln_activation
from convrot_compiler.ops.dispatch import act_order_for
from convrot_compiler.tools.bench_model import environment, write_results

K, EPS, COPIES = 3072, 1e-6, 8
CASES = (("double block, image", 4096, 0), ("double block, text", 512, 0), ("single block, text + image", 512, 4096))


def unfused(x, x2, scale, shift, h, order):
    tokens = x if x2 is None else torch.cat([x, x2], 1)
    normalized = F.layer_norm(tokens, (K,), eps=EPS) * (1 + scale[:, None]) + shift[:, None]
    return quantize_activation(normalized, h, 256, 4, order)


def fused(x, x2, scale, shift, h, order):
    return quantize_adaln_activation(x, x2, scale, shift, EPS, h, 256, 4, order)


def main() -> None:
    args = gpu_benchmark_args("adaln", __doc__.splitlines()[0])
    from tabulate import tabulate

    h = hadamard_matrix("regular", 16, device="cuda").bfloat16()
    order = act_order_for(torch.device("cuda"), torch.bfloat16, 256, rotated=True)
    g = torch.Generator(device="cuda").manual_seed(0)

    def tokens(t):  # DiT-like rows: a per-token offset on top of unit noise
        return None if t == 0 else (torch.randn(1, t, K, device="cuda", generator=g) * 2
                                    + torch.randn(1, t, 1, device="cuda", generator=g) * 4).bfloat16()

    emb = (torch.randn(1, 3 * K, device="cuda", generator=g) * 0.5).bfloat16()
    shift, scale = emb[:, :K], emb[:, K:2 * K]
    compiled = torch.compile(unfused)
    rows = []
    for case, t1, t2 in CASES:
        inputs = [(tokens(t1), tokens(t2)) for _ in range(COPIES)]
        with torch.no_grad(), inductor_choices(ConvRotConfig()):
            q_u, s_u = compiled(*inputs[0], scale, shift, h, order)
            q_f, s_f = fused(*inputs[0], scale, shift, h, order)
            moved = (q_f.int() - q_u.int()).abs()
            times = {name: bench_graph_per_call_ms([lambda xs=xs, fn=fn: fn(*xs, scale, shift, h, order)
                                                   for xs in inputs]) * 1e3
                     for name, fn in (("unfused", compiled), ("fused", fused))}
        rows.append(dict(case=case, tokens=t1 + t2, unfused_us=times["unfused"], fused_us=times["fused"],
                         speedup=times["unfused"] / times["fused"], ints_moved=moved.bool().float().mean().item(),
                         ints_max_move=moved.max().item(),
                         scale_max_rel=((s_f - s_u).abs() / s_u.abs()).max().item()))
        print(rows[-1], flush=True)
    env = environment()
    table = tabulate([[r["case"], r["tokens"], f"{r['unfused_us']:.1f}", f"{r['fused_us']:.1f}", f"{r['speedup']:.2f}x",
                       f"{r['ints_moved']:.1e}", r["ints_max_move"], f"{r['scale_max_rel']:.1e}"] for r in rows],
                     headers=["adaLN input", "tokens", "LayerNorm kernel + rotate+quantize us", "fused us", "speedup",
                              "ints moved", "largest move", "token scale rel diff"], tablefmt="github")
    md = (f"# FLUX.1-dev adaLN + rotate+quantize at 1024², unfused against fused\n\nGPU {env.get('gpu')} | "
          f"torch {env['torch']} | triton {env['triton']} | {env['date']}\n\n{table}\n\n"
          f"{__doc__.split(chr(10) + chr(10))[1]}\n")
    write_results(args.name, {"env": env, "rows": rows}, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
