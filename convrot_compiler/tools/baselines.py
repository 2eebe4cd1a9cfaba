"""The fp8 row-wise dynamic baseline, built on ``torch._scaled_mm``.

torchao's ``Float8DynamicActivationFloat8WeightConfig(PerRow())`` is the reference
fp8 recipe, and the benchmark uses it when torchao is installed. This module is the
clearly labelled equivalent the benchmark runs beside it (or instead, where the
torchao wheel is absent): weights e4m3 with one fp32 scale per output channel,
activations quantized to e4m3 per token at run time, one ``_scaled_mm`` with
row-wise scales, bf16 out. Under ``torch.compile`` Inductor fuses the activation
quantization into the producer, as it does for torchao.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def quantize_rowwise_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, fp32 scale [rows, 1]) with x ~= values * scale, one scale per row."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8RowwiseLinear(nn.Module):
    """y = (q(x) sx) (q(W) sw)^T + b with per-token and per-channel fp8 scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.in_features % 16 or linear.out_features % 16:
            raise ValueError(f"fp8 _scaled_mm needs both dims divisible by 16, got {linear.in_features} -> "
                             f"{linear.out_features}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            wq, sw = quantize_rowwise_fp8(linear.weight)
        self.register_buffer("weight_fp8", wq)
        self.register_buffer("weight_scale", sw.reshape(1, -1).contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, sx = quantize_rowwise_fp8(x2)
        if x.is_cuda:
            y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=sx, scale_b=self.weight_scale,
                                 bias=self.bias, out_dtype=x.dtype)
        else:  # no fp8 GEMM on CPU: the same numerics in float
            y = ((xq.float() * sx) @ (self.weight_fp8.float() * self.weight_scale.t()).t()).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def swap_fp8_rowwise(model: nn.Module) -> int:
    """Replace every nn.Linear whose dims fit _scaled_mm in place; returns how many were replaced."""
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and m.in_features % 16 == 0 and m.out_features % 16 == 0]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8RowwiseLinear(lin))
    return len(targets)
