"""The error measure every tool reports: ||out - ref|| / ||ref|| over a whole tensor."""

from __future__ import annotations

import math

import torch


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere gives NaN)."""
    o, r = out.double(), ref.double()
    denom = r.norm().item()
    return (o - r).norm().item() / denom if denom > 0 else math.inf
