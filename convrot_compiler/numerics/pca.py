"""DiRotQ's numerics (arXiv 2605.16732), the plain-torch reference every kernel of the method is checked against.

For a linear with calibrated input second moment C = E[x^T x] (K x K):

* the basis B: the eigenvectors of C by descending eigenvalue (PCA), stored in the activations' dtype;
  each activation row is rotated once, z = x B;
* the first r coefficients of z (the high-variance subspace, r = ``high_precision_fraction`` * K rounded to
  whole groups) stay in 16 bits;
* the other K - r are quantized to int4 per token in groups of ``group_size`` (one scale per token and
  group), optionally after a group-wise regular Hadamard over each group (``hadamard="regular"``);
* the weight W goes into the same basis as W' = W B^-T, computed against the stored (rounded) B so that
  z W'^T = x W^T holds to float precision; its first r columns stay 16-bit, the rest are int4 per output
  channel and group of ``group_size`` inputs, by round-to-nearest or by GPTQ with the Hessian C carried
  into the same basis.

    y = z[:, :r] W'[:, :r]^T + sum_g s_x[:, g] s_w[:, g] (q_x,g q_w,g^T) (+ b)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gptq import gptq_quantize
from .hadamard import check_group_size, hadamard_matrix, rotate, rotate_with
from .quant import pack_int4, quantize_symmetric, unpack_int4

PCA_HADAMARD = ("none", "regular")
WEIGHT_METHODS = ("rtn", "gptq")


def high_precision_rank(in_features: int, fraction: float, group_size: int) -> int:
    """r: ``fraction`` of the inputs, rounded to whole groups, at least one group below K (so that something
    is quantized) and 0 only for a fraction of 0."""
    if not 0 <= fraction < 1:
        raise ValueError(f"high_precision_fraction must be in [0, 1), got {fraction!r}")
    if in_features % group_size:
        raise ValueError(f"{in_features} inputs do not split into groups of {group_size}")
    groups = in_features // group_size
    if groups < 2 and fraction > 0:
        raise ValueError(f"{in_features} inputs make one group of {group_size}: no room for a 16-bit subspace")
    kept = round(fraction * groups)
    if fraction > 0:
        kept = min(max(kept, 1), groups - 1)
    return kept * group_size


def pca_basis(second_moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(basis [K, K] float32, eigenvalues [K] float32): C's eigenvectors as columns by descending eigenvalue,
    each signed so that its largest entry is positive (the basis is then a function of C alone)."""
    if second_moment.dim() != 2 or second_moment.shape[0] != second_moment.shape[1]:
        raise ValueError(f"a second moment is a square matrix, got shape {tuple(second_moment.shape)}")
    c = second_moment.double()
    values, vectors = torch.linalg.eigh((c + c.T) / 2)
    values, vectors = values.flip(0), vectors.flip(1)
    pivot = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[pivot, torch.arange(vectors.shape[1])])
    vectors = vectors * torch.where(signs == 0, torch.ones_like(signs), signs)
    return vectors.float(), values.clamp_min(0).float()


@dataclass
class PCAWeight:
    """A linear's weight prepared for DiRotQ. ``basis`` [K, K] and ``w_hi`` [N, r] in the activations' dtype;
    ``values``: the other K - r columns as int4 packed per group (``pack_int4``), int8 [N, (K - r) / 2];
    ``scale``: float32 [N, (K - r) / group_size]."""

    basis: torch.Tensor
    w_hi: torch.Tensor
    values: torch.Tensor
    scale: torch.Tensor
    in_features: int
    out_features: int
    rank: int
    group_size: int
    hadamard: str = "none"
    weights: str = "rtn"

    scheme = "w4a4"
    weight_bits = 4
    act_bits = 4

    def hadamard_matrix(self) -> torch.Tensor | None:
        """The [G, G] matrix the quantized subspace is multiplied by, group by group (None: none)."""
        return None if self.hadamard == "none" else hadamard_matrix(self.hadamard, self.group_size)

    def graph_tensors(self) -> list[torch.Tensor]:
        """What a compiled graph takes for this weight, in order."""
        return [self.basis, self.w_hi, self.values, self.scale]

    def int_values(self) -> torch.Tensor:
        """Unpacked int8 values [N, K - r] of the quantized subspace."""
        return unpack_int4(self.values, self.group_size)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.graph_tensors())


