"""cuDNN's fp8 flash attention (Hopper), reached through NVIDIA's cuDNN Python frontend.

Why cuDNN and not a Triton kernel: it is the fp8 attention NVIDIA tunes for Hopper (warp-specialized,
TMA, e4m3 wgmma), measured at 1.44-1.55x its bf16 kernel at FLUX's shapes,
and the frontend (``pip install nvidia-cudnn-frontend``, the ``fp8-attention`` extra) drives the cuDNN
library PyTorch already ships. The numerics are attention.fp8_attention_reference's.

One execution plan per (shapes, strides, softmax scale, device), built on first use and kept: building
takes tens of milliseconds, execution is one kernel, and capturable in a CUDA graph (the stream is set on
every call; the workspace is allocated when the plan is built, outside any capture).
"""

from __future__ import annotations

import functools

import torch

from ...numerics.fp8_attention import E4M3_MAX, output_like

_PLANS: dict[tuple, "_Plan"] = {}


def unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why fp8 attention cannot run on ``device`` (default: the current CUDA device), or None."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return f"needs a Hopper (sm_90) or newer GPU for fp8 tensor cores, this one is sm_{major}{minor}"
    try:
        import cudnn  # noqa: F401
    except ImportError:
        return ("needs NVIDIA's cuDNN Python frontend: pip install 'convrot-compiler[fp8-attention]' "
                "(nvidia-cudnn-frontend)")
    return None


@functools.lru_cache(maxsize=None)
def _handle(device_index: int):
    import cudnn

    with torch.cuda.device(device_index):
        return cudnn.create_handle()


class _Plan:
    """One built cuDNN fp8 SDPA graph: e4m3 Q, K, V, O of one shape and layout, fp32 descales as
    device tensors (new scales need no rebuild, and a captured CUDA graph replays with new ones)."""

    def __init__(self, shape: tuple[int, ...], strides: tuple[tuple[int, ...], ...], softmax_scale: float,
                 device: torch.device):
        import cudnn

        self.cudnn = cudnn
        self.handle = _handle(device.index)
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32,
                              handle=self.handle)
        dims = list(shape)
        self.q, self.k, self.v = (graph.tensor(name=n, dim=dims, stride=list(s), data_type=e4m3)
                                  for n, s in zip("qkv", strides[:3]))
        scalar = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
        self.scalars = [graph.tensor(name=n, **scalar)
                        for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
        o, _, amax_s, amax_o = graph.sdpa_fp8(q=self.q, k=self.k, v=self.v, descale_q=self.scalars[0],
                                              descale_k=self.scalars[1], descale_v=self.scalars[2],
                                              descale_s=self.scalars[3], scale_s=self.scalars[4],
                                              scale_o=self.scalars[5], is_inference=True, attn_scale=softmax_scale,
                                              use_causal_mask=False, name="sdpa_fp8")
        o.set_output(True).set_dim(dims).set_stride(list(strides[3])).set_data_type(e4m3)
        # The amaxes of S and O stay virtual: as outputs, each call memsets them before reducing into them
        # (3 memsets a call instead of 1, and 282.1 against 279.1 us at FLUX.1-dev's attention, H100)
        for t in (amax_s, amax_o):
            t.set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
        self.o = o
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph = graph
        self.workspace = torch.empty(graph.get_workspace_size(), device=device, dtype=torch.uint8)
        s = torch.tensor([1.0 / E4M3_MAX, E4M3_MAX], device=device)
        self.descale_s, self.scale_s = s[0:1].view(1, 1, 1, 1), s[1:2].view(1, 1, 1, 1)

    def __call__(self, q8, k8, v8, descale_q, descale_k, descale_v, scale_o, out8) -> None:
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(q8.device).cuda_stream)
        one = [t.reshape(1, 1, 1, 1) for t in (descale_q, descale_k, descale_v, scale_o)]
        pack = {self.q: q8, self.k: k8, self.v: v8, self.o: out8,
                self.scalars[0]: one[0], self.scalars[1]: one[1], self.scalars[2]: one[2],
                self.scalars[3]: self.descale_s, self.scalars[4]: self.scale_s, self.scalars[5]: one[3]}
        self.graph.execute(pack, self.workspace, handle=self.handle)


def _plan(shape, strides, softmax_scale: float, device: torch.device) -> _Plan:
    key = (tuple(shape), strides, float(softmax_scale), device.index)
    plan = _PLANS.get(key)
    if plan is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fp8 attention: a new shape reached the cuDNN kernel during CUDA-graph capture; "
                               "run the model once outside capture first (convrot_compiler.compile does)")
        plan = _PLANS[key] = _Plan(tuple(shape), strides, softmax_scale, device)
    return plan


def check_supported(shape: tuple[int, int, int, int], softmax_scale: float, device: torch.device) -> str | None:
    """None when cuDNN builds an fp8 plan for [B, H, S, D] inputs in the model's [B, S, H, D] memory,
    else why not (cuDNN's message)."""
    why = unavailable_reason(device)
    if why:
        return why
    b, h, s, d = shape
    bshd = (s * h * d, d, h * d, 1)
    try:
        _plan(shape, (bshd,) * 4, softmax_scale, device)
    except Exception as e:  # cudnn raises its own error types for unsupported configurations
        return f"cuDNN has no fp8 attention plan for [B, H, S, D] = {list(shape)}: {e}"
    return None


def fp8_attention(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                  descale_k: torch.Tensor, descale_v: torch.Tensor, scale_o: torch.Tensor,
                  softmax_scale: float) -> torch.Tensor:
    """e4m3 [B, H, S, D] Q, K, V (any strides with unit stride on D) -> e4m3 O in q8's layout."""
    for name, t in (("q8", q8), ("k8", k8), ("v8", v8)):
        if t.dtype != torch.float8_e4m3fn or t.dim() != 4 or not t.is_cuda:
            raise ValueError(f"fp8_attention: {name} must be a 4-D float8_e4m3fn CUDA tensor [B, H, S, D], "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    if q8.shape != k8.shape or q8.shape != v8.shape:
        raise ValueError(f"fp8_attention: q, k, v shapes differ: {tuple(q8.shape)}, {tuple(k8.shape)}, "
                         f"{tuple(v8.shape)} (cross-attention and grouped heads are not supported)")
    out8 = output_like(q8)
    q8, k8, v8 = (t if t.stride(-1) == 1 else t.contiguous() for t in (q8, k8, v8))
    strides = tuple(tuple(t.stride()) for t in (q8, k8, v8, out8))
    _plan(q8.shape, strides, softmax_scale, q8.device)(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, out8)
    return out8
