"""Probe: other forms of rotate+quantize at FLUX shapes, against the library kernel (results/rotate_forms.md).

The library kernel (kernels/rotate_quant.py) rotates each 256-group by two 16 x 16 tensor-core products (the
Kronecker form) and makes two passes over a row: the row's absmax, then the quantization. This probe's
kernel varies one thing at a time:
* ``bfly``: the regular Hadamard as an in-register butterfly instead of tensor cores. Along each base-4 digit
  of the channel index, R_4 v = sum(v) - 2 flip(v); the flips of all four digits make one reversal of the
  group, undone on the way out (byte order within 8-byte words, word order within the group), so the result
  equals the library's quantized values;
* ``kron``: the library's Kronecker rotation on the same tiling (CH groups of BM rows per step);
* one pass (the whole row in registers, CH = the row's groups rounded up to a power of two) or two;
* ``-pN``: a persistent grid of N programs per SM (fewer rows in flight, so pass 2 might re-read from L2);
* ``-rev``: pass 2 walks the row backwards (the most recently read groups first).
Every case is checked against the reference in the same run (at most 1 apart on at most 1e-3 of the values:
float32 summation order). Timed eagerly (bench_ms): the larger shapes run 36-150 us, longer than the host
path; the M = 512 rows measure the host as much as the kernel.

    python bench/probe_rotate_forms.py [--set forms|persistent|reversed|wide] [--out DIR]
    python bench/probe_rotate_forms.py --ncu M K KRON BM CH WARPS STAGES NPROG   # one config, for ncu
"""

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import bench_graph_ms, bench_ms, environment, write_results  # noqa: E402
from convrot_compiler import ops  # noqa: E402
from convrot_compiler.hadamard import hadamard_matrix  # noqa: E402
from convrot_compiler.kernels import rotate_quant as rq  # noqa: E402
from convrot_compiler.kernels.rotate_quant import _kron_rotate, _quantize_tile, _repeat_each, _row_divisor  # noqa: E402

SHAPES = [(4608, 3072), (4608, 12288), (4608, 15360), (512, 3072)]
# two-pass tilings (BM, CH, warps, stages) per set; one-pass configs are built from the row width
SETS = {
    "forms": [(1, 4, 4, 3), (2, 2, 2, 3), (1, 8, 4, 3), (1, 2, 2, 3), (1, 8, 8, 3), (2, 4, 4, 3)],
    "persistent": [(1, 4, 4, 3), (2, 2, 2, 3), (1, 8, 8, 3), (1, 8, 4, 3)],
    "reversed": [(1, 4, 4, 3), (2, 2, 2, 3), (1, 8, 8, 3), (1, 8, 4, 3), (1, 2, 2, 3), (1, 4, 4, 2)],
    "wide": [(1, 4, 4, 3), (1, 16, 16, 3), (1, 16, 16, 2), (1, 32, 16, 2), (1, 16, 8, 3), (1, 8, 8, 4),
             (1, 32, 32, 2), (1, 64, 32, 2), (1, 16, 16, 4), (1, 8, 8, 3)],
    # the text stream's few rows: one row per program, a few groups per step
    "small": [(1, 1, 1, 3), (1, 2, 2, 3), (1, 4, 2, 3), (1, 4, 4, 3), (1, 8, 4, 3), (1, 8, 8, 3), (1, 16, 8, 3),
              (2, 2, 2, 3), (2, 4, 4, 3)],
}


@triton.jit
def _butterfly(t, R: tl.constexpr):
    """[R, 256] -> T(t): along each base-4 digit, v <- sum(v) - 2 v (R_4 up to a flip of the digit)."""
    t = tl.reshape(t, (R, 4, 4, 4, 4))
    t = tl.sum(t, axis=4, keep_dims=True) - 2.0 * t
    t = tl.sum(t, axis=3, keep_dims=True) - 2.0 * t
    t = tl.sum(t, axis=2, keep_dims=True) - 2.0 * t
    t = tl.sum(t, axis=1, keep_dims=True) - 2.0 * t
    return tl.reshape(t, (R, 256))


@triton.jit
def _pack_reversed(q, R: tl.constexpr):
    """[R, 256] int8 values -> [R, 32] int64, byte p of word b = q[b * 8 + 7 - p]."""
    qi = tl.reshape(q.to(tl.int32) & 0xFF, (R, 32, 8)).to(tl.int64)
    sh = (8 * (7 - tl.arange(0, 8))).to(tl.int64)
    return tl.sum(qi << sh[None, None, :], axis=2)


