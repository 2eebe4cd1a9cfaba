"""Hadamard matrices and the group-wise ("Conv") rotation of ConvRot.

The regular Hadamard R_n (n = 4^k) is the k-th Kronecker power of

    R4 = [[ 1,  1,  1, -1],
          [ 1,  1, -1,  1],
          [ 1, -1,  1,  1],
          [-1,  1,  1,  1]]

scaled by 1/sqrt(n). Every row of the unscaled matrix sums to sqrt(n), so the
all-ones direction maps to all-ones: a token whose channels share a common
offset stays flat after rotation instead of collapsing into one huge outlier, as
it does under a Sylvester (Walsh) Hadamard.

Fast form. R4 = D4 . S4 . P4 . D4 with D4 = diag(1, 1, 1, -1), S4 the 4x4
Sylvester matrix and P4 the permutation swapping entries 1 and 2. Kronecker
powers keep the factorisation, so for a row vector x

    x @ R_n = (fwht(x * d_n) / sqrt(n))[perm_n] * d_n

with d_n the Kronecker power of (1, 1, 1, -1) and perm_n the Kronecker power
of P4. The trailing permutation and sign flip change neither a per-token absmax
nor symmetric rounding, and cancel in (xR)(WR)^T when the weights are rotated
the same way, so kernels may stop after the butterfly: see ``fast_rotate``.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch

RotationKind = Literal["regular", "sylvester", "none"]
ROTATION_KINDS: tuple[str, ...] = ("regular", "sylvester", "none")

_R4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))
_D4 = (1, 1, 1, -1)
_P4 = (0, 2, 1, 3)


def is_power_of_four(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0 and (n.bit_length() - 1) % 2 == 0


def _check_power_of_four(n: int) -> int:
    if not isinstance(n, int) or not is_power_of_four(n) or n < 4:
        raise ValueError(
            f"regular Hadamard size must be a power of 4 (4, 16, 64, 256, 1024, ...), got {n!r}"
        )
    return (n.bit_length() - 1) // 2


def _kron_power(base: torch.Tensor, k: int) -> torch.Tensor:
    out = base
    for _ in range(k - 1):
        out = torch.kron(out, base)
    return out


@functools.lru_cache(maxsize=64)
def _regular_unscaled(n: int) -> torch.Tensor:
    k = _check_power_of_four(n)
    return _kron_power(torch.tensor(_R4, dtype=torch.float64), k)


@functools.lru_cache(maxsize=64)
def _sylvester_unscaled(n: int) -> torch.Tensor:
    if not isinstance(n, int) or n < 2 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard size must be a power of 2 (>= 2), got {n!r}")
    h2 = torch.tensor(((1, 1), (1, -1)), dtype=torch.float64)
    return _kron_power(h2, n.bit_length() - 1)


@functools.lru_cache(maxsize=128)
def regular_hadamard(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The normalised regular Hadamard matrix of size n (a power of 4): symmetric,
    orthogonal and its own inverse. Cached per (n, dtype, device); do not modify it."""
    return (_regular_unscaled(n) / math.sqrt(n)).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=128)
def sylvester_hadamard(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The normalised Sylvester (Walsh) Hadamard matrix of size n (a power of 2)."""
    return (_sylvester_unscaled(n) / math.sqrt(n)).to(dtype=dtype, device=device)


def hadamard_matrix(
    kind: RotationKind, n: int, dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """The n x n rotation of a kind, or None for ``"none"``."""
    if kind == "regular":
        return regular_hadamard(n, dtype, device)
    if kind == "sylvester":
        return sylvester_hadamard(n, dtype, device)
    if kind == "none":
        return None
    raise ValueError(f"unknown rotation kind {kind!r}; choose one of {ROTATION_KINDS}")


def padded_size(k: int, group_size: int) -> int:
    """K rounded up to a multiple of the group size."""
    return -(-k // group_size) * group_size


def pad_last_dim(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Zero-pad the last dimension up to a multiple of ``group_size``."""
    k = x.shape[-1]
    kp = padded_size(k, group_size)
    if kp == k:
        return x
    return torch.nn.functional.pad(x, (0, kp - k))


def check_group_size(kind: RotationKind, group_size: int) -> None:
    if kind not in ROTATION_KINDS:
        raise ValueError(f"unknown rotation kind {kind!r}; choose one of {ROTATION_KINDS}")
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even integer >= 2, got {group_size!r}")
    if kind == "regular":
        _check_power_of_four(group_size)
    elif kind == "sylvester" and group_size & (group_size - 1):
        raise ValueError(f"Sylvester rotation needs a power-of-2 group_size, got {group_size}")


def rotate(x: torch.Tensor, group_size: int = 256, kind: RotationKind = "regular") -> torch.Tensor:
    """Block-diagonal rotation of the last dimension, ``group_size`` channels at a time.

    When K is not a multiple of ``group_size`` the last dimension is zero-padded to
    the next multiple first, so the result has ``padded_size(K, group_size)``
    channels. Weights must be padded and rotated the same way along their input
    dimension: zero channels contribute nothing to the product, and since each
    block is orthogonal, ``rotate(x) @ rotate(W).T == x @ W.T`` up to rounding.
    Computed in float32 (or float64 for float64 input) and returned in that dtype.
    """
    check_group_size(kind, group_size)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    return rotate_with(x.to(work), hadamard_matrix(kind, group_size, work, x.device), group_size)


def rotate_with(x: torch.Tensor, h: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """Zero-pad the last dimension to a multiple of ``group_size`` and multiply every group by the
    [group_size, group_size] matrix ``h`` (None: pad only), in x's dtype."""
    x = pad_last_dim(x, group_size)
    if h is None:
        return x
    shape = x.shape
    return (x.reshape(*shape[:-1], shape[-1] // group_size, group_size) @ h.to(x.dtype)).reshape(shape)


@functools.lru_cache(maxsize=32)
def regular_fast_form(n: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(signs d_n, permutation perm_n) of the fast form x R = (fwht(x*d)/sqrt(n))[perm] * d."""
    k = _check_power_of_four(n)
    d = _kron_power(torch.tensor(_D4, dtype=torch.float64), k)
    p = torch.zeros(4, 4, dtype=torch.float64)
    p[torch.arange(4), torch.tensor(_P4)] = 1.0
    perm = _kron_power(p, k).argmax(dim=1)
    return d.to(device=device, dtype=torch.float32), perm.to(device)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform of the last dimension (a power of 2),
    in Sylvester order: ``fwht(x) == x @ sylvester_unscaled``. O(n log n) butterflies."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-2 length, got {n}")
    shape = x.shape
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(shape)


def fast_rotate(x: torch.Tensor, group_size: int = 256, finish: bool = True) -> torch.Tensor:
    """Regular group-wise rotation as sign flip + butterfly (+ permutation and sign flip).

    With ``finish=True`` this equals ``rotate(x, group_size, "regular")``. With
    ``finish=False`` the trailing signed permutation is skipped: the result is a
    signed permutation of the regular rotation within every group, which leaves
    per-token absmax, symmetric rounding and (xR)(WR)^T unchanged.
    """
    d, perm = regular_fast_form(group_size, x.device)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = pad_last_dim(x.to(work), group_size)
    shape = x.shape
    g = x.reshape(*shape[:-1], shape[-1] // group_size, group_size) * d.to(work)
    y = fwht(g) / math.sqrt(group_size)
    if finish:
        y = y[..., perm] * d.to(work)
    return y.reshape(shape)
