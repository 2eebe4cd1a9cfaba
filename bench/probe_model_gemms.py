"""Probe: the quantized GEMMs of one FLUX.1-dev forward (1024^2, batch 1) as the model runs them, with
bias and GELU epilogues, under each schedule of kernels/int_gemm.py: which form should each take?

For every GEMM kind (M, K, N, bias, GELU columns, calls per forward), int8 operands (no unpack, no
rotation), one process:
* ``flat``, ``persistent``, ``persistent-ws``: int_gemm's forms as the compiler runs them (autotuned);
* ``ws:<config>``: int_gemm's warp-specialized persistent kernel per config (bench/probe_ws_gemm.py).
Each result is checked against the reference GEMM (GELU columns within 1e-2 of max |C|). The table
prints each kind's times and the per-forward total (time x calls) of each schedule, and of the best
form per kind.

    python bench/probe_model_gemms.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import environment, write_results  # noqa: E402
from bench.probe_ws_gemm import CONFIGS, checked_time, int8_operands, run_variant  # noqa: E402
from convrot_compiler import ops  # noqa: E402
from convrot_compiler.kernels.int_gemm import int_gemm  # noqa: E402

# (name, M, K, N, gelu_from, calls per forward): FLUX.1-dev, 19 double blocks (image 4096 tokens, text 512),
# 38 single blocks (4608 tokens); every linear has a bias
KINDS = [
    ("double img qkv", 4096, 3072, 9216, None, 19), ("double img out", 4096, 3072, 3072, None, 19),
    ("double img ff up", 4096, 3072, 12288, 0, 19), ("double img ff down", 4096, 12288, 3072, None, 19),
    ("double txt qkv", 512, 3072, 9216, None, 19), ("double txt out", 512, 3072, 3072, None, 19),
    ("double txt ff up", 512, 3072, 12288, 0, 19), ("double txt ff down", 512, 12288, 3072, None, 19),
    ("single qkv+mlp", 4608, 3072, 21504, 9216, 38), ("single proj_out", 4608, 15360, 3072, None, 38),
]
LIBRARY = {"flat": dict(persistent=False), "persistent": dict(persistent=True, warp_specialize=False),
           "persistent-ws": dict(persistent=True, warp_specialize=True)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    args = p.parse_args()
    from tabulate import tabulate
    from tqdm.auto import tqdm

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    env = environment()
    rows = []
    for name, m, k, n, gelu_from, calls in tqdm(KINDS, desc="GEMM kinds"):
        x, w, sx, sw = int8_operands(m, k, n)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        ref = ops.int_gemm_reference(x, sx, w, sw, bias, False, 256, torch.float32)
        if gelu_from is not None:
            ref[:, gelu_from:] = torch.nn.functional.gelu(ref[:, gelu_from:], approximate="tanh")
        cases = [(v, lambda kw=kw: int_gemm(x, sx, w, sw, bias, False, 256, torch.bfloat16, gelu_from=gelu_from, **kw))
                 for v, kw in LIBRARY.items()]
        cases += [(f"ws:{cfg}", run_variant("ws-persistent", cfg, x, w, sx, sw, sms, bias, gelu_from)) for cfg in CONFIGS]
        for variant, launch in cases:
            row = dict(kind=name, M=m, K=k, N=n, gelu=gelu_from is not None, calls=calls, variant=variant)
            r = checked_time(launch, ref)
            if "error" in r:
                rows.append(dict(row, us=None, error=r["error"]))
                continue
            rows.append(dict(row, us=r["us"], tops=2 * m * n * k / r["us"] / 1e6, err=r["err"]))
    ok = [r for r in rows if r.get("us") is not None and r["err"] < 1e-2]
    table, totals = [], {v: 0.0 for v in list(LIBRARY) + ["best ws config", "best of all"]}
    for name, m, k, n, gelu_from, calls in KINDS:
        mine = {r["variant"]: r for r in ok if r["kind"] == name}
        ws = min((r for v, r in mine.items() if v.startswith("ws:")), key=lambda r: r["us"], default=None)
        best = min(mine.values(), key=lambda r: r["us"], default=None)
        line = [name, m, f"{k}->{n}", "yes" if gelu_from is not None else "", calls]
        for v in LIBRARY:
            line.append(f"{mine[v]['us']:.1f}" if v in mine else "-")
            totals[v] += mine[v]["us"] * calls / 1e3 if v in mine else float("nan")
        line.append(f"{ws['us']:.1f} {ws['variant'][3:]}" if ws else "-")
        line.append(f"{best['variant']}" if best else "-")
        totals["best ws config"] += ws["us"] * calls / 1e3 if ws else float("nan")
        totals["best of all"] += best["us"] * calls / 1e3 if best else float("nan")
        table.append(line)
    md = ("# The quantized GEMMs of one FLUX.1-dev forward (1024^2) under each int8 GEMM schedule\n\n"
          f"GPU {env.get('gpu')} | torch {env['torch']} | triton {env['triton']} | {env['date']}\n\n"
          "us per call, int8 operands (no unpack), bias and GELU epilogues as in the model; every result checked "
          "against the reference.\n\n"
          + tabulate(table, headers=["kind", "M", "K->N", "GELU", "calls", *LIBRARY, "best ws config", "fastest"],
                     tablefmt="github")
          + "\n\nPer forward (ms, time x calls): "
          + ", ".join(f"{v} {t:.1f}" for v, t in totals.items()) + "\n")
    errors = [r for r in rows if r.get("us") is None or r.get("err", 0) >= 1e-2]
    if errors:
        md += f"\n{len(errors)} case(s) failed or were off; first: {errors[0]}\n"
    print(md)
    print("written:", *write_results("model_gemms", dict(env=env, rows=rows, totals=totals), md, args.out))


if __name__ == "__main__":
    main()
