"""The tensor-core W4A16 and W8A16 kernels (kernels/sm90/weight_only.py) against the float reference, on
sm_90 (skipped elsewhere): FLUX.1-dev's few-row shapes, ragged shapes, fp16, bias, poisoned outputs."""

import pytest
import torch

from convrot_compiler.kernels.sm90.weight_only import supported, w4a16_gemm_tiles, w8a16_gemm_tiles
from convrot_compiler.numerics.quant import quantize_weight, weight_only_gemm

KERNELS = {4: w4a16_gemm_tiles, 8: w8a16_gemm_tiles}
both = pytest.mark.parametrize("bits", [4, 8])

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm_90 GPU"),
    pytest.mark.usefixtures("no_grad")]


def _case(n, k, m, dtype, group_size=256, with_bias=True, bits=4):
    torch.manual_seed(n + k + m)
    w = torch.randn(n, k, device="cuda") * 0.02
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype) if with_bias else None
    qw = quantize_weight(w, f"w{bits}a16", None, group_size=group_size)
    tiles = quantize_weight(w, f"w{bits}a16", None, group_size=group_size, layout="tiles").values
    ref = weight_only_gemm(x.float(), qw.values, qw.scale, None if bias is None else bias.float(), group_size, bits)
    return x, tiles, qw, bias, ref


def _check(out, ref, dtype):
    """Within the output dtype's rounding of the float32 reference (plus float32 summation-order noise)."""
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10,
                               atol=1e-5 * ref.abs().max().item())


@both
@pytest.mark.parametrize("n,k,m", [(18432, 3072, 1), (9216, 3072, 1), (18432, 3072, 4), (6144, 3072, 8),
                                   (3072, 768, 1), (3072, 256, 2)])
def test_tiles_kernel_at_flux_shapes(n, k, m, bits):
    x, tiles, qw, bias, ref = _case(n, k, m, torch.bfloat16, bits=bits)
    torch.full((1 << 28,), 0x7F, dtype=torch.uint8, device="cuda")  # poison what the allocator hands out next
    _check(KERNELS[bits](x, tiles, qw.scale, bias, 256), ref, torch.bfloat16)


@both
@pytest.mark.parametrize("u,warps,prefetch", [(1, 2, False), (2, 4, True), (4, 8, False), (1, 8, True)])
def test_tiles_kernel_configs_and_ragged_k(u, warps, prefetch, bits):
    # K = 320 pads to 512 (a ragged x, padded by the wrapper); 7 chunks do not fill U * warps of them
    for n, k, m in [(3072, 3072, 1), (100, 320, 13), (40, 448, 9)]:
        gs = 64 if k == 448 else 256
        x, tiles, qw, bias, ref = _case(n, k, m, torch.bfloat16, group_size=gs, bits=bits)
        _check(KERNELS[bits](x, tiles, qw.scale, bias, gs, config=(u, warps, prefetch)), ref, torch.bfloat16)


@both
def test_tiles_kernel_fp16_strided_rows_and_per_channel_scales(bits):
    x, tiles, qw, bias, ref = _case(3072, 3072, 3, torch.float16, bits=bits)
    _check(KERNELS[bits](x, tiles, qw.scale, bias, 256), ref, torch.float16)
    wide = torch.zeros(3, 4096, device="cuda", dtype=torch.float16)
    wide[:, :3072] = x
    _check(KERNELS[bits](wide[:, :3072], tiles, qw.scale, bias, 256), ref, torch.float16)
    x, tiles, qw, bias, ref = _case(640, 3072, 2, torch.bfloat16, group_size=3072, bits=bits)  # one scale a row
    _check(KERNELS[bits](x, tiles, qw.scale, bias, 3072), ref, torch.bfloat16)


@both
def test_tiles_kernel_extreme_values(bits):
    """Every stored value, the extremes included, and large activations of both signs."""
    x, tiles, qw, bias, ref = _case(256, 512, 2, torch.bfloat16, bits=bits)
    x = (x * 300).to(torch.bfloat16)
    w = torch.zeros(256, 512, device="cuda")
    top = 7 if bits == 4 else 127
    w[:, ::2], w[:, 1::2] = top, -top
    w[::3] = torch.arange(512, device="cuda") % (2 * top + 1) - top  # every value
    qw = quantize_weight(w, f"w{bits}a16", None, group_size=256)
    tiles = quantize_weight(w, f"w{bits}a16", None, group_size=256, layout="tiles").values
    ref = weight_only_gemm(x.float(), qw.values, qw.scale, None, 256, bits)
    _check(KERNELS[bits](x, tiles, qw.scale, None, 256), ref, torch.bfloat16)


@both
def test_tiles_kernel_zero_rows_and_no_bias(bits):
    x, tiles, qw, _, ref = _case(512, 512, 4, torch.bfloat16, with_bias=False, bits=bits)
    x[1] = 0
    ref[1] = 0
    out = KERNELS[bits](x, tiles, qw.scale, None, 256)
    _check(out, ref, torch.bfloat16)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert KERNELS[bits](x[:0], tiles, qw.scale, None, 256).shape == (0, 512)


@both
def test_tiles_kernel_rejects_bad_input(bits):
    x, tiles, qw, _, _ = _case(64, 256, 1, torch.bfloat16, bits=bits)
    kernel = KERNELS[bits]
    assert supported(x.float()) is not None
    with pytest.raises(ValueError, match="not bf16 or fp16"):
        kernel(x.float(), tiles, qw.scale, None, 256)
    with pytest.raises(ValueError, match="scale must be float32"):
        kernel(x, tiles, qw.scale[:, :0], None, 256)
    with pytest.raises(ValueError, match="do not hold"):
        kernel(x, tiles, qw.scale[:40], None, 256)
    with pytest.raises(ValueError, match="tiles"):
        KERNELS[12 - bits](x, tiles, qw.scale, None, 256)  # the other width's kernel


@both
def test_eager_module_and_compiler_take_the_tile_layout_on_sm90(bits):
    import convrot_compiler as cc
    from convrot_compiler.compiler.backend import REPORTS

    torch.manual_seed(0)
    lin = torch.nn.Linear(3072, 6144).to("cuda", torch.bfloat16)
    x = torch.randn(2, 3072, device="cuda", dtype=torch.bfloat16)
    mod = (cc.Int4WeightOnlyLinear if bits == 4 else cc.Int8WeightOnlyLinear).from_linear(lin)
    assert mod.quantized_weight.layout == "tiles"
    groups = quantize_weight(lin.weight, f"w{bits}a16", None, group_size=256)
    ref = weight_only_gemm(x.float(), groups.values, groups.scale, lin.bias.float(), 256, bits)
    with torch.no_grad():
        _check(mod(x), ref, torch.bfloat16)
    torch._dynamo.reset()
    out = cc.compile(torch.nn.Sequential(lin), plan=[("*", f"w{bits}a16")], progress=False,
                     release_weights=False)(x)
    assert REPORTS[-1].decisions[0].extra["layout"] == "tiles"
    _check(out, ref, torch.bfloat16)
