"""Persistent (TMA) vs one-program-per-tile int8 GEMM at the token counts of 512x512 and 768x768 FLUX
images (M = 1024, 1536, 2048): where should int_gemm switch forms (PERSISTENT_MIN_M)?

Int8 operands as the W4A4 GEMM sees them after the unpack; both forms autotuned, timed in one
process, and checked equal to each other.

    python bench/probe_persistent_crossover.py   # prints one line per case; writes crossover.json under $OUT
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import bench_ms, environment  # noqa: E402
from convrot_compiler.kernels.int_gemm import int_gemm  # noqa: E402

SHAPES = [("fused qkv 3072->9216", 3072, 9216), ("ff up 3072->12288", 3072, 12288),
          ("ff down 12288->3072", 12288, 3072), ("single fused 3072->21504", 3072, 21504)]


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    rows = []
    out = os.path.join(os.environ.get("OUT", "."), "crossover.json")
    for m in (1024, 1536, 2048):
        for name, k, n in SHAPES:
            torch.manual_seed(0)
            qx = torch.randint(-7, 8, (m, k), dtype=torch.int8, device="cuda")
            qw = torch.randint(-7, 8, (n, k), dtype=torch.int8, device="cuda")
            sx = torch.rand(m, device="cuda") * 1e-2 + 1e-3
            sw = torch.rand(n, device="cuda") * 1e-2 + 1e-3
            t, res = {}, {}
            for form, persistent in (("flat", False), ("persistent", True)):
                def run(p=persistent):
                    return int_gemm(qx, sx, qw, sw, None, False, 256, torch.bfloat16, persistent=p)
                res[form] = run()
                t[form] = bench_ms(run, warmup_ms=25, rep_ms=100)
            flop = 2 * m * n * k
            rows.append(dict(M=m, shape=name, flat_us=t["flat"] * 1e3, persistent_us=t["persistent"] * 1e3,
                             flat_tops=flop / t["flat"] / 1e9, persistent_tops=flop / t["persistent"] / 1e9,
                             persistent_speedup=t["flat"] / t["persistent"],
                             equal=bool(torch.equal(res["flat"], res["persistent"]))))
            print(f"M={m:5d} {name:26s} flat {rows[-1]['flat_tops']:5.0f} TOPS  persistent "
                  f"{rows[-1]['persistent_tops']:5.0f} TOPS  x{rows[-1]['persistent_speedup']:.2f}  "
                  f"equal={rows[-1]['equal']}", flush=True)
            with open(out, "w") as f:
                json.dump(dict(env=environment(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
