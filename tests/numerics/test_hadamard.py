import math

import pytest
import torch

from convrot_compiler.numerics.hadamard import (
    fast_rotate,
    fwht,
    is_power_of_four,
    padded_size,
    regular_hadamard,
    rotate,
    sylvester_hadamard,
)

SIZES = [4, 16, 64, 256]


@pytest.mark.parametrize("n", SIZES)
def test_regular_is_symmetric_orthogonal_involutory(n):
    h = regular_hadamard(n, torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.equal(h, h.T)
    torch.testing.assert_close(h @ h.T, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(h @ h, eye, atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", SIZES)
def test_regular_row_sums_are_sqrt_n(n):
    unscaled = regular_hadamard(n, torch.float64) * math.sqrt(n)
    assert torch.equal(unscaled.abs(), torch.ones(n, n, dtype=torch.float64))
    torch.testing.assert_close(unscaled.sum(dim=1), torch.full((n,), math.sqrt(n), dtype=torch.float64))


@pytest.mark.parametrize("n", SIZES)
def test_all_ones_stays_flat_under_regular_but_spikes_under_sylvester(n):
    ones = torch.ones(n, dtype=torch.float64)
    torch.testing.assert_close(ones @ regular_hadamard(n, torch.float64), ones)
    syl = ones @ sylvester_hadamard(n, torch.float64)
    assert syl[0].item() == pytest.approx(math.sqrt(n))
    assert syl[1:].abs().max().item() < 1e-12


@pytest.mark.parametrize("bad", [0, 1, 2, 8, 32, 128, 100, -4])
def test_regular_rejects_sizes_that_are_not_powers_of_four(bad):
    with pytest.raises(ValueError, match="power of 4"):
        regular_hadamard(bad)


def test_sylvester_rejects_non_powers_of_two():
    with pytest.raises(ValueError, match="power of 2"):
        sylvester_hadamard(12)


def test_matrices_are_cached_per_dtype_and_device():
    assert regular_hadamard(16, torch.float32) is regular_hadamard(16, torch.float32)
    assert regular_hadamard(16, torch.float32) is not regular_hadamard(16, torch.float64)


@pytest.mark.parametrize("kind", ["regular", "sylvester", "none"])
def test_rotation_preserves_products_with_padding(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 300, generator=g, dtype=torch.float64)
    w = torch.randn(7, 300, generator=g, dtype=torch.float64)
    xr, wr = rotate(x, 64, kind), rotate(w, 64, kind)
    assert xr.shape == (5, padded_size(300, 64)) == (5, 320)
    torch.testing.assert_close(xr @ wr.T, x @ w.T, atol=1e-10, rtol=0)


def test_rotation_is_block_diagonal():
    x = torch.zeros(1, 512, dtype=torch.float64)
    x[0, 300] = 1.0
    y = rotate(x, 256, "regular")
    assert y[0, :256].abs().max() == 0 and y[0, 256:].abs().min() > 0


def test_rotate_rejects_bad_group_size_and_kind():
    with pytest.raises(ValueError, match="power of 4"):
        rotate(torch.randn(2, 128), 128, "regular")
    with pytest.raises(ValueError, match="unknown rotation kind"):
        rotate(torch.randn(2, 256), 256, "walsh")


def test_fwht_matches_sylvester_matrix():
    x = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ (sylvester_hadamard(64, torch.float64) * 8), atol=1e-10, rtol=0)


@pytest.mark.parametrize("n", SIZES)
def test_fast_form_equals_regular_rotation(n):
    x = torch.randn(6, 2 * n, dtype=torch.float64)
    torch.testing.assert_close(fast_rotate(x, n, finish=True), rotate(x, n, "regular"), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", SIZES)
def test_unfinished_fast_form_is_a_signed_permutation_that_cancels_in_products(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(4, n, generator=g, dtype=torch.float64)
    w = torch.randn(3, n, generator=g, dtype=torch.float64)
    fast, exact = fast_rotate(x, n, finish=False), rotate(x, n, "regular")
    # same multiset of magnitudes per row (so identical per-token absmax and rounding) ...
    torch.testing.assert_close(fast.abs().sort(dim=-1).values, exact.abs().sort(dim=-1).values, atol=1e-12, rtol=0)
    # ... and (xQ)(WQ)^T is still x W^T.
    torch.testing.assert_close(fast @ fast_rotate(w, n, finish=False).T, x @ w.T, atol=1e-10, rtol=0)


def test_is_power_of_four():
    assert [n for n in range(300) if is_power_of_four(n)] == [1, 4, 16, 64, 256]
