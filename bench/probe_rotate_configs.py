"""Time every rotate+quantize launch config (BM, warps, stages) at FLUX shapes, with long repetitions.

The autotuner's own timings at K = 3072 were noisier than the differences between configs; this
probe chose the configs the kernel keeps (bench/results/rotate_configs.md).

    python bench/probe_rotate_configs.py   # writes $OUT/probe_rotate_cfg.json (or ./)
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import bench_ms  # noqa: E402
from bench.probe_rotate_forms import launch_library  # noqa: E402
from convrot_compiler.hadamard import hadamard_matrix  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    h = hadamard_matrix("regular", 16, device="cuda").to(torch.bfloat16)
    rows = []
    cfgs = [(bm, w, st) for bm in (2, 4, 8, 16, 32) for w in (2, 4, 8) for st in (1, 2, 3)]
    for m, k in [(4608, 3072), (4608, 12288), (512, 3072)]:
        x = (torch.randn(m, k, device="cuda") * 2 + torch.randn(m, 1, device="cuda") * 4).to(torch.bfloat16)
        q = torch.empty(m, k, dtype=torch.int8, device="cuda")
        s = torch.empty(m, device="cuda")
        nbytes = m * k * 3 + m * 4
        for bm, w, st in cfgs:
            def launch(bm=bm, w=w, st=st):
                launch_library(x, q, s, h, bm, w, st)
            launch()
            t = bench_ms(launch, warmup_ms=50, rep_ms=200)
            rows.append(dict(M=m, K=k, BM=bm, warps=w, stages=st, gbs=nbytes / t / 1e6))
            print(rows[-1], flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "probe_rotate_cfg.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
