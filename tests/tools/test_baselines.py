"""The fp8 row-wise baseline module: numerics on CPU, the swap, bad input."""

import pytest
import torch
from torch import nn

from convrot_compiler.tools.baselines import FP8_MAX, Fp8RowwiseLinear, quantize_rowwise_fp8, swap_fp8_rowwise


def test_rowwise_fp8_scale_maps_each_row_max_to_the_format_max():
    x = torch.randn(8, 64) * torch.logspace(-2, 2, 8)[:, None]
    q, s = quantize_rowwise_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (8, 1)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((8,), FP8_MAX))
    rel = (q.float() * s - x).norm(dim=1) / x.norm(dim=1)
    assert rel.max() < 0.05  # e4m3 keeps 3 mantissa bits: ~2-3% per element


def test_fp8_linear_tracks_the_float_linear_and_keeps_shape():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(2, 5, 64)
    y = Fp8RowwiseLinear(lin)(x)
    ref = lin(x)
    assert y.shape == ref.shape
    assert (y - ref).norm() / ref.norm() < 0.08


def test_swap_replaces_only_fitting_linears():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10), nn.Sequential(nn.Linear(32, 16)))
    assert swap_fp8_rowwise(model) == 2
    assert isinstance(model[0], Fp8RowwiseLinear) and type(model[2]) is nn.Linear
    assert isinstance(model[3][0], Fp8RowwiseLinear)
    with pytest.raises(ValueError, match="divisible by 16"):
        Fp8RowwiseLinear(nn.Linear(30, 32))
