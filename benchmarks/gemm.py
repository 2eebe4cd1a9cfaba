"""GEMM-level benchmark at FLUX.1-dev token-GEMM shapes (issue: Triton kernels).

For every shape, in one process: cuBLAS bf16 (torch.mm), torch._scaled_mm fp8
row-wise, torch._int_mm int8, our W4A4 and W8A8 GEMMs, the fused
rotate+quantize alone (GB/s, against measured copy bandwidth), and
rotate+quantize+GEMM together. W4A4 "GEMM" is what the compiled model runs (ops/dispatch.py): on an sm_90
GPU the packed GEMM (kernels/sm90/packed_gemm.py, weights split in registers, no
unpack), elsewhere int4 weights unpacked to a transient int8 buffer, then Triton's int8
GEMM (the unpack time included); "unpack alone us" times that unpack kernel by
itself, whichever path the GEMM took. ``--schemes`` adds Triton's int8 GEMM in its one-program-per-tile
(``-flat``) and persistent TMA-descriptor (``-persistent``) forms (kernels/triton/int_gemm.py); "diff vs
default" is their largest difference from the default GEMM on the same operands (list that first). Each of ours is checked against the reference in the same run. Also the W4A16
weight-only GEMM at M = 1, 4 and 8: the op as the compiler calls it (on sm_90 the tensor-core kernel on
tile-layout weights) and the CUDA-core kernel on group-layout weights; and the W8A16 op (int8 weights, groups
of 256) at the same shapes, at M = 1 beside the fastest plain read of its weights and of cuBLAS's
(benchmarks/read_ceiling.py), back to back: the speedup over cuBLAS a kernel reading at that speed would reach.

Every time is the median of CUDA-graph replays with L2 flushed between them, as the model runs its
forward (benchmarks/timing.py: bench_graph_ms); ``--eager`` times eager calls instead, which adds each
wrapper's host time wherever it is longer than the kernel. rotate+quantize and the weight-only GEMMs are also
timed back to back (8 launches on distinct inputs or weights per replay, bench_graph_per_call_ms): a single
replay costs ~5 us by itself, a quarter of the rotate+quantize kernel at K = 3072 (measured on an H100). W4A4/W8A8 run in the channel
order the compiler picks for the GPU (ops/dispatch.py, act_order_for; "mma" on sm_90), weights prepared to match.

    python benchmarks/gemm.py [--quick] [--no-rotate] [--w4a16-only] [--eager] [--schemes w4a4,w4a4-flat,...] [--name STEM] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from read_ceiling import read_ceiling_us  # benchmarks/read_ceiling.py
from timing import bench_graph_ms, bench_graph_per_call_ms, bench_ms  # benchmarks/timing.py

from convrot_compiler.kernels.triton.int_gemm import int_gemm, unpack_int4
from convrot_compiler.kernels.triton.weight_only import w4a16_gemm, w8a16_gemm
from convrot_compiler.numerics.quant import quantize_weight
from convrot_compiler.numerics.rotations import GroupHadamardRotation
from convrot_compiler.ops import custom_ops, dispatch
from convrot_compiler.ops.dispatch import rotate_quantize
from convrot_compiler.tools.baselines import quantize_rowwise_fp8
from convrot_compiler.tools.bench_model import environment, write_results
from convrot_compiler.tools.models import relative_error

SHAPES = [  # (name, K, N)
    ("qkv/out 3072->3072", 3072, 3072),
    ("fused qkv 3072->9216", 3072, 9216),
    ("ff up 3072->12288", 3072, 12288),
    ("ff down 12288->3072", 12288, 3072),
    ("single proj_out 15360->3072", 15360, 3072),
]
# scheme -> (activation bits, Triton's persistent TMA GEMM: None = the compiled model's GEMM, ops/dispatch.py)
SCHEMES = {
    "w4a4": (4, None),
    "w4a4-flat": (4, False),
    "w4a4-persistent": (4, True),
    "w8a8": (8, None),
    "w8a8-flat": (8, False),
    "w8a8-persistent": (8, True),
}
SKINNY = [("norm1.linear 3072->18432", 3072, 18432), ("single norm 3072->9216", 3072, 9216),
          ("norm_out 3072->6144", 3072, 6144)]


def copy_bandwidth(timed_ms) -> float:
    x = torch.randn(256 * 2**20 // 4, device="cuda")
    y = torch.empty_like(x)
    ms = timed_ms(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / ms / 1e6  # GB/s, read + write


def fp8_rowwise(x: torch.Tensor, w: torch.Tensor):
    xq, sx = quantize_rowwise_fp8(x)
    wq, sw = quantize_rowwise_fp8(w)
    return xq, wq.T, sx, sw.T


def bench_shape(name, m, k, n, copy_gbs, rows, schemes, timed_ms):
    torch.manual_seed(0)
    x = (torch.randn(m, k, device="cuda") + torch.randn(m, 1, device="cuda") * 2).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    flop = 2 * m * n * k
    ref = x.float() @ w.float().T

    t_bf16 = timed_ms(lambda: torch.mm(x, w.T))
    xq, wq, sx, sw = fp8_rowwise(x, w)
    t_fp8 = timed_ms(lambda: torch._scaled_mm(xq, wq, scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16))
    a8 = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
    b8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda").T
    t_int = timed_ms(lambda: torch._int_mm(a8, b8))

    rot = GroupHadamardRotation("regular", 256)
    h16 = rot.kernel_matrix().to("cuda", torch.bfloat16)  # the model passes it in the activations dtype
    needed = {SCHEMES[scheme][0] for scheme in schemes}
    order = dispatch.act_order_for(x.device, x.dtype, 256, True)  # as the compiler prepares them for this GPU
    weights = {bits: quantize_weight(w, "w4a4" if bits == 4 else "w8a8", rot, act_order=order) for bits in needed}
    default_fp32_out = {}
    for scheme in schemes:
        bits, persistent = SCHEMES[scheme]
        qw = weights[bits]
        qa, sa = rotate_quantize(x, h16, 256, bits, order=order)
        packed = bits == 4

        def gemm(qa, sa, out_dtype=torch.bfloat16, qw=qw, packed=packed, persistent=persistent):
            if persistent is None:
                return dispatch.int_gemm(qa, sa, [qw.values], [qw.scale], [None], packed, 256, out_dtype)
            return int_gemm(qa, sa, qw.values, qw.scale, None, packed, 256, out_dtype, persistent=persistent,
                            warp_specialize=persistent)

        # correctness: GEMM vs reference on the same quantized operands; end to end vs float;
        # each form against the default on the same operands (equal: the same integers, the same epilogue)
        g_ref = custom_ops.int_gemm_reference(qa, sa, qw.values, qw.scale, None, packed, 256, torch.float32)
        g_out = gemm(qa, sa)
        g32 = gemm(qa, sa, torch.float32)
        if persistent is None:
            default_fp32_out[bits] = g32
        base = default_fp32_out.get(bits)
        vs_default = float("nan") if base is None else ((g32 - base).abs().max() / base.abs().max()).item()
        gemm_err = relative_error(g_out, g_ref)
        q_ref, s_ref = custom_ops.rotate_quantize_reference(x, h16, 256, bits, order)
        mismatch = ((qa.float() - q_ref.float()).abs() > 0).float().mean().item()
        e2e_err = relative_error(g_out, ref)

        t_gemm = timed_ms(lambda: gemm(qa, sa))
        t_unpack = timed_ms(lambda: unpack_int4(qw.values, 256)) if packed else 0.0
        t_rq = timed_ms(lambda: rotate_quantize(x, h16, 256, bits, order=order))
        t_all = timed_ms(lambda: gemm(*rotate_quantize(x, h16, 256, bits, order=order)))
        rq_bytes = m * k * 2 + qa.numel() + m * 4
        rows.append(dict(
            shape=name, M=m, K=k, N=n, scheme=scheme,
            bf16_us=t_bf16 * 1e3, fp8_us=t_fp8 * 1e3, int_mm_us=t_int * 1e3,
            gemm_us=t_gemm * 1e3, gemm_tops=flop / t_gemm / 1e9, unpack_us=t_unpack * 1e3,
            gemm_vs_bf16=t_bf16 / t_gemm, gemm_vs_fp8=t_fp8 / t_gemm, gemm_vs_int_mm=t_int / t_gemm,
            rq_us=t_rq * 1e3, rq_gbs=rq_bytes / t_rq / 1e6, rq_frac_copy=rq_bytes / t_rq / 1e6 / copy_gbs,
            fused_us=t_all * 1e3, fused_tops=flop / t_all / 1e9, fused_vs_bf16=t_bf16 / t_all,
            gemm_rel_err_vs_ref=gemm_err, rq_int_mismatch=mismatch, rel_err_vs_float=e2e_err,
            max_diff_vs_default=vs_default,
            bf16_tflops=flop / t_bf16 / 1e9, fp8_tflops=flop / t_fp8 / 1e9, int_mm_tops=flop / t_int / 1e9,
        ))


W8_GROUPS_AT_M1 = (64, None)  # W8A16 also timed in groups of 64 and per channel (None) at M = 1, back to back
BACK_TO_BACK = 8  # launches per graph replay in the back-to-back timings (rotate+quantize, weight-only GEMMs)


def bench_rotate(m, k, bits, copy_gbs, rows, timed_ms, back_to_back: bool):
    """rotate+quantize alone, in the channel order the compiler picks for this GPU (dispatch.act_order_for): GB/s
    (bytes read + written) and agreement with the reference; with ``back_to_back`` also per launch of
    BACK_TO_BACK launches on distinct inputs in one graph (bench_graph_per_call_ms: without the cost of a
    replay and of the flush's dirty L2, which a single replay of a kernel this short cannot hide)."""
    torch.manual_seed(0)
    x = (torch.randn(m, k, device="cuda") + torch.randn(m, 1, device="cuda") * 2).to(torch.bfloat16)
    h16 = GroupHadamardRotation("regular", 256).kernel_matrix().to("cuda", torch.bfloat16)
    order = dispatch.act_order_for(x.device, x.dtype, 256, True)
    q_ref, s_ref = custom_ops.rotate_quantize_reference(x, h16, 256, bits, order)
    nbytes = m * k * 2 + q_ref.numel() + m * 4
    q, s = rotate_quantize(x, h16, 256, bits, order=order)
    gbs = nbytes / timed_ms(lambda: rotate_quantize(x, h16, 256, bits, order=order)) / 1e6
    row = dict(M=m, K=k, bits=bits, order=order, gbs=gbs, frac_copy=gbs / copy_gbs,
               int_mismatch=(q != q_ref).float().mean().item())
    if back_to_back:
        xs = [x] + [x.roll(i, 0) for i in range(1, BACK_TO_BACK)]
        ms = bench_graph_per_call_ms([lambda xi=xi: rotate_quantize(xi, h16, 256, bits, order=order) for xi in xs])
        row.update(b2b_gbs=nbytes / ms / 1e6, b2b_frac_copy=nbytes / ms / 1e6 / copy_gbs)
    rows.append(row)


def bench_skinny(name, m, k, n, rows, timed_ms, back_to_back: bool):
    """The W4A16 and W8A16 ops as the compiler prepares and calls them (on sm_90 the tensor-core kernels on
    tile-layout weights, kernels/sm90/weight_only.py), and the CUDA-core kernels on the group layout
    (kernels/triton/weight_only.py); groups of 256 inputs. With ``back_to_back`` cuBLAS and the two ops as the
    compiler calls them are also timed per launch of BACK_TO_BACK launches on distinct weights in one graph, as
    the model's blocks call them: a single replay adds ~5 us and the write-back of the ~50 MB of L2 the flush
    left dirty, which at 3072 -> 18432 is about as much traffic as the int8 weights themselves."""
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    layout = dispatch.weight_only_layout(w, 256)
    qw = quantize_weight(w, "w4a16", None, group_size=256, layout=layout)
    groups = quantize_weight(w, "w4a16", None, group_size=256)
    ref = custom_ops.weight_only_gemm(x.float(), groups.values, groups.scale, None, 256, 4)
    out = torch.ops.convrot.weight_only_gemm(x, qw.values, qw.scale, None, 256, 4)
    out_cc = w4a16_gemm(x, groups.values, groups.scale, None, 256)
    t_bf16 = timed_ms(lambda: torch.mm(x, w.T))
    t_ours = timed_ms(lambda: torch.ops.convrot.weight_only_gemm(x, qw.values, qw.scale, None, 256, 4))
    t_cc = timed_ms(lambda: w4a16_gemm(x, groups.values, groups.scale, None, 256))
    q8 = quantize_weight(w, "w8a16", None, group_size=256, layout=layout)
    g8 = quantize_weight(w, "w8a16", None, group_size=256)
    ref8 = custom_ops.weight_only_gemm(x.float(), g8.values, g8.scale, None, 256, 8)
    out8 = torch.ops.convrot.weight_only_gemm(x, q8.values, q8.scale, None, 256, 8)
    t_w8 = timed_ms(lambda: torch.ops.convrot.weight_only_gemm(x, q8.values, q8.scale, None, 256, 8))
    out8_cc = w8a16_gemm(x, g8.values, g8.scale, None, 256)
    t_w8_cc = timed_ms(lambda: w8a16_gemm(x, g8.values, g8.scale, None, 256))
    wbytes = qw.values.numel() * qw.values.element_size() + qw.scale.numel() * 4
    if back_to_back:
        ws = [w] + [w.roll(i, 0) for i in range(1, BACK_TO_BACK)]
        q4s = [quantize_weight(wi, "w4a16", None, group_size=256, layout=layout) for wi in ws]
        q8s = [quantize_weight(wi, "w8a16", None, group_size=256, layout=layout) for wi in ws]
        b2b_bf16 = bench_graph_per_call_ms([lambda wi=wi: torch.mm(x, wi.T) for wi in ws])
        b2b_w4 = bench_graph_per_call_ms([lambda qi=qi: torch.ops.convrot.weight_only_gemm(x, qi.values, qi.scale, None,
                                                                                            256, 4) for qi in q4s])
        b2b_w8 = bench_graph_per_call_ms([lambda qi=qi: torch.ops.convrot.weight_only_gemm(x, qi.values, qi.scale, None,
                                                                                            256, 8) for qi in q8s])
        if m == 1:  # the read ceilings depend on the bytes only
            read_w8, read_w8_shape = read_ceiling_us([qi.values for qi in q8s])
            read_bf16, _ = read_ceiling_us(ws)
            b2b_w8_groups = {}
            for group in W8_GROUPS_AT_M1:
                g = group or k
                qgs = [quantize_weight(wi, "w8a16", None, group_size=g, layout=layout) for wi in ws]
                b2b_w8_groups[group] = bench_graph_per_call_ms(
                    [lambda qi=qi, g=g: torch.ops.convrot.weight_only_gemm(x, qi.values, qi.scale, None, g, 8)
                     for qi in qgs])
                del qgs
        del ws, q4s, q8s
    rows.append(dict(shape=name, M=m, K=k, N=n, layout=layout, bf16_us=t_bf16 * 1e3, w4a16_us=t_ours * 1e3,
                     speedup=t_bf16 / t_ours, cuda_core_us=t_cc * 1e3, cuda_core_speedup=t_bf16 / t_cc,
                     w4a16_gbs=wbytes / t_ours / 1e6, bf16_gbs=n * k * 2 / t_bf16 / 1e6,
                     rel_err_vs_ref=relative_error(out, ref), cuda_core_rel_err_vs_ref=relative_error(out_cc, ref),
                     rel_err_vs_bf16=relative_error(out, x.float() @ w.float().T),
                     w8a16_us=t_w8 * 1e3, w8a16_speedup=t_bf16 / t_w8, w8a16_rel_err_vs_ref=relative_error(out8, ref8),
                     w8a16_rel_err_vs_bf16=relative_error(out8, x.float() @ w.float().T),
                     w8a16_gbs=(q8.values.numel() * q8.values.element_size() + q8.scale.numel() * 4) / t_w8 / 1e6,
                     w8a16_cuda_core_us=t_w8_cc * 1e3, w8a16_cuda_core_speedup=t_bf16 / t_w8_cc,
                     w8a16_cuda_core_rel_err_vs_ref=relative_error(out8_cc, ref8)))
    if back_to_back:
        rows[-1].update(b2b_bf16_us=b2b_bf16 * 1e3, b2b_w4a16_us=b2b_w4 * 1e3, b2b_w4a16_speedup=b2b_bf16 / b2b_w4,
                        b2b_w8a16_us=b2b_w8 * 1e3, b2b_w8a16_speedup=b2b_bf16 / b2b_w8)
        if m == 1:
            rows[-1].update(read_w8_us=read_w8, read_w8_shape=str(read_w8_shape), read_bf16_us=read_bf16,
                            w8a16_of_read=read_w8 / (b2b_w8 * 1e3), w8a16_speedup_bound=b2b_bf16 * 1e3 / read_w8,
                            b2b_w8a16_groups_us={g or "channel": t * 1e3 for g, t in b2b_w8_groups.items()})


def skinny_table_of(skinny: list[dict]) -> str:
    from tabulate import tabulate

    return tabulate(
        [[r["shape"], r["M"], r["layout"], f"{r['bf16_us']:.1f}", f"{r['w4a16_us']:.1f}", f"{r['speedup']:.2f}",
          f"{r['w4a16_gbs']:.0f}", f"{r['rel_err_vs_ref']:.1e}", f"{r['cuda_core_us']:.1f}",
          f"{r['cuda_core_speedup']:.2f}", f"{r['cuda_core_rel_err_vs_ref']:.1e}", f"{r['w8a16_us']:.1f}",
          f"{r['w8a16_speedup']:.2f}", f"{r['w8a16_gbs']:.0f}", f"{r['w8a16_rel_err_vs_ref']:.1e}",
          f"{r['w8a16_cuda_core_us']:.1f}", f"{r['w8a16_cuda_core_speedup']:.2f}",
          *(f"{r[key]:.{2 if key.endswith('speedup') else 1}f}" if key in r else "" for key in _B2B_KEYS)]
         for r in skinny],
        headers=["shape", "M", "layout", "bf16 us", "w4a16 us", "x bf16", "GB/s", "err vs ref", "CUDA-core us",
                 "CUDA-core x bf16", "CUDA-core err", "w8a16 us", "w8a16 x bf16", "w8a16 GB/s", "w8a16 err",
                 "w8a16 CUDA-core us", "w8a16 CUDA-core x bf16", f"back-to-back x{BACK_TO_BACK}: bf16 us", "w4a16 us",
                 "w4a16 x bf16", "w8a16 us", "w8a16 x bf16"], tablefmt="github")


def ceiling_table_of(skinny: list[dict]) -> str:
    """W8A16 at M = 1 against the fastest plain read of its weights (benchmarks/read_ceiling.py), back to back: the
    speedup over cuBLAS that a kernel reading those bytes at that speed would reach."""
    from tabulate import tabulate

    return tabulate(
        [[r["shape"], f"{r['b2b_bf16_us']:.1f}", f"{r['read_bf16_us']:.1f}",
          f"{r['read_bf16_us'] / r['b2b_bf16_us']:.0%}", f"{r['b2b_w8a16_us']:.1f}", f"{r['read_w8_us']:.1f}",
          f"{r['w8a16_of_read']:.0%}", f"{r['b2b_w8a16_speedup']:.2f}", f"{r['w8a16_speedup_bound']:.2f}",
          *(f"{r['b2b_bf16_us'] / r['b2b_w8a16_groups_us'][g or 'channel']:.2f}" for g in W8_GROUPS_AT_M1),
          r["read_w8_shape"]] for r in skinny if "read_w8_us" in r],
        headers=["shape (M = 1, back to back)", "cuBLAS bf16 us", "read of bf16 weights us", "cuBLAS of read",
                 "w8a16 us, groups of 256", "read of int8 weights us", "w8a16 of read", "w8a16 x bf16", "read-bound x bf16",
                 *(f"w8a16 x bf16, {f'groups of {g}' if g else 'per channel'}" for g in W8_GROUPS_AT_M1),
                 "fastest read"], tablefmt="github")


_B2B_KEYS = ("b2b_bf16_us", "b2b_w4a16_us", "b2b_w4a16_speedup", "b2b_w8a16_us", "b2b_w8a16_speedup")


def geomean(xs):
    return math.exp(sum(math.log(v) for v in xs) / len(xs))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rotate-only", action="store_true", help="only the rotate+quantize kernel")
    p.add_argument("--quick", action="store_true",
                   help="only the first shape (with --w4a16-only: 3072 -> 18432 at M = 1)")
    p.add_argument("--no-rotate", action="store_true", help="skip the rotate+quantize-alone table")
    p.add_argument("--w4a16-only", action="store_true", help="only the weight-only (W4A16, W8A16) table")
    p.add_argument("--schemes", default="w4a4,w8a8",
                   help=f"comma-separated subset of {', '.join(SCHEMES)} (default: w4a4,w8a8, what the compiler uses)")
    p.add_argument("--eager", action="store_true",
                   help="time eager calls instead of CUDA-graph replays (includes each wrapper's host time "
                        "wherever it is longer than the kernel)")
    p.add_argument("--name", help="result file stem (default: gemm, or rotate with --rotate-only)")
    p.add_argument("--out", help="result folder (default $OUT if set, else ./convrot-out/bench)")
    args = p.parse_args()
    # timed_ms(fn): median ms of fn, replayed from a CUDA graph as the model runs it, or called eagerly
    timed_ms = bench_ms if args.eager else bench_graph_ms
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gemm.py needs a CUDA GPU")
    from tabulate import tabulate
    from tqdm.auto import tqdm

    env = environment()
    copy_gbs = copy_bandwidth(timed_ms)
    timing = "eager calls" if args.eager else "CUDA-graph replays"
    head = (f"GPU {env.get('gpu')} | torch {env['torch']} | triton {env['triton']} | {env['date']} | "
            f"copy bandwidth {copy_gbs:.0f} GB/s (read+write) | timed: {timing}, median, L2 flushed\n")
    rot_rows = []
    rot_jobs = [] if args.no_rotate or args.w4a16_only else [(m, k, b) for m in (4608, 512) for k in (3072, 12288, 15360) for b in (4, 8)]
    for m, k, bits in tqdm(rot_jobs,
                           desc="rotate+quantize"):
        bench_rotate(m, k, bits, copy_gbs, rot_rows, timed_ms, back_to_back=not args.eager)
    rot_table = tabulate(
        [[r["M"], r["K"], r["bits"], r["order"], f"{r['gbs']:.0f}", f"{r['frac_copy']:.0%}",
          f"{r['b2b_gbs']:.0f}" if "b2b_gbs" in r else "", f"{r['b2b_frac_copy']:.0%}" if "b2b_gbs" in r else "",
          f"{r['int_mismatch']:.1e}"] for r in rot_rows],
        headers=["M", "K", "bits", "order", "rot+q GB/s", "of copy", f"back-to-back x{BACK_TO_BACK} GB/s", "of copy",
                 "int mismatch"], tablefmt="github")
    if args.w4a16_only:
        skinny = []
        for name, k, n in SKINNY[:1] if args.quick else SKINNY:
            for m in (1,) if args.quick else (1, 4, 8):
                bench_skinny(name, m, k, n, skinny, timed_ms, back_to_back=not args.eager)
        md = (f"# Weight-only GEMM (W4A16, W8A16)\n\n{head}\n{skinny_table_of(skinny)}\n\n"
              f"W8A16 against the fastest plain read of its weights:\n\n{ceiling_table_of(skinny)}\n")
        print(md)
        print("written:", *write_results(args.name or "gemm_weight_only", dict(env=env, timing=timing, skinny=skinny), md, args.out))
        return
    if args.rotate_only:
        md = f"# rotate+quantize kernels\n\n{head}\n{rot_table}\n"
        print(md)
        print("written:", *write_results(args.name or "rotate",
                                         dict(env=env, timing=timing, copy_gbs=copy_gbs, rows=rot_rows), md, args.out))
        return
    schemes = args.schemes.split(",")
    if unknown := set(schemes) - set(SCHEMES):
        sys.exit(f"unknown schemes {sorted(unknown)}; choose from {', '.join(SCHEMES)}")
    rows, skinny = [], []
    shapes = SHAPES[:1] if args.quick else SHAPES
    jobs = [(s, m) for m in (4608, 512) for s in shapes]
    for (name, k, n), m in tqdm(jobs, desc="GEMM shapes"):
        bench_shape(name, m, k, n, copy_gbs, rows, schemes, timed_ms)
    for name, k, n in SKINNY:
        for m in (1, 4, 8):
            bench_skinny(name, m, k, n, skinny, timed_ms, back_to_back=not args.eager)

    table = tabulate(
        [[r["shape"], r["M"], r["scheme"], f"{r['gemm_tops']:.0f}",
          f"{r['unpack_us']:.1f}", f"{r['gemm_vs_bf16']:.2f}",
          f"{r['gemm_vs_fp8']:.2f}", f"{r['gemm_vs_int_mm']:.2f}", f"{r['rq_gbs']:.0f} ({r['rq_frac_copy']:.0%})",
f"{r['fused_vs_bf16']:.2f}", f"{r['gemm_rel_err_vs_ref']:.1e}",
          f"{r['rq_int_mismatch']:.1e}", f"{r['max_diff_vs_default']:.1e}"] for r in rows],
        headers=["shape", "M", "scheme", "GEMM TOPS", "unpack alone us", "x bf16", "x fp8", "x int_mm", "rot+q GB/s (copy)",
"rot+q+GEMM x bf16", "GEMM err", "int mismatch", "diff vs default"], tablefmt="github")
    skinny_table = skinny_table_of(skinny)
    summary = {}
    for scheme in schemes:
        big = [r for r in rows if r["scheme"] == scheme and r["M"] == 4608]
        small = [r for r in rows if r["scheme"] == scheme and r["M"] == 512]
        summary[scheme] = dict(
            gemm_vs_bf16_geomean_m4608=geomean([r["gemm_vs_bf16"] for r in big]),
            gemm_vs_bf16_min_m4608=min(r["gemm_vs_bf16"] for r in big),
            fused_vs_bf16_geomean_m4608=geomean([r["fused_vs_bf16"] for r in big]),
            rq_frac_copy_min=min(r["rq_frac_copy"] for r in big),
            gemm_vs_bf16_min_m512=min(r["gemm_vs_bf16"] for r in small),
        )
    summary_table = tabulate([[k, *(f"{v:.2f}" for v in s.values())] for k, s in summary.items()],
                             headers=["scheme", "GEMM x bf16 geomean", "GEMM x bf16 min", "rot+q+GEMM x bf16 geomean",
                                      "rot+q min frac of copy", "M=512 GEMM x bf16 min"], tablefmt="github")
    md = (f"# GEMM benchmark\n\n{head}\n{table}\n\n{skinny_table}\n\n{summary_table}\n\n"
          f"rotate+quantize alone:\n\n{rot_table}\n")
    paths = write_results(args.name or "gemm", dict(env=env, timing=timing, copy_gbs=copy_gbs, rows=rows, skinny=skinny,
                                                    summary=summary, rotate=rot_rows), md, args.out)
    print(md)
    print("written:", *paths)


if __name__ == "__main__":
    main()
