"""rotate+quantize on an sm_90 GPU: the Gluon kernel (row kept in shared memory, read once) against the
Triton kernel (two passes over the row), in one process: agreement with the reference and with each
other, and GB/s (bytes read + written) against the measured copy bandwidth, timed as CUDA-graph
replays with L2 flushed.

    python bench/probe_rotate_sm90.py [--name STEM] [--out DIR]
    python bench/probe_rotate_sm90.py --variants default,tma-store --name rotate_sm90_variants   # launch variants
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import bench_graph_ms, environment, write_results  # noqa: E402
from bench.gemm import copy_bandwidth  # noqa: E402
from convrot_compiler import ops  # noqa: E402
from convrot_compiler.hadamard import hadamard_matrix  # noqa: E402
from convrot_compiler.kernels.rotate_quant import forced_rotate_kernel, rotate_quantize  # noqa: E402
from convrot_compiler.quant import from_act_order  # noqa: E402

# (M, K1, K2, GELU): K1 = 0 means x alone ([M, K2]), else cat([x [M, K1], x2 [M, K2]]) read in place
CASES = [
    (4608, 0, 3072, False), (4608, 0, 12288, False), (4608, 3072, 12288, False), (4096, 0, 3072, False),
    (4096, 0, 12288, False), (512, 0, 3072, False), (512, 0, 12288, False), (4608, 3072, 12288, True),
    (4096, 0, 12288, True),
]


def activations(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g) * 2 + torch.randn(m, 1, device="cuda", generator=g) * 4
    return x.to(torch.bfloat16)


def run(kernel: str, x1, x2, h, bits, gelu):
    with forced_rotate_kernel(kernel):
        if x1 is None and not gelu:
            return rotate_quantize(x2, h, 256, bits)
        return rotate_quantize(x1, h, 256, bits, x2=x2, gelu_x2=gelu)


def case(m, k1, k2, gelu, bits, copy_gbs, rows):
    x1 = activations(m, k1, 1) if k1 else None
    x2 = activations(m, k2, 2)
    h = hadamard_matrix("regular", 16, device="cuda")
    # the plain-torch reference (the custom ops run the kernels on CUDA)
    q_ref, s_ref = ops.rotate_quantize_reference(ops.cat_reference(x1, x2, gelu), h, 256, bits)
    out = {}
    for kernel in ("sm90", "triton"):
        q, s = run(kernel, x1, x2, h, bits, gelu)
        d = (q.int() - q_ref.int()).abs()
        ms = bench_graph_ms(lambda: run(kernel, x1, x2, h, bits, gelu))
        out[kernel] = (q, s, d, ms)
    k = k1 + k2
    nbytes = m * k * 3 + m * 4
    qs, ss, ds, ms_s = out["sm90"]
    qt, st, dt, ms_t = out["triton"]
    rows.append(dict(
        M=m, K=k, cat=bool(k1), gelu=gelu, bits=bits,
        sm90_us=ms_s * 1e3, triton_us=ms_t * 1e3,
        sm90_gbs=nbytes / ms_s / 1e6, triton_gbs=nbytes / ms_t / 1e6,
        sm90_frac_copy=nbytes / ms_s / 1e6 / copy_gbs, triton_frac_copy=nbytes / ms_t / 1e6 / copy_gbs,
        speedup=ms_t / ms_s,
        sm90_scale_rel=((ss - s_ref).abs() / s_ref.abs().clamp_min(1e-30)).max().item(),
        sm90_int_max=ds.max().item(), sm90_int_frac=(ds > 0).float().mean().item(),
        triton_int_frac=(dt > 0).float().mean().item(),
        sm90_vs_triton_frac=(qs.int() != qt.int()).float().mean().item(),
    ))


VARIANTS = {"default": {}, "keep": {"keep": True}, "no-keep": {"keep": False},
            "keep-one-box": {"keep": True, "one_box": True}, "keep-box-per-step": {"keep": True, "one_box": False},
            "mma-order": {"order": "mma"}, "natural-order": {"order": "natural"}}


def variant_case(m, k1, k2, gelu, bits, copy_gbs, rows, names):
    """The Gluon kernel under launch variants (VARIANTS: rotate_quantize_sm90's keyword arguments): time,
    and bit-equality with the default launch."""
    from convrot_compiler.kernels.rotate_quant_sm90 import rotate_quantize_sm90

    x1 = activations(m, k1, 1) if k1 else None
    x2 = activations(m, k2, 2)
    h = hadamard_matrix("regular", 16, device="cuda")
    first, second = (x1, x2) if x1 is not None else (x2, None)
    q0, s0 = rotate_quantize_sm90(first, h, bits, x2=second, gelu_x2=gelu)
    k = k1 + k2
    nbytes = m * k * 3 + m * 4
    for name in names:
        kw = VARIANTS[name]
        if kw.get("keep") and -(-k // 1024) > 4:  # more than 4 steps of 4 groups: nothing to keep
            continue
        if kw.get("one_box") and (k1 or k > 4096):  # one box: a single tensor of at most 16 groups
            continue
        torch.full((1 << 28,), 0x7F, dtype=torch.uint8, device="cuda")  # poison what the allocator hands out next
        q, s = rotate_quantize_sm90(first, h, bits, x2=second, gelu_x2=gelu, **kw)
        q = from_act_order(q, kw.get("order", "natural"), 256)  # compared in channel order
        ms = bench_graph_ms(lambda: rotate_quantize_sm90(first, h, bits, x2=second, gelu_x2=gelu, **kw))
        rows.append(dict(M=m, K=k, cat=bool(k1), gelu=gelu, bits=bits, variant=name, us=ms * 1e3, gbs=nbytes / ms / 1e6,
                         frac_copy=nbytes / ms / 1e6 / copy_gbs,
                         equal_to_default=bool(torch.equal(q, q0) and torch.equal(s, s0))))


def exactness_checks() -> list[str]:
    """Integer-valued rows (every rotation exact in float32 whatever the order), zero and non-finite rows,
    poisoned outputs, fp8 containers, M = 1: the Gluon kernel against the reference, bit for bit."""
    failures = []
    h = hadamard_matrix("regular", 16, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(5)
    for m, k, bits in ((1, 3072, 4), (37, 1280, 4), (300, 15360, 8), (5, 512, 4)):
        x = torch.randint(-6, 7, (m, k), device="cuda", generator=g).to(torch.bfloat16)
        x[min(3, m - 1)] = 0
        if m > 4:
            x[1, 7] = float("nan")
            x[2, 9] = float("inf")
        # on the CPU: torch's CUDA float32 matmul was not exact on such rows (tests/test_kernels_gpu.py)
        q_ref, s_ref = (t.cuda() for t in ops.rotate_quantize_reference(x.cpu(), h.cpu(), 256, bits))
        torch.full((1 << 28,), 0x7F, dtype=torch.uint8, device="cuda")  # poison what the allocator hands out next
        with forced_rotate_kernel("sm90"):
            q, s = rotate_quantize(x, h, 256, bits)
        if not (torch.equal(q, q_ref) and torch.equal(s.nan_to_num(-1.0), s_ref.nan_to_num(-1.0))):
            failures.append(f"exact m={m} k={k} bits={bits}: {(q != q_ref).sum().item()} values, "
                            f"{(s.nan_to_num(-1) != s_ref.nan_to_num(-1)).sum().item()} scales differ")
    x = torch.randint(-6, 7, (64, 3072), device="cuda", generator=g).to(torch.bfloat16)
    q_ref, s_ref = (t.cuda() for t in ops.rotate_quantize_reference(x.cpu(), h.cpu(), 256, 4))
    with forced_rotate_kernel("sm90"):
        q8, s8 = rotate_quantize(x, h, 256, 4, torch.float8_e4m3fn)
    if not (torch.equal(q8.float(), q_ref.float()) and torch.equal(s8, s_ref)):
        failures.append("fp8 container differs from the int8 reference")
    return failures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="rotate_sm90")
    p.add_argument("--out", default=None)
    p.add_argument("--variants", default=None,
                   help=f"comma-separated launch variants of the Gluon kernel ({', '.join(VARIANTS)}): time each "
                        "instead of comparing with the Triton kernel")
    args = p.parse_args()
    env = environment()
    if args.variants:
        copy_gbs = copy_bandwidth(bench_graph_ms)
        rows = []
        names = args.variants.split(",")
        for m, k1, k2, gelu in CASES + [(37, 0, 3072, False), (301, 3072, 12288, False), (64, 0, 1280, False)]:
            variant_case(m, k1, k2, gelu, 4, copy_gbs, rows, names)
        table = tabulate([[r["M"], r["K"], "cat" if r["cat"] else "", "gelu" if r["gelu"] else "", r["variant"],
                           f"{r['us']:.1f}", f"{r['gbs']:.0f} ({r['frac_copy']:.0%})", r["equal_to_default"]]
                          for r in rows],
                         headers=["M", "K", "", "", "variant", "us", "GB/s (copy)", "bit-equal to default"],
                         tablefmt="github")
        head = (f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | {env['date']} | copy {copy_gbs:.0f} "
                "GB/s (read+write) | CUDA-graph replays, L2 flushed, median | bits 4\n")
        print(table)
        print("written:", *write_results(args.name, dict(env=env, copy_gbs=copy_gbs, rows=rows),
                                         f"# rotate+quantize: launch variants of the Gluon kernel\n\n{head}\n{table}\n",
                                         args.out))
        sys.exit(0 if all(r["equal_to_default"] for r in rows) else 1)
    failures = exactness_checks()
    print("exactness:", "ok" if not failures else failures, flush=True)
    copy_gbs = copy_bandwidth(bench_graph_ms)
    rows = []
    for m, k1, k2, gelu in CASES:
        for bits in (4, 8):
            case(m, k1, k2, gelu, bits, copy_gbs, rows)
            r = rows[-1]
            print(f"M={m} K={k1}+{k2} gelu={gelu} bits={bits}: sm90 {r['sm90_us']:.1f} us ({r['sm90_frac_copy']:.0%}) "
                  f"triton {r['triton_us']:.1f} us ({r['triton_frac_copy']:.0%})", flush=True)
    table = tabulate(
        [[r["M"], r["K"], "cat" if r["cat"] else "", "gelu" if r["gelu"] else "", r["bits"], f"{r['sm90_us']:.1f}",
          f"{r['sm90_gbs']:.0f} ({r['sm90_frac_copy']:.0%})", f"{r['triton_us']:.1f}",
          f"{r['triton_gbs']:.0f} ({r['triton_frac_copy']:.0%})", f"{r['speedup']:.2f}",
          f"{r['sm90_scale_rel']:.1e}", f"{r['sm90_int_max']} / {r['sm90_int_frac']:.1e}", f"{r['triton_int_frac']:.1e}",
          f"{r['sm90_vs_triton_frac']:.1e}"] for r in rows],
        headers=["M", "K", "", "", "bits", "sm90 us", "sm90 GB/s (copy)", "triton us", "triton GB/s (copy)",
                 "speedup", "scale rel err", "int max / frac off ref", "triton frac off ref", "sm90 != triton"],
        tablefmt="github")
    head = (f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | {env['date']} | copy {copy_gbs:.0f} GB/s "
            f"(read+write) | CUDA-graph replays, L2 flushed, median\n\nexactness checks: "
            f"{'passed' if not failures else failures}\n")
    print(table)
    print("written:", *write_results(args.name, dict(env=env, copy_gbs=copy_gbs, rows=rows, exactness_failures=failures),
                                     f"# rotate+quantize: sm_90 Gluon kernel vs Triton kernel\n\n{head}\n{table}\n", args.out))
    # with the GELU the reference takes torch's exact tanh, the kernels the hardware's (both agree, last column)
    off = [(r["sm90_vs_triton_frac"] > 0) if r["gelu"] else (r["sm90_int_max"] > 1 or r["sm90_int_frac"] > 1e-2)
           for r in rows]
    if failures or any(off):
        sys.exit(1)


if __name__ == "__main__":
    main()