def pca_nbytes(out_features: int, in_features: int, high_precision_fraction: float, group_size: int,
               dtype_bytes: int = 2) -> int:
    """Bytes of a prepared DiRotQ weight, without preparing it (the basis counted whole, though linears reading
    one input share it)."""
    r = high_precision_rank(in_features, high_precision_fraction, group_size)
    lo = in_features - r
    return (in_features * in_features + out_features * r) * dtype_bytes + out_features * lo // 2 + \
        4 * out_features * (lo // group_size)


def _check(weight: torch.Tensor, second_moment: torch.Tensor, group_size: int, hadamard: str, weights: str) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    k = weight.shape[1]
    if second_moment.shape != (k, k):
        raise ValueError(f"the calibration's second moment is {tuple(second_moment.shape)}, the weight has {k} inputs: "
                         "it comes from another layer or model")
    if hadamard not in PCA_HADAMARD:
        raise ValueError(f"hadamard must be one of {PCA_HADAMARD}, got {hadamard!r}")
    if hadamard != "none":
        check_group_size(hadamard, group_size)
    if weights not in WEIGHT_METHODS:
        raise ValueError(f"weights must be one of {WEIGHT_METHODS}, got {weights!r}")


def _rotate_lo(t: torch.Tensor, group_size: int, hadamard: str) -> torch.Tensor:
    return t if hadamard == "none" else rotate(t, group_size, hadamard)


def pca_quantize_weight(weight: torch.Tensor, second_moment: torch.Tensor, high_precision_fraction: float = 0.125,
                        group_size: int = 64, hadamard: str = "none", weights: str = "rtn", damp: float = 0.01,
                        dtype: torch.dtype | None = None, basis: torch.Tensor | None = None) -> PCAWeight:
    """Prepare ``weight`` [N, K] for DiRotQ from its input's second moment (see the module docstring).
    ``dtype``: of the basis and the 16-bit columns (default: the weight's); ``basis``: C's PCA basis in that
    dtype when the caller has it already (shared by the linears reading one input)."""
    _check(weight, second_moment, group_size, hadamard, weights)
    n, k = weight.shape
    dtype = dtype or weight.dtype
    r = high_precision_rank(k, high_precision_fraction, group_size)
    if basis is None:
        basis = pca_basis(second_moment.to(weight.device))[0].to(dtype)
    elif basis.shape != (k, k) or basis.dtype != dtype:
        raise ValueError(f"basis must be [{k}, {k}] in {dtype}, got {tuple(basis.shape)} {basis.dtype}")
    b = basis.double()
    w_rot = torch.linalg.solve(b, weight.double().T).T  # W B^-T: z W_rot^T = x B B^-1 W^T
    w_lo = _rotate_lo(w_rot[:, r:], group_size, hadamard)
    lo = k - r
    if weights == "gptq":
        c = b.T @ second_moment.to(weight.device).double() @ b
        h = _rotate_lo(_rotate_lo(c[r:, r:], group_size, hadamard).T, group_size, hadamard)
        q, scale = gptq_quantize(w_lo, h, 4, group_size=group_size, damp=damp)
    else:
        q, scale = quantize_symmetric(w_lo.reshape(n, lo // group_size, group_size), 4)
        q = q.reshape(n, lo)
    return PCAWeight(basis, w_rot[:, :r].to(dtype), pack_int4(q, group_size), scale.float(), k, n, r, group_size,
                     hadamard, weights)


def pca_rotate_quantize(x: torch.Tensor, basis: torch.Tensor, h: torch.Tensor | None, rank: int,
                        group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (z_hi [M, r] in x's dtype, int8 values [M, K - r] in [-7, 7], float32 scales [M, (K - r) / G]):
    z = x B in float32, its first ``rank`` columns kept, the rest multiplied group by group by ``h`` [G, G]
    (None: not at all) and quantized per token and group."""
    m = x.shape[0]
    z = x.float() @ basis.float()
    lo = rotate_with(z[:, rank:], None if h is None else h.float(), group_size)
    q, s = quantize_symmetric(lo.reshape(m, -1, group_size), 4)
    return z[:, :rank].to(x.dtype), q.reshape(m, -1), s


def group_int_gemm(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 [M, N] = sum over groups g of (qa_g qw_g^T, exact) * sa[:, g] * sw[:, g]."""
    m, lo = qa.shape
    groups = lo // group_size
    exact = torch.einsum("mgk,ngk->gmn", qa.double().reshape(m, groups, group_size),
                         qw.double().reshape(qw.shape[0], groups, group_size)).float()
    return (exact * sa.T.unsqueeze(-1) * sw.T.unsqueeze(1)).sum(0)


def pca_matmul(z_hi: torch.Tensor, qa: torch.Tensor, sa: torch.Tensor, w_hi: torch.Tensor, qw_packed: torch.Tensor,
               sw: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """The DiRotQ GEMM: z_hi w_hi^T + the group-scaled int4 product of the rest (+ bias), in z_hi's dtype."""
    out = z_hi.float() @ w_hi.float().T + group_int_gemm(qa, sa, unpack_int4(qw_packed, group_size), sw, group_size)
    if bias is not None:
        out = out + bias.float()
    return out.to(z_hi.dtype)


def pca_linear(x: torch.Tensor, pw: PCAWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The DiRotQ linear, the reference way: x [..., K] -> [..., N] in x's dtype."""
    if x.shape[-1] != pw.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, weight expects {pw.in_features}")
    lead = x.shape[:-1]
    z_hi, q, s = pca_rotate_quantize(x.reshape(-1, x.shape[-1]), pw.basis, pw.hadamard_matrix(), pw.rank,
                                     pw.group_size)
    return pca_matmul(z_hi, q, s, pw.w_hi, pw.values, pw.scale, bias, pw.group_size).reshape(*lead, pw.out_features)
