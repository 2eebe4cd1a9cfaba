"""DiRotQ's sm_90 GEMM (kernels/sm90/pca_gemm.py) against the reference, on a GPU (skipped without CUDA)."""

import pytest
import torch

from convrot_compiler.numerics.pca import int4_pack, pca_matmul
from convrot_compiler.numerics.quant import pack_int4

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _operands(m, n, rank, lo, group, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    z_hi = torch.randn(m, rank, generator=g, device="cuda").to(dtype)
    q = torch.randint(-7, 8, (m, lo), generator=g, dtype=torch.int8, device="cuda")
    sa = torch.rand(m, lo // group, generator=g, device="cuda") * 0.1
    w_hi = (torch.randn(n, rank, generator=g, device="cuda") * 0.1).to(dtype)
    qw = pack_int4(torch.randint(-7, 8, (n, lo), generator=g, dtype=torch.int8, device="cuda"),
                   int4_pack(lo, group))
    sw = torch.rand(n, lo // group, generator=g, device="cuda") * 0.01
    bias = torch.randn(n, generator=g, device="cuda").to(dtype)
    return z_hi, q, sa, w_hi, qw, sw, bias


@pytest.mark.parametrize("m,n,rank,lo", [(4608, 3072, 384, 2688), (4608, 3072, 1920, 13440), (77, 80, 64, 256),
                                         (1, 3072, 384, 2688), (300, 136, 0, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_sm90_pca_gemm_matches_the_reference(m, n, rank, lo, dtype, with_bias):
    """One rounding of the output from the reference (float32 sums in another order), on every element: an output
    left unwritten (the buffer is poisoned first) or a group scaled with another's scales would not pass."""
    from convrot_compiler.kernels.sm90.pca_gemm import pca_gemm

    z_hi, q, sa, w_hi, qw, sw, bias = _operands(m, n, rank, lo, 64, dtype, m + n + rank)
    bias = bias if with_bias else None
    ref = pca_matmul(z_hi, q, sa, w_hi, qw, sw, bias, 64).float()
    torch.full((1 << 28,), 0x7F, dtype=torch.uint8, device="cuda")
    out = pca_gemm(z_hi, q, sa, w_hi, qw, sw, bias, 64).float()
    tol = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    bad = (out - ref).abs() > tol * (ref.abs() + ref.abs().mean())
    assert not bad.any(), f"{bad.sum().item()} of {bad.numel()} off, largest {(out - ref).abs().max().item()}"


def test_sm90_pca_gemm_equals_the_triton_kernel_closely():
    from convrot_compiler.kernels.sm90.pca_gemm import pca_gemm
    from convrot_compiler.kernels.triton.pca import pca_gemm as triton_pca_gemm

    ops = _operands(512, 3072, 384, 2688, 64, torch.bfloat16, 1)
    a, b = pca_gemm(*ops, 64).float(), triton_pca_gemm(*ops, 64).float()
    assert (a - b).norm() / b.norm() < 1e-3


def test_sm90_pca_gemm_says_where_it_cannot_run():
    from convrot_compiler.kernels.sm90.pca_gemm import pca_gemm, supported

    z_hi, q, sa, w_hi, qw, sw, bias = _operands(64, 128, 64, 128, 64, torch.bfloat16, 2)
    assert supported(z_hi, q, w_hi, qw, 64) is None
    assert "not a CUDA tensor" in supported(z_hi.cpu(), q.cpu(), w_hi.cpu(), qw.cpu(), 64)
    assert "float32" in str(supported(z_hi.float(), q, w_hi.float(), qw, 64))
    assert "group size 32" in supported(z_hi, q, w_hi, qw, 32) and "group size 128" in supported(z_hi, q, w_hi, qw, 128)
    with pytest.raises(ValueError, match="16-bit width 32"):
        pca_gemm(z_hi[:, :32], q, sa, w_hi[:, :32], qw, sw, bias, 64)
    odd = _operands(64, 128, 64, 192, 64, torch.bfloat16, 3)
    assert "3 groups do not pair up" in supported(odd[0], odd[1], odd[3], odd[4], 64)
