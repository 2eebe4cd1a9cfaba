"""The weight-only tile layout (W4A16, W8A16) through the library on CPU: quantize_weight, the op's reference,
the eager module, and the compiler choosing the layout per weight (ops/dispatch.py, weight_only_layout) and
reporting it."""

import pytest
import torch
from torch import nn

import convrot_compiler as cc
from convrot_compiler.compiler import weights
from convrot_compiler.compiler.backend import REPORTS
from convrot_compiler.numerics.quant import quantize_weight, quantized_nbytes, reference_linear
from convrot_compiler.numerics.rotations import GroupHadamardRotation
from convrot_compiler.ops import dispatch
from convrot_compiler.tools.inspection import inspect

pytestmark = pytest.mark.usefixtures("fresh_dynamo", "no_grad")  # conftest: Dynamo reset, no_grad


@pytest.mark.parametrize("scheme,dtype", [("w4a16", torch.int32), ("w8a16", torch.int64)])
def test_tile_layout_holds_the_same_values_and_gives_the_same_linear(scheme, dtype):
    torch.manual_seed(0)
    w = torch.randn(40, 320)
    x = torch.randn(3, 320)
    bias = torch.randn(40)
    groups = quantize_weight(w, scheme, None, group_size=64)
    tiles = quantize_weight(w, scheme, None, group_size=64, layout="tiles")
    assert tiles.layout == "tiles" and tiles.values.dtype == dtype and tiles.values.shape == (3, 5, 32, 4)
    assert torch.equal(tiles.int_values(), groups.int_values()) and torch.equal(tiles.scale, groups.scale)
    assert tiles.nbytes() == quantized_nbytes(scheme, 40, 320, 64, "tiles") > groups.nbytes()  # 48 rows stored
    expected = reference_linear(x, groups, bias)
    assert torch.equal(reference_linear(x, tiles, bias), expected)
    bits = groups.weight_bits
    assert torch.equal(torch.ops.convrot.weight_only_gemm(x, tiles.values, tiles.scale, bias, 64, bits), expected)


def test_tile_layout_refuses_what_it_cannot_hold():
    w = torch.randn(16, 256)
    with pytest.raises(ValueError, match="tile layout is for w4a16 and w8a16"):
        quantize_weight(w, "w4a4", GroupHadamardRotation("regular", 256), layout="tiles")
    with pytest.raises(ValueError, match="tile layout is for w4a16 and w8a16"):
        quantize_weight(w, "w8a16", None, group_size=32, layout="tiles")
    with pytest.raises(ValueError, match="layout must be one of"):
        quantize_weight(w, "w4a16", None, layout="rows")


def test_layout_choice_follows_the_weight():
    assert dispatch.weight_only_layout(torch.zeros(4, 4, dtype=torch.bfloat16), 256) == "groups"  # CPU
    assert dispatch.weight_only_layout(torch.zeros(4, 4, device="meta"), 256) == "groups"


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16"])
def test_compiler_prepares_the_chosen_layout_and_reports_it(monkeypatch, scheme):
    """On CPU the groups layout is chosen; forcing the choice to "tiles" (what an sm_90 GPU gets) must give
    the same output, tile-layout graph inputs, and the layout in the inspect table."""
    torch.manual_seed(0)
    x = torch.randn(2, 512)
    results = {}
    for layout in ("groups", "tiles"):
        monkeypatch.setattr(weights, "weight_only_layout", lambda weight, group_size, layout=layout: layout)
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(512, 256), nn.SiLU(), nn.Linear(256, 64))
        results[layout] = cc.compile(model, plan=[("*", scheme)], progress=False)(x)
        report = REPORTS[-1]
        assert [d.extra["layout"] for d in report.decisions] == [layout, layout]
        torch._dynamo.reset()
    assert torch.equal(results["groups"], results["tiles"])
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(512, 256), nn.SiLU(), nn.Linear(256, 64))
    table = inspect(model, (x,), plan=[("*", scheme)]).table()
    assert f"{scheme} (tensor-core tiles)" in table  # the monkeypatched choice is still in force


def test_inspect_marks_only_the_tile_layout():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(512, 256), nn.SiLU(), nn.Linear(256, 64))
    table = inspect(model, (torch.randn(2, 512),), plan=[("*", "w4a16")]).table()
    assert "w4a16" in table and "tensor-core" not in table  # CPU: the group layout
