"""The int8 GEMM's GELU epilogue at FLUX.1-dev shapes: no GELU, the exact form (exp + division) and
the hardware tanh (the default on a GPU), timed in one process, with the hardware form's error.

    python bench/probe_gelu_epilogue.py   # prints a table; writes gelu_epilogue.{json,md} under $OUT
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import bench_ms, environment, write_results  # noqa: E402
from convrot_compiler import ops  # noqa: E402
from convrot_compiler.kernels.int_gemm import int_gemm  # noqa: E402

# (name, output widths of the linears sharing the GEMM, gelu_from)
SHAPES = [("ff up 3072->12288", (12288,), 0),
          ("single q/k/v/mlp 3072->21504", (3072, 3072, 3072, 12288), 9216)]


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    from tabulate import tabulate

    rows = []
    k = 3072
    for m in (4608, 512):
        for name, ns, gelu_from in SHAPES:
            torch.manual_seed(0)
            qx = torch.randint(-7, 8, (m, k), dtype=torch.int8, device="cuda")
            sx = torch.rand(m, device="cuda") * 1e-2 + 1e-3
            qws = [torch.randint(-7, 8, (n, k), dtype=torch.int8, device="cuda") for n in ns]
            sws = [torch.rand(n, device="cuda") * 1e-2 + 1e-3 for n in ns]
            biases = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for n in ns]

            def gemm(**kw):
                return int_gemm(qx, sx, qws, sws, biases, False, 256, torch.bfloat16, **kw)

            ref = ops.int_gemm_reference(qx, sx, qws, sws, biases, False, 256, torch.float32, gelu_from)
            fast = int_gemm(qx, sx, qws, sws, biases, False, 256, torch.float32, gelu_from=gelu_from)
            exact = int_gemm(qx, sx, qws, sws, biases, False, 256, torch.float32, gelu_from=gelu_from,
                             exact_gelu=True)
            times = {label: bench_ms(lambda kw=kw: gemm(**kw), warmup_ms=100, rep_ms=500)
                     for label, kw in [("none", {}), ("exact", {"gelu_from": gelu_from, "exact_gelu": True}),
                                       ("hardware", {"gelu_from": gelu_from})]}
            gelu_cols = slice(gelu_from, None)
            rows.append(dict(shape=name, M=m, **{f"{k}_us": v * 1e3 for k, v in times.items()},
                             exact_cost_us=(times["exact"] - times["none"]) * 1e3,
                             hardware_cost_us=(times["hardware"] - times["none"]) * 1e3,
                             hardware_max_abs_err=(fast - ref)[:, gelu_cols].abs().max().item(),
                             exact_max_abs_err=(exact - ref)[:, gelu_cols].abs().max().item(),
                             gelu_out_absmax=ref[:, gelu_cols].abs().max().item()))
            print(rows[-1], flush=True)
    table = tabulate([[r["shape"], r["M"], f"{r['none_us']:.1f}", f"{r['exact_us']:.1f}", f"{r['hardware_us']:.1f}",
                       f"{r['exact_cost_us']:.1f}", f"{r['hardware_cost_us']:.1f}", f"{r['exact_max_abs_err']:.1e}",
                       f"{r['hardware_max_abs_err']:.1e}", f"{r['gelu_out_absmax']:.1f}"] for r in rows],
                     headers=["GEMM", "M", "no GELU us", "exact us", "hardware tanh us", "exact cost us",
                              "hardware cost us", "exact max err", "hardware max err", "GELU out absmax"],
                     tablefmt="github")
    env = environment()
    md = (f"# GELU in the int8 GEMM's epilogue\n\nGPU {env.get('gpu')} | torch {env['torch']} | "
          f"triton {env['triton']} | {env['date']}\n\n{table}\n")
    print(md)
    write_results("gelu_epilogue", dict(env=env, rows=rows), md, os.environ.get("OUT"))


if __name__ == "__main__":
    main()
