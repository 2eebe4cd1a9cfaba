"""One-off probe: cuDNN's bf16 SDPA plans at FLUX.1-dev's attention against torch's SDPA (default backend)."""
import json
import os
import sys

import cudnn
import torch
import torch.nn.functional as F

B, H, S, D = 1, 24, int(sys.argv[1]) if len(sys.argv) > 1 else 4608, 128
dev = torch.device("cuda")
g = torch.Generator(device=dev).manual_seed(0)
def bshd():
    return torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16, generator=g).permute(0, 2, 1, 3)
q, k, v = bshd(), bshd(), bshd()
scale = D ** -0.5

def timed(fn, iters=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    st.record()
    for _ in range(iters):
        fn()
    en.record(); torch.cuda.synchronize()
    return st.elapsed_time(en) / iters * 1000

rows = []
ref = F.scaled_dot_product_attention(q, k, v)
rows.append(("torch sdpa default", timed(lambda: F.scaled_dot_product_attention(q, k, v)), 0.0))
from torch.nn.attention import SDPBackend, sdpa_kernel

for name, be in (("torch cudnn", SDPBackend.CUDNN_ATTENTION), ("torch flash", SDPBackend.FLASH_ATTENTION),
                 ("torch efficient", SDPBackend.EFFICIENT_ATTENTION)):
    try:
        with sdpa_kernel(be):
            out = F.scaled_dot_product_attention(q, k, v)
            t = timed(lambda: F.scaled_dot_product_attention(q, k, v))
        rows.append((name, t, ((out.float() - ref.float()).norm() / ref.float().norm()).item()))
    except Exception as e:
        rows.append((name, float("nan"), str(e)[:80]))

handle = cudnn.create_handle()
cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
graph = cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16, intermediate_data_type=cudnn.data_type.FLOAT,
                      compute_data_type=cudnn.data_type.FLOAT, handle=handle)
tq, tk, tv = (graph.tensor(name=n, dim=list(t.shape), stride=list(t.stride()), data_type=cudnn.data_type.BFLOAT16)
              for n, t in zip("qkv", (q, k, v)))
o, _ = graph.sdpa(q=tq, k=tk, v=tv, is_inference=True, attn_scale=scale, use_causal_mask=False, name="sdpa")
out = torch.empty_like(q)
o.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride())).set_data_type(cudnn.data_type.BFLOAT16)
graph.validate(); graph.build_operation_graph()
graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
graph.check_support()
n = graph.get_execution_plan_count()
for i in range(n):
    try:
        graph.build_plan_at_index(i)
        ws = torch.empty(max(1, graph.get_workspace_size_plan_at_index(i)), device=dev, dtype=torch.uint8)
        pack = {tq: q, tk: k, tv: v, o: out}
        t = timed(lambda: graph.execute_plan_at_index(pack, ws, i, handle=handle))
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        rows.append((f"bf16 plan {i} {graph.get_plan_name_at_index(i)}", t, err))
    except Exception as e:
        rows.append((f"cudnn-frontend plan {i}", float("nan"), str(e)[:80]))
flop = 4 * B * H * S * S * D
print(f"{torch.cuda.get_device_name()} torch {torch.__version__} cudnn {torch.backends.cudnn.version()} S={S}")
for name, t, err in rows:
    print(f"{name[:64]:64s} {t:9.1f} us  {flop / t / 1e6:7.1f} TFLOP/s  err {err}")
out_dir = os.environ.get("OUT", ".")
json.dump([dict(name=r[0], us=r[1], err=str(r[2])) for r in rows], open(f"{out_dir}/probe_bf16_sdpa_{S}.json", "w"))

# fp8 plans, the same graph as kernels/cudnn/fp8_attention.py builds
e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
q8, k8, v8 = (t.to(torch.float8_e4m3fn) for t in (q, k, v))
o8 = torch.empty_like(q8)
g8 = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
t8 = [g8.tensor(name=n, dim=list(t.shape), stride=list(t.stride()), data_type=e4m3) for n, t in zip("qkv", (q8, k8, v8))]
sc = [g8.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32) for n in ("dq", "dk", "dv", "ds", "ss", "so")]
o8t, _, amax_s, amax_o = g8.sdpa_fp8(q=t8[0], k=t8[1], v=t8[2], descale_q=sc[0], descale_k=sc[1], descale_v=sc[2],
                                     descale_s=sc[3], scale_s=sc[4], scale_o=sc[5], is_inference=True, attn_scale=scale,
                                     use_causal_mask=False, name="sdpa_fp8")
o8t.set_output(True).set_dim(list(o8.shape)).set_stride(list(o8.stride())).set_data_type(e4m3)
for t in (amax_s, amax_o):
    t.set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
g8.validate(); g8.build_operation_graph()
g8.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
g8.check_support()
ones = torch.ones(6, device=dev)
vals = [ones[i:i + 1].view(1, 1, 1, 1) for i in range(6)]
vals[3] = torch.full((1, 1, 1, 1), 1 / 448.0, device=dev); vals[4] = torch.full((1, 1, 1, 1), 448.0, device=dev)
pack8 = {t8[0]: q8, t8[1]: k8, t8[2]: v8, o8t: o8, **{s: v for s, v in zip(sc, vals)}}
ref8 = F.scaled_dot_product_attention(q8.to(torch.bfloat16), k8.to(torch.bfloat16), v8.to(torch.bfloat16))
print("fp8 plans:", g8.get_execution_plan_count())
for i in range(g8.get_execution_plan_count()):
    try:
        g8.build_plan_at_index(i)
        ws = torch.empty(max(1, g8.get_workspace_size_plan_at_index(i)), device=dev, dtype=torch.uint8)
        t = timed(lambda: g8.execute_plan_at_index(pack8, ws, i, handle=handle))
        err = ((o8.float() - ref8.float()).norm() / ref8.float().norm()).item()
        rows.append((f"fp8 plan {i} {g8.get_plan_name_at_index(i)}", t, err))
    except Exception as e:
        rows.append((f"fp8 plan {i}", float("nan"), str(e)[:80]))
for name, t, err in rows[-g8.get_execution_plan_count():]:
    print(f"{name[:64]:64s} {t:9.1f} us  {flop / t / 1e6:7.1f} TFLOP/s  err {err}")
json.dump([dict(name=r[0], us=r[1], err=str(r[2])) for r in rows], open(f"{out_dir}/probe_sdpa_{S}.json", "w"))
