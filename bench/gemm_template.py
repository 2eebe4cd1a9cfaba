"""The quantized GEMM with what follows it in FLUX, three ways, under torch.compile (issue: Triton kernels, item 5).

For each FLUX token-GEMM shape and each epilogue that follows a FLUX linear:
* ``bf16``: Inductor on ``F.linear`` (cuBLAS) + the pointwise epilogue;
* ``kernel``: the opaque ``convrot::int_gemm`` op (bias inside), the epilogue a separate Inductor kernel;
* ``template``: ``convrot::scaled_int_mm`` lowered through the Inductor Triton template
  (kernels/inductor_gemm.py); Inductor fuses bias + epilogue into the GEMM's store.
Weights are int8 values in [-7, 7] (the unpack of int4 weights is the same op in both convrot
forms and is left out). Each output is checked against a float32 reference in the same run.
Epilogues: ``bias`` (to_q/k/v), ``gate+residual`` (attn to_out, ff down, proj_out: h + g * y),
``gelu`` (ff up, proj_mlp: gelu_tanh(y)).

    python bench/gemm_template.py [--m 4608] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import bench_ms, environment, write_results  # noqa: E402
from convrot_compiler import ops  # noqa: F401,E402
from convrot_compiler.kernels import inductor_gemm  # noqa: E402
from convrot_compiler.models import relative_error  # noqa: E402

CASES = [  # (name, K, N, epilogue)
    ("qkv 3072->9216", 3072, 9216, "bias"),
    ("attn out 3072->3072", 3072, 3072, "gate+residual"),
    ("ff up 3072->12288", 3072, 12288, "gelu"),
    ("ff down 12288->3072", 12288, 3072, "gate+residual"),
    ("single proj_out 15360->3072", 15360, 3072, "gate+residual"),
]


def epilogue(kind: str, y: torch.Tensor, gate: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    if kind == "bias":
        return y
    if kind == "gelu":
        return F.gelu(y, approximate="tanh")
    return res + gate * y


def make_fns(kind: str):
    def bf16(x, w, b, gate, res):
        return epilogue(kind, F.linear(x, w, b), gate, res)

    def kernel(q, s, qw, sw, b, gate, res):
        return epilogue(kind, torch.ops.convrot.int_gemm(q, s, [qw], [sw], [b], False, 256, torch.bfloat16), gate, res)

    def template(q, s, qw, sw, b, gate, res):
        return epilogue(kind, torch.ops.convrot.scaled_int_mm(q, s, qw, sw, 256, torch.bfloat16) + b, gate, res)

    return bf16, kernel, template


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=4608)
    ap.add_argument("--out", help="result folder (default $OUT or bench/results)")
    ap.add_argument("--name", default="gemm_template")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gemm_template.py needs a CUDA GPU")
    inductor_gemm.register()
    torch.manual_seed(0)
    m = args.m
    rows = []
    for name, k, n, kind in CASES:
        torch._dynamo.reset()
        q = torch.randint(-7, 8, (m, k), dtype=torch.int8, device="cuda")
        s = torch.rand(m, device="cuda") * 0.01 + 0.001
        qw = torch.randint(-7, 8, (n, k), dtype=torch.int8, device="cuda")
        sw = torch.rand(n, device="cuda") * 0.01 + 0.001
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        gate = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        res = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        x = (q.float() * s[:, None]).bfloat16()  # a bf16 problem of the same shape for the baseline
        w = (qw.float() * sw[:, None]).bfloat16()
        ref = epilogue(kind, (q.double() @ qw.double().T * s[:, None].double() * sw[None, :].double()
                              + b.double()).float(), gate.float(), res.float())
        bf16, kernel, template = (torch.compile(f, dynamic=False) for f in make_fns(kind))
        runs = {"bf16": lambda: bf16(x, w, b, gate, res),
                "kernel": lambda: kernel(q, s, qw, sw, b, gate, res),
                "template": lambda: template(q, s, qw, sw, b, gate, res)}
        flops = 2 * m * n * k
        row = {"shape": name, "M": m, "K": k, "N": n, "epilogue": kind}
        for label, fn in runs.items():
            out = fn()
            ms = bench_ms(fn)
            row[f"{label} ms"] = round(ms, 4)
            row[f"{label} TOPS"] = round(flops / ms / 1e9, 1)
            row[f"{label} err"] = float(f"{relative_error(out.float(), ref):.2e}")
        row["template vs kernel"] = round(row["kernel ms"] / row["template ms"], 3)
        row["template vs bf16"] = round(row["bf16 ms"] / row["template ms"], 3)
        row["kernel vs bf16"] = round(row["bf16 ms"] / row["kernel ms"], 3)
        rows.append(row)
        print(f"{name} [{kind}]: bf16 {row['bf16 ms']:.3f} ms, kernel {row['kernel ms']:.3f}, "
              f"template {row['template ms']:.3f}", flush=True)
    geo = lambda key: math.exp(sum(math.log(r[key]) for r in rows) / len(rows))  # noqa: E731
    cols = ["shape", "epilogue", "bf16 ms", "kernel ms", "template ms", "kernel TOPS", "template TOPS",
            "kernel vs bf16", "template vs bf16", "template vs kernel", "kernel err", "template err"]
    summary = {"geomean template vs kernel": round(geo("template vs kernel"), 3),
               "geomean template vs bf16": round(geo("template vs bf16"), 3),
               "geomean kernel vs bf16": round(geo("kernel vs bf16"), 3)}
    from tabulate import tabulate

    env = environment()
    table = tabulate([[r[c] for c in cols] for r in rows], headers=cols, tablefmt="github")
    md = (f"# Quantized GEMM + FLUX epilogue under torch.compile, M={m}: opaque op vs Inductor template\n\n"
          f"GPU {env.get('gpu')} | torch {env['torch']} | triton {env['triton']} | {env['date']}\n\n{table}\n\n"
          + "".join(f"- {k}: {v}\n" for k, v in summary.items()))
    print(md)
    print("written:", *write_results(args.name, {"env": env, "rows": rows, "summary": summary}, md, args.out))


if __name__ == "__main__":
    main()
