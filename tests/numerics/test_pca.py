"""DiRotQ's reference numerics (numerics/pca.py) and GPTQ (numerics/gptq.py)."""

import pytest
import torch

from convrot_compiler.numerics.error import relative_error
from convrot_compiler.numerics.gptq import gptq_quantize
from convrot_compiler.numerics.pca import high_precision_rank, pca_basis, pca_linear, pca_nbytes, pca_quantize_weight
from convrot_compiler.numerics.quant import quantize_symmetric, quantize_weight, reference_linear
from convrot_compiler.numerics.rotations import GroupHadamardRotation


def dit_like(m: int, k: int, seed: int, rank: int = 16) -> torch.Tensor:
    """Activations with a dominant low-rank subspace, a few outlier channels and per-token offsets."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(k, rank, generator=g)
    x = (torch.randn(m, rank, generator=g) * 5) @ u.T / 4 + 0.5 * torch.randn(m, k, generator=g)
    x[:, :8] *= 20
    return (x + 3 * torch.randn(m, 1, generator=g)).bfloat16()


def test_pca_basis_is_orthonormal_by_descending_variance_and_signed_deterministically():
    x = dit_like(512, 128, seed=0).float()
    c = x.T @ x / 512
    basis, values = pca_basis(c)
    assert torch.allclose(basis.T @ basis, torch.eye(128), atol=1e-5)
    assert torch.all(values[:-1] >= values[1:]) and values[0] > 10 * values[20]
    assert torch.allclose(basis @ torch.diag(values) @ basis.T, c, rtol=1e-4, atol=1e-3 * c.abs().max())
    pivots = basis.abs().argmax(dim=0)
    assert torch.all(basis[pivots, torch.arange(128)] > 0)
    again, _ = pca_basis(c.clone())
    assert torch.equal(basis, again)


def test_high_precision_rank_rounds_to_whole_groups_and_refuses_bad_input():
    assert high_precision_rank(3072, 0.125, 64) == 384  # the published FLUX configuration
    assert high_precision_rank(3072, 0.0, 64) == 0
    assert high_precision_rank(256, 0.01, 64) == 64    # at least one group
    assert high_precision_rank(256, 0.99, 64) == 192   # at least one group quantized
    with pytest.raises(ValueError, match="groups of 64"):
        high_precision_rank(100, 0.125, 64)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        high_precision_rank(256, 1.0, 64)


def test_activations_inside_the_16_bit_subspace_lose_only_16_bit_rounding():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(256, 32, generator=g) @ torch.randn(32, 256, generator=g)).bfloat16()  # rank 32 < r = 64
    w = (torch.randn(96, 256, generator=g) * 0.05).bfloat16()
    c = x.float().T @ x.float()
    ref = x.float() @ w.float().T
    pw = pca_quantize_weight(w, c, 0.25, 64)
    assert pw.rank == 64
    assert relative_error(pca_linear(x, pw), ref) < 0.01
    convrot = quantize_weight(w, "w4a4", GroupHadamardRotation("regular", 256))
    assert relative_error(reference_linear(x, convrot), ref) > 0.05


@pytest.mark.parametrize("seed", [0, 1])
def test_dirotq_beats_convrot_on_dit_like_activations(seed):
    x = dit_like(1024, 512, seed)
    w = (torch.randn(256, 512, generator=torch.Generator().manual_seed(seed)) * 0.02).bfloat16()
    c = x.float().T @ x.float() / 1024
    ref = x.float() @ w.float().T
    dirotq = relative_error(pca_linear(x, pca_quantize_weight(w, c, 0.125, 64, "regular", "gptq")), ref)
    convrot = relative_error(reference_linear(x, quantize_weight(w, "w4a4", GroupHadamardRotation("regular", 256))),
                             ref)
    assert dirotq < 0.5 * convrot, (dirotq, convrot)


def test_the_weight_basis_uses_the_stored_16_bit_basis_and_sizes_match_the_estimate():
    x = dit_like(256, 256, seed=2)
    w = (torch.randn(64, 256) * 0.02).bfloat16()
    c = x.float().T @ x.float()
    pw = pca_quantize_weight(w, c, 0.25, 64)
    assert pw.basis.dtype == torch.bfloat16 and pw.w_hi.shape == (64, 64) and pw.values.shape == (64, 96)
    assert pw.scale.shape == (64, 3) and pw.int_values().abs().max() <= 7
    assert pw.nbytes() == pca_nbytes(64, 256, 0.25, 64)
    with pytest.raises(ValueError, match="another layer or model"):
        pca_quantize_weight(w, c[:128, :128], 0.25, 64)
    with pytest.raises(ValueError, match="weights must be one of"):
        pca_quantize_weight(w, c, 0.25, 64, weights="awq")


def test_gptq_with_an_identity_hessian_is_round_to_nearest():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(3))
    q, s = gptq_quantize(w, torch.eye(256), 4)
    q0, s0 = quantize_symmetric(w, 4)
    assert torch.equal(q, q0) and torch.allclose(s, s0)
    qg, sg = gptq_quantize(w, torch.eye(256), 4, group_size=64)
    q1, s1 = quantize_symmetric(w.reshape(32, 4, 64), 4)
    assert torch.equal(qg, q1.reshape(32, 256)) and torch.allclose(sg, s1)


@pytest.mark.parametrize("group_size", [None, 64])
def test_gptq_lowers_the_output_error_on_correlated_inputs(group_size):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2048, 16, generator=g) @ torch.randn(16, 256, generator=g) + 0.1 * torch.randn(2048, 256, generator=g)
    w = torch.randn(64, 256, generator=g)
    h = x.T @ x / 2048
    q, s = gptq_quantize(w, h, 4, group_size=group_size)
    if group_size is None:
        q0, s0 = quantize_symmetric(w, 4)
        deq, deq0 = q.float() * s[:, None], q0.float() * s0[:, None]
    else:
        q0, s0 = quantize_symmetric(w.reshape(64, 4, 64), 4)
        deq = (q.float().reshape(64, 4, 64) * s[..., None]).reshape(64, 256)
        deq0 = (q0.float() * s0[..., None]).reshape(64, 256)
    assert q.abs().max() <= 7
    assert relative_error(x @ deq.T, x @ w.T) < 0.5 * relative_error(x @ deq0.T, x @ w.T)


def test_gptq_takes_a_rank_deficient_hessian_and_refuses_non_finite_input():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 128, generator=g)  # 8 tokens for 128 inputs: H has rank 8
    w = torch.randn(16, 128, generator=g)
    q, s = gptq_quantize(w, x.T @ x, 4)
    assert torch.isfinite(s).all() and q.abs().max() <= 7
    with pytest.raises(ValueError, match="finite"):
        gptq_quantize(w * float("nan"), x.T @ x, 4)
    with pytest.raises(ValueError, match=r"\[128, 128\]"):
        gptq_quantize(w, torch.eye(64), 4)


def test_wide_inputs_split_into_equal_blocks_of_whole_groups():
    from convrot_compiler.numerics.pca import block_shape

    assert block_shape(3072) == (1, 3072)
    assert block_shape(12288) == (4, 3072) and block_shape(15360) == (5, 3072)  # FLUX's MLP-down and proj_out
    assert block_shape(512, 64, block=192) == (4, 128)
    assert block_shape(4000, 64) == (1, 4000)  # no equal split into groups of 64: one block


def test_a_block_diagonal_calibration_gives_a_block_diagonal_dirotq_linear():
    from convrot_compiler.numerics.pca import pca_rotate_quantize

    x = torch.cat([dit_like(512, 256, seed=7), dit_like(512, 256, seed=8)], dim=1)
    w = (torch.randn(128, 512, generator=torch.Generator().manual_seed(9)) * 0.02).bfloat16()
    blocks = x.float().reshape(512, 2, 256).transpose(0, 1)
    moments = blocks.transpose(1, 2) @ blocks / 512
    pw = pca_quantize_weight(w, moments, 0.125, 64)
    assert pw.basis.shape == (2, 256, 256) and pw.rank == 64 and pw.w_hi.shape == (128, 128)
    assert pw.values.shape == (128, 384 // 2) and pw.scale.shape == (128, 6)
    z_hi, q, s = pca_rotate_quantize(x, pw.basis, None, pw.rank, 64)
    block0 = x[:, :256].float() @ pw.basis[0].float()
    assert torch.equal(z_hi[:, :64], block0[:, :64].bfloat16())  # block 0's 16-bit columns come first
    ref = x.float() @ w.float().T
    convrot = relative_error(reference_linear(x, quantize_weight(w, "w4a4", GroupHadamardRotation("regular", 256))), ref)
    assert relative_error(pca_linear(x, pw), ref) < 0.5 * convrot


def test_dirotq_int4_is_packed_per_pair_of_groups_where_they_pair_up():
    from convrot_compiler.numerics.pca import int4_pack, pairs_from_group_packed
    from convrot_compiler.numerics.quant import pack_int4, unpack_int4

    assert int4_pack(2688, 64) == 128 and int4_pack(192, 64) == 64 and int4_pack(64, 64) == 64
    q = torch.randint(-7, 8, (3, 256), dtype=torch.int8)
    paired = pack_int4(q, 128)
    # byte j of a pair: group 2p's value j in the low nibble, group 2p + 1's in the high one
    assert torch.equal(unpack_int4(paired, 128), q)
    assert torch.equal((paired[:, :64] << 4) >> 4, q[:, :64]) and torch.equal(paired[:, :64] >> 4, q[:, 64:128])
    assert torch.equal(pairs_from_group_packed(pack_int4(q, 64), 64), paired)
    odd = torch.randint(-7, 8, (3, 192), dtype=torch.int8)
    assert torch.equal(pairs_from_group_packed(pack_int4(odd, 64), 64), pack_int4(odd, 64))
