"""GPTQ over every W4A4 linear of a FLUX.1-dev-size transformer: time per weight shape and in all.

Each distinct weight shape of the plan's activation-quantized linears is quantized once by GPTQ in ConvRot's
rotated basis (compiler/weights.py's path: the Hessian carried through the group Hadamard, one scale per
output channel), timed with the device synchronised, and the total is each shape's time times its count:
the linears of one shape do the same work. The Hessians are second moments of synthetic DiT-like
activations (a low-rank subspace, channel outliers), in diagonal blocks of at most 3072 inputs as a
calibration holds them. Correctness in the same run: each shape's output error on held-out activations of
the same distribution through the W4A4 linear (activations quantized too), GPTQ's against
round-to-nearest's (GPTQ must not be worse).

    python benchmarks/gptq.py [--config flux-dev] [--name STEM] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import torch

from convrot_compiler.numerics.error import relative_error
from convrot_compiler.numerics.gptq import gptq_quantizer
from convrot_compiler.numerics.pca import block_shape
from convrot_compiler.numerics.quant import quantize_weight, reference_linear
from convrot_compiler.numerics.rotations import GroupHadamardRotation
from convrot_compiler.plans import decide_linears
from convrot_compiler.tools.bench_model import environment, write_results
from convrot_compiler.tools.models import build_flux


def dit_like(m: int, k: int, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    u = torch.randn(k, 64, device=device, generator=g)
    x = (torch.randn(m, 64, device=device, generator=g) * 4) @ u.T / 8 + 0.5 * torch.randn(m, k, device=device,
                                                                                            generator=g)
    x[:, :16] *= 10
    return x


def second_moment(x: torch.Tensor) -> torch.Tensor:
    nb, b = block_shape(x.shape[1])
    xb = x.reshape(x.shape[0], nb, b).transpose(0, 1)
    return xb.transpose(1, 2) @ xb / x.shape[0]


def bench_shape(n: int, k: int, device: str) -> dict:
    x, held_out = dit_like(4096, k, device, seed=k), dit_like(1024, k, device, seed=k + 1)
    w = (torch.randn(n, k, device=device, generator=torch.Generator(device=device).manual_seed(n)) * 0.02).bfloat16()
    rot = GroupHadamardRotation("regular", 256)
    quantizer = gptq_quantizer(second_moment(x), rot)
    torch.cuda.synchronize()
    start = time.perf_counter()
    qw = quantize_weight(w, "w4a4", rot, weight_quantizer=quantizer)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    ref = held_out @ w.float().T
    rtn = quantize_weight(w, "w4a4", rot)
    err = {name: relative_error(reference_linear(held_out.bfloat16(), q), ref) for name, q in
           (("gptq", qw), ("rtn", rtn))}
    return {"n": n, "k": k, "seconds": seconds, "err_gptq": err["gptq"], "err_rtn": err["rtn"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="flux-dev")
    p.add_argument("--name", default="gptq")
    p.add_argument("--out", help="result folder (default $OUT if set, else ./convrot-out/bench)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    from tabulate import tabulate

    model = build_flux(args.config, device="meta")
    counts = Counter((d.out_features, d.in_features) for d in decide_linears(model, "w4a4") if d.precision == "w4a4")
    rows, total = [], 0.0
    for (n, k), count in sorted(counts.items()):
        r = bench_shape(n, k, "cuda")
        r["count"] = count
        total += r["seconds"] * count
        rows.append(r)
        print(r, flush=True)
    bad = [r for r in rows if r["err_gptq"] > r["err_rtn"] * 1.001]
    env = environment()
    table = tabulate([[f"{r['k']}->{r['n']}", r["count"], f"{r['seconds']:.2f}", f"{r['seconds'] * r['count']:.0f}",
                       f"{r['err_gptq']:.4f}", f"{r['err_rtn']:.4f}"] for r in rows],
                     headers=["in->out", "linears", "s each", "s all", "error GPTQ", "error RTN"], tablefmt="github")
    md = (f"# GPTQ over the {args.config} W4A4 linears (ConvRot basis, one scale per output channel)\n\n"
          f"{env.get('gpu')}, torch {env['torch']}, triton {env.get('triton')}, {env['date']}. Synthetic DiT-like "
          f"Hessians; error on held-out activations.\n\n{table}\n\n"
          f"**All {sum(counts.values())} linears: {total / 60:.1f} min** (each shape's time x its count).\n")
    print(md)
    print("written:", *write_results(args.name, {"env": env, "total_s": total, "shapes": rows}, md, args.out))
    if bad:
        sys.exit(f"GPTQ worse than round-to-nearest on {[(r['k'], r['n']) for r in bad]}")


if __name__ == "__main__":
    main()
