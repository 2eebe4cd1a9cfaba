"""The tensor-core W4A16 kernel (kernels/sm90/weight_only.py) against the float reference, on sm_90
(skipped elsewhere): FLUX.1-dev's few-row shapes, ragged shapes, fp16, bias, poisoned outputs."""

import pytest
import torch

from convrot_compiler.kernels.sm90.weight_only import supported, w4a16_gemm_tiles
from convrot_compiler.numerics.quant import pack_int4_tiles, quantize_weight, unpack_int4, weight_only_gemm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm_90 GPU"),
    pytest.mark.usefixtures("no_grad")]


def _case(n, k, m, dtype, group_size=256, with_bias=True):
    torch.manual_seed(n + k + m)
    w = torch.randn(n, k, device="cuda") * 0.02
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype) if with_bias else None
    qw = quantize_weight(w, "w4a16", None, group_size=group_size)
    tiles = pack_int4_tiles(unpack_int4(qw.values, group_size))
    ref = weight_only_gemm(x.float(), qw.values, qw.scale, None if bias is None else bias.float(), group_size)
    return x, tiles, qw, bias, ref


def _check(out, ref, dtype):
    """Within the output dtype's rounding of the float32 reference (plus float32 summation-order noise)."""
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10,
                               atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("n,k,m", [(18432, 3072, 1), (9216, 3072, 1), (18432, 3072, 4), (6144, 3072, 8),
                                   (3072, 768, 1), (3072, 256, 2)])
def test_tiles_kernel_at_flux_shapes(n, k, m):
    x, tiles, qw, bias, ref = _case(n, k, m, torch.bfloat16)
    torch.full((1 << 28,), 0x7F, dtype=torch.uint8, device="cuda")  # poison what the allocator hands out next
    _check(w4a16_gemm_tiles(x, tiles, qw.scale, bias, 256), ref, torch.bfloat16)


@pytest.mark.parametrize("u,warps,prefetch", [(1, 2, False), (2, 4, True), (4, 8, False), (1, 8, True)])
def test_tiles_kernel_configs_and_ragged_k(u, warps, prefetch):
    # K = 320 pads to 512 (a ragged x, padded by the wrapper); 7 chunks do not fill U * warps of them
    for n, k, m in [(3072, 3072, 1), (100, 320, 13), (40, 448, 9)]:
        x, tiles, qw, bias, ref = _case(n, k, m, torch.bfloat16, group_size=64 if k == 448 else 256)
        gs = 64 if k == 448 else 256
        _check(w4a16_gemm_tiles(x, tiles, qw.scale, bias, gs, config=(u, warps, prefetch)), ref,
               torch.bfloat16)


def test_tiles_kernel_fp16_and_strided_rows():
    x, tiles, qw, bias, ref = _case(3072, 3072, 3, torch.float16)
    _check(w4a16_gemm_tiles(x, tiles, qw.scale, bias, 256), ref, torch.float16)
    wide = torch.zeros(3, 4096, device="cuda", dtype=torch.float16)
    wide[:, :3072] = x
    _check(w4a16_gemm_tiles(wide[:, :3072], tiles, qw.scale, bias, 256), ref, torch.float16)


def test_tiles_kernel_zero_rows_and_no_bias():
    x, tiles, qw, _, ref = _case(512, 512, 4, torch.bfloat16, with_bias=False)
    x[1] = 0
    ref[1] = 0
    out = w4a16_gemm_tiles(x, tiles, qw.scale, None, 256)
    _check(out, ref, torch.bfloat16)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert w4a16_gemm_tiles(x[:0], tiles, qw.scale, None, 256).shape == (0, 512)


def test_tiles_kernel_rejects_bad_input():
    x, tiles, qw, _, _ = _case(64, 256, 1, torch.bfloat16)
    assert supported(x.float()) is not None
    with pytest.raises(ValueError, match="not bf16 or fp16"):
        w4a16_gemm_tiles(x.float(), tiles, qw.scale, None, 256)
    with pytest.raises(ValueError, match="scale must be float32"):
        w4a16_gemm_tiles(x, tiles, qw.scale[:, :0], None, 256)
    with pytest.raises(ValueError, match="do not hold"):
        w4a16_gemm_tiles(x, tiles, qw.scale[:40], None, 256)


def test_eager_module_and_compiler_take_the_tile_layout_on_sm90():
    import convrot_compiler as cc
    from convrot_compiler.compiler.backend import REPORTS

    torch.manual_seed(0)
    lin = torch.nn.Linear(3072, 6144).to("cuda", torch.bfloat16)
    x = torch.randn(2, 3072, device="cuda", dtype=torch.bfloat16)
    mod = cc.Int4WeightOnlyLinear.from_linear(lin)
    assert mod.quantized_weight.layout == "tiles"
    groups = quantize_weight(lin.weight, "w4a16", None, group_size=256)
    ref = weight_only_gemm(x.float(), groups.values, groups.scale, lin.bias.float(), 256)
    with torch.no_grad():
        _check(mod(x), ref, torch.bfloat16)
    torch._dynamo.reset()
    out = cc.compile(torch.nn.Sequential(lin), plan=[("*", "w4a16")], progress=False, release_weights=False)(x)
    assert REPORTS[-1].decisions[0].extra["layout"] == "tiles"
    _check(out, ref, torch.bfloat16)