@triton.jit
def _rot(x, h_ptr, R: tl.constexpr, KRON: tl.constexpr, GPU_MATH: tl.constexpr):
    if KRON:
        y = _kron_rotate(tl.reshape(x, (R * 16, 16)), h_ptr, R * 16, not GPU_MATH) * 16.0
    else:
        y = _butterfly(x.to(tl.float32), R)
    return y


@triton.jit
def _load_rotated(x_rows, g, src, rmask, K, h_ptr, R: tl.constexpr, KRON: tl.constexpr, GPU_MATH: tl.constexpr):
    """Groups g (one per tile row) of the tile's rows, rotated."""
    col = g[:, None] * 256 + src
    x = tl.load(x_rows + g[:, None] * 256, mask=rmask[:, None] & (col < K), other=0.0)
    return _rot(x, h_ptr, R, KRON, GPU_MATH)


@triton.jit
def _store_q(q_ptr, m_idx, stride_qm, g, rmask, K, q, R: tl.constexpr, KRON: tl.constexpr):
    if KRON:  # element (r * 16 + j, i) of the Kronecker order is channel 16 i + j of group r
        r16 = tl.arange(0, R * 16)
        i16 = tl.arange(0, 16)
        gm = _repeat_each(g, R, 16)
        mm = _repeat_each(m_idx, R, 16)
        ok = _repeat_each(rmask & (g * 256 < K), R, 16)
        ptrs = q_ptr + mm[:, None].to(tl.int64) * stride_qm + gm[:, None] * 256 + (r16 % 16)[:, None] + 16 * i16[None, :]
        tl.store(ptrs, q, mask=ok[:, None])
    else:
        b = tl.arange(0, 32)
        ptrs = q_ptr.to(tl.pointer_type(tl.int64)) + m_idx.to(tl.int64)[:, None] * (stride_qm // 8) + g[:, None] * 32 + (31 - b)[None, :]
        tl.store(ptrs, _pack_reversed(q, R), mask=rmask[:, None] & (g[:, None] * 256 < K))


@triton.jit
def _forms_kernel(x_ptr, q_ptr, s_ptr, h_ptr, M, K, stride_xm, stride_qm, QMAX: tl.constexpr, GPU_MATH: tl.constexpr,
                BM: tl.constexpr, CH: tl.constexpr, ONE_PASS: tl.constexpr, KRON: tl.constexpr, NPROG: tl.constexpr = 0,
                REV: tl.constexpr = False):
    if NPROG == 0:
        _block(tl.program_id(0), x_ptr, q_ptr, s_ptr, h_ptr, M, K, stride_xm, stride_qm, QMAX, GPU_MATH, BM, CH, ONE_PASS, KRON, REV)
    else:
        for pid in range(tl.program_id(0), tl.cdiv(M, BM), NPROG):
            _block(pid, x_ptr, q_ptr, s_ptr, h_ptr, M, K, stride_xm, stride_qm, QMAX, GPU_MATH, BM, CH, ONE_PASS, KRON, REV)


@triton.jit
def _block(pid, x_ptr, q_ptr, s_ptr, h_ptr, M, K, stride_xm, stride_qm, QMAX: tl.constexpr, GPU_MATH: tl.constexpr,
           BM: tl.constexpr, CH: tl.constexpr, ONE_PASS: tl.constexpr, KRON: tl.constexpr, REV: tl.constexpr):
    R: tl.constexpr = BM * CH
    rr = tl.arange(0, R)
    m_idx = pid * BM + rr // CH
    c_idx = rr % CH
    src = tl.arange(0, 256)[None, :]
    rmask = m_idx < M
    x_rows = x_ptr + m_idx.to(tl.int64)[:, None] * stride_xm + src
    if ONE_PASS:
        t = _load_rotated(x_rows, c_idx, src, rmask, K, h_ptr, R, KRON, GPU_MATH)
        amax_t = tl.abs(t)
    else:
        if KRON:
            amax_t = tl.zeros([R * 16, 16], dtype=tl.float32)
        else:
            amax_t = tl.zeros([R, 256], dtype=tl.float32)
        for ci in range(0, tl.cdiv(K, 256 * CH)):
            t = _load_rotated(x_rows, ci * CH + c_idx, src, rmask, K, h_ptr, R, KRON, GPU_MATH)
            amax_t = tl.maximum(amax_t, tl.abs(t), propagate_nan=tl.PropagateNan.ALL)
    amax_t = tl.reshape(amax_t, (BM, CH * 256))  # the Kronecker order [R * 16, 16] holds a group per 16 rows too
    bad = tl.max((~(amax_t < float("inf"))).to(tl.int32), axis=1)
    amax = tl.max(tl.where(amax_t < float("inf"), amax_t, 0.0), axis=1) * 0.0625
    scale = tl.where(bad > 0, float("nan"), tl.math.div_rn(amax, tl.full([BM], QMAX, tl.float32)))
    usable = (bad == 0) & (scale > 0.0)
    rows = pid * BM + tl.arange(0, BM)
    tl.store(s_ptr + rows, scale, mask=rows < M)
    p, s, inv = _row_divisor(scale, usable)
    # per tile row: the rotation left the values 16x the rotated ones, hence p / 16
    pr = _repeat_each(p, BM, CH) * 0.0625
    sr = _repeat_each(s, BM, CH)
    ir = _repeat_each(inv, BM, CH)
    ur = _repeat_each(usable, BM, CH)
    if KRON:
        pr = _repeat_each(pr, R, 16)
        sr = _repeat_each(sr, R, 16)
        ir = _repeat_each(ir, R, 16)
        ur = _repeat_each(ur, R, 16)
    if ONE_PASS:
        q = _quantize_tile(t, pr, sr, ir, ur, QMAX, GPU_MATH).to(tl.int8)
        _store_q(q_ptr, m_idx, stride_qm, c_idx, rmask, K, q, R, KRON)
    else:
        n_chunks = tl.cdiv(K, 256 * CH)
        for cj in range(0, n_chunks):
            ci = n_chunks - 1 - cj if REV else cj
            g = ci * CH + c_idx
            t = _load_rotated(x_rows, g, src, rmask, K, h_ptr, R, KRON, GPU_MATH)
            q = _quantize_tile(t, pr, sr, ir, ur, QMAX, GPU_MATH).to(tl.int8)
            _store_q(q_ptr, m_idx, stride_qm, g, rmask, K, q, R, KRON)


def _launch(x, q, s, h16, kron, one, bm, ch, w, st, nprog=0, rev=False):
    m, k = x.shape
    grid = (min(nprog, triton.cdiv(m, bm)) if nprog else triton.cdiv(m, bm),)
    _forms_kernel[grid](x, q, s, h16, m, k, x.stride(0), q.stride(0), QMAX=7, GPU_MATH=True, BM=bm, CH=ch,
                        ONE_PASS=one, KRON=kron, NPROG=nprog, REV=rev, num_warps=w, num_stages=st)
    return q, s


def launch_library(x, q, s, h16, bm=2, w=2, st=3, ch=1):
    """The library kernel (W4, Kronecker form, one source) with one config, no autotuner: by default its
    leading config at large M (BM = 2 rows, one group per step, 2 warps, 3 stages)."""
    m, k = x.shape
    rq._rotate_quant_kernel.fn[(triton.cdiv(m, bm),)](
        x, x, h16, q, s, m, k, 0, x.stride(0), x.stride(0), q.stride(0), s, s, 0, 0, 1, 0.0, G=256,
        METHOD=rq.METHOD_KRON, QMAX=7, TWO_SOURCES=False, GELU_X2=False, HAS_NORM=False, DOT_F32=False,
        GPU_MATH=True, SMALL_M=False, BM=bm, CH=ch, num_warps=w, num_stages=st)
    return q, s


def cases_of(which, m, k, sms):
    """(form, config, kwargs of _launch or None for the library kernel) of one variant set."""
    out = [("library", (2, 2, 3), None)]
    ch1 = 1 << (-(-k // 256) - 1).bit_length()
    for kron in (False, True) if which in ("forms", "persistent", "small") else (False,):
        name = "kron" if kron else "bfly"
        for bm, ch, w, st in SETS[which]:
            if which == "persistent":
                for per_sm in (0, 2, 4, 6, 8, 12):
                    suffix = f"-p{per_sm}" if per_sm else ""
                    out.append((f"{name}-2pass{suffix}", (bm, ch, w, st),
                                dict(kron=kron, one=False, bm=bm, ch=ch, w=w, st=st, nprog=per_sm * sms)))
            elif which == "reversed":
                for rev in (False, True):
                    out.append((f"{name}-2pass" + ("-rev" if rev else ""), (bm, ch, w, st),
                                dict(kron=kron, one=False, bm=bm, ch=ch, w=w, st=st, rev=rev)))
            else:
                out.append((f"{name}-2pass", (bm, ch, w, st), dict(kron=kron, one=False, bm=bm, ch=ch, w=w, st=st)))
        if which in ("forms", "small"):
            for bm, w in [(1, 4), (1, 8), (1, 16), (2, 8), (2, 16)]:
                if ch1 * bm * 256 / (32 * w) <= 128:
                    out.append((f"{name}-1pass", (bm, ch1, w, 1), dict(kron=kron, one=True, bm=bm, ch=ch1, w=w, st=1)))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--set", default="forms", choices=sorted(SETS))
    p.add_argument("--ncu", nargs=8, type=int, metavar="N", help="M K KRON BM CH WARPS STAGES NPROG: launch one config")
    p.add_argument("--shapes", help="MxK,MxK,... (default: the FLUX shapes of SHAPES)")
    p.add_argument("--graph", action="store_true", help="time CUDA-graph replays (default: launches from Python)")
    p.add_argument("--out")
    args = p.parse_args()
    shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")] if args.shapes else SHAPES
    timer = bench_graph_ms if args.graph else bench_ms
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    h16 = hadamard_matrix("regular", 16, device="cuda").to(torch.bfloat16)
    if args.ncu:
        m, k, kron, bm, ch, w, st, nprog = args.ncu
        x = (torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16)
        q, s = torch.empty(m, k, dtype=torch.int8, device="cuda"), torch.empty(m, device="cuda")
        for _ in range(20):
            _launch(x, q, s, h16, bool(kron), False, bm, ch, w, st, nprog)
        torch.cuda.synchronize()
        return
    from tabulate import tabulate

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows, best, copy = [], {}, {}
    for m, k in shapes:
        torch.manual_seed(0)
        x = (torch.randn(m, k, device="cuda") * 2 + torch.randn(m, 1, device="cuda") * 4).to(torch.bfloat16)
        q_ref, s_ref = ops.rotate_quantize_reference(x, h16.float(), 256, 4)
        nbytes = m * k * 3 + m * 4
        y = torch.empty_like(x)
        copy[(m, k)] = 2 * x.numel() * 2 / timer(lambda: y.copy_(x), warmup_ms=50, rep_ms=200) / 1e6
        q = torch.empty(m, k, dtype=torch.int8, device="cuda")
        s = torch.empty(m, device="cuda")
        for form, cfg, kw in cases_of(args.set, m, k, sms):
            launch = (lambda: launch_library(x, q, s, h16)) if kw is None else (lambda kw=kw: _launch(x, q, s, h16, **kw))
            try:
                q.fill_(99)
                launch()
                torch.cuda.synchronize()
                qd = (q.int() - q_ref.int()).abs()
                t = timer(launch, warmup_ms=50, rep_ms=200)
                r = dict(M=m, K=k, form=form, cfg=cfg, us=t * 1e3, gbs=nbytes / t / 1e6,
                         of_copy=nbytes / t / 1e6 / copy[(m, k)], q_maxdiff=qd.max().item(),
                         q_mismatch=(qd > 0).float().mean().item(), s_relerr=((s - s_ref).abs() / s_ref).max().item())
            except Exception as e:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                r = dict(M=m, K=k, form=form, cfg=cfg, error=f"{type(e).__name__}: {str(e)[:200]}")
            rows.append(r)
            ok = "error" not in r and r["q_maxdiff"] <= 1 and r["q_mismatch"] < 1e-3 and r["s_relerr"] < 1e-5
            if ok and ((m, k, form) not in best or r["us"] < best[(m, k, form)]["us"]):
                best[(m, k, form)] = r
    env = environment()
    tab = [[m, k, form, r["cfg"], f"{r['us']:.1f}", f"{r['gbs']:.0f}", f"{r['of_copy']:.2f}", r["q_maxdiff"],
            f"{r['q_mismatch']:.1e}"] for (m, k, form), r in best.items()]
    md = (f"# rotate+quantize forms ({args.set})\n\nGPU {env.get('gpu')} | torch {env['torch']} | triton {env['triton']}"
          f" | {env['date']}\n\nBest config (BM, CH, warps, stages) per form; "
          f"{'CUDA-graph replays' if args.graph else 'launched from Python'}; copy bandwidth per shape: "
          + ", ".join(f"{m}x{k} {v:.0f} GB/s" for (m, k), v in copy.items()) + "\n\n"
          + tabulate(tab, headers=["M", "K", "form", "cfg", "us", "GB/s", "of copy", "q maxdiff", "q mismatch"],
                     tablefmt="github") + "\n")
    print(md)
    name = f"rotate_forms_{args.set}" + ("_graph" if args.graph else "")
    print("written:", *write_results(name, dict(env=env, rows=rows), md, args.out))


if __name__ == "__main__":
    main()
