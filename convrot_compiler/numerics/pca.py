"""DiRotQ's numerics (arXiv 2605.16732), the plain-torch reference every kernel of the method is checked against.

For a linear whose input's second moment C = E[x^T x] was calibrated, block-diagonally in blocks of b channels
(``block_shape``: one block up to 3072 inputs; FLUX's 12288- and 15360-wide inputs in blocks of 3072, which
keeps the calibration, the bases and the rotation's cost that of a 3072-wide layer):

* each block's basis B_j: the eigenvectors of C_j by descending eigenvalue (PCA), stored in the activations'
  dtype; each block of an activation row is rotated once, z_j = x_j B_j;
* the first r_b coefficients of each block (its high-variance subspace, r_b = ``high_precision_fraction`` * b
  rounded to whole groups) stay in 16 bits: z_hi, the blocks' side by side;
* the other b - r_b of each block, side by side, are quantized to int4 per token in groups of ``group_size``
  (one scale per token and group), optionally after a regular Hadamard over each group (``hadamard="regular"``);
* the weight goes into the same bases, W'_j = W_j B_j^-T, computed against the stored (rounded) B_j so that
  z_j W'_j^T = x_j W_j^T to float precision; its 16-bit columns side by side as z_hi's, the rest int4 per output
  channel and group, by round-to-nearest or by GPTQ with the Hessian carried into the same bases.

    y = z_hi W_hi^T + sum_g s_x[:, g] s_w[:, g] (q_x,g q_w,g^T) (+ b)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .gptq import gptq_quantize
from .hadamard import check_group_size, hadamard_matrix, rotate, rotate_with
from .quant import check_in_features, pack_int4, quantize_symmetric, unpack_int4, with_bias

PCA_HADAMARD = ("none", "regular")
WEIGHT_METHODS = ("rtn", "gptq")
PCA_ROTATIONS = {"pca": "none", "pca-hadamard": "regular"}  # DiRotQ's rotation names -> the Hadamard per int4 group


def default_group_size(rotation: object) -> int:
    """DiRotQ quantizes in groups of 64 (its published configuration); ConvRot rotates groups of 256."""
    return 64 if rotation in PCA_ROTATIONS else 256


def needs_calibration(rotation: object, weights: str) -> bool:
    """Whether a method reads a calibration: DiRotQ's rotations (the PCA basis) and GPTQ weights (the Hessian)."""
    return rotation in PCA_ROTATIONS or weights == "gptq"


PCA_BLOCK = 3072  # the widest input with one basis; wider ones take blocks of at most this many channels


def block_shape(in_features: int, group_size: int = 64, block: int = PCA_BLOCK) -> tuple[int, int]:
    """(blocks, channels per block) of a K-wide input: one block up to ``block`` channels, else the fewest equal
    blocks of at most ``block`` channels that split into whole groups (one block when none do)."""
    if in_features <= block:
        return 1, in_features
    for n in range(-(-in_features // block), in_features // group_size + 1):
        if in_features % n == 0 and (in_features // n) % group_size == 0:
            return n, in_features // n
    return 1, in_features


def as_blocks(second_moment: torch.Tensor) -> torch.Tensor:
    """A second moment as blocks [n, b, b]: a [K, K] matrix is one block."""
    if second_moment.dim() == 2:
        second_moment = second_moment.unsqueeze(0)
    if second_moment.dim() != 3 or second_moment.shape[1] != second_moment.shape[2]:
        raise ValueError(f"a second moment is [K, K] or blocks [n, b, b], got shape {tuple(second_moment.shape)}")
    return second_moment


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
    """A linear's weight prepared for DiRotQ. ``basis`` [n, b, b] (n blocks of b inputs) and ``w_hi`` [N, n r_b]
    in the activations' dtype; ``values``: the other n (b - r_b) columns as int4 packed per pair of groups where
    they pair up (``int4_pack``), int8 [N, n (b - r_b) / 2]; ``scale``: float32 [N, n (b - r_b) / group_size].
    ``rank`` is r_b, the 16-bit columns of each block."""

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
        return unpack_int4(self.values, int4_pack(2 * self.values.shape[1], self.group_size))

    def nbytes(self, include_basis: bool = True) -> int:
        """Bytes of its tensors; ``include_basis`` False leaves out the basis, which linears of one input share."""
        tensors = self.graph_tensors() if include_basis else self.graph_tensors()[1:]
        return sum(t.numel() * t.element_size() for t in tensors)


def int4_pack(width: int, group_size: int) -> int:
    """The ``pack_int4`` group of DiRotQ's int4 columns, ``width`` of them: pairs of quantization groups (2 G) where
    the groups pair up, so that byte j of a pair holds group 2p's value j in its low nibble and group 2p + 1's in
    its high one (each nibble half is then one group's whole MMA operand, the sm_90 GEMM's stages of two groups);
    else one group (its first half in the low nibbles)."""
    return 2 * group_size if width % (2 * group_size) == 0 else group_size


def pairs_from_group_packed(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """DiRotQ int4 values packed per group (an older checkpoint's layout) in ``int4_pack``'s layout."""
    width = 2 * values.shape[-1]
    return pack_int4(unpack_int4(values, group_size), int4_pack(width, group_size))


def pca_rank(in_features: int, high_precision_fraction: float, group_size: int) -> int:
    """The 16-bit columns of each block of a K-wide input (``PCAWeight.rank``), without preparing anything."""
    return high_precision_rank(block_shape(in_features, group_size)[1], high_precision_fraction, group_size)


def pca_shapes(out_features: int, in_features: int, high_precision_fraction: float, group_size: int,
               dtype: torch.dtype = torch.bfloat16) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{tensor: (shape, dtype)} of a prepared DiRotQ weight (``PCAWeight``'s fields), without preparing it;
    ``dtype``: the activations', of the basis and the 16-bit columns."""
    n, b = block_shape(in_features, group_size)
    r = n * pca_rank(in_features, high_precision_fraction, group_size)
    lo = in_features - r
    return {"basis": ((n, b, b), dtype), "w_hi": ((out_features, r), dtype),
            "values": ((out_features, lo // 2), torch.int8), "scale": ((out_features, lo // group_size), torch.float32)}


def pca_nbytes(out_features: int, in_features: int, high_precision_fraction: float, group_size: int,
               dtype_bytes: int = 2) -> int:
    """Bytes of a prepared DiRotQ weight, without preparing it (the basis counted whole, though linears reading
    one input share it)."""
    dtype = {1: torch.int8, 2: torch.bfloat16, 4: torch.float32}[dtype_bytes]
    shapes = pca_shapes(out_features, in_features, high_precision_fraction, group_size, dtype)
    return sum(math.prod(shape) * dt.itemsize for shape, dt in shapes.values())


def _check(weight: torch.Tensor, second_moment: torch.Tensor, group_size: int, hadamard: str, weights: str) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    k = weight.shape[1]
    blocks = as_blocks(second_moment)
    if blocks.shape[0] * blocks.shape[1] != k:
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


def pca_bases(second_moment: torch.Tensor) -> torch.Tensor:
    """Each block's PCA basis (``pca_basis``), float32 [n, b, b]."""
    return torch.stack([pca_basis(c)[0] for c in as_blocks(second_moment)])


def pca_quantize_weight(weight: torch.Tensor, second_moment: torch.Tensor, high_precision_fraction: float = 0.125,
                        group_size: int = 64, hadamard: str = "none", weights: str = "rtn", damp: float = 0.01,
                        dtype: torch.dtype | None = None, basis: torch.Tensor | None = None,
                        gptq: dict | None = None) -> PCAWeight:
    """Prepare ``weight`` [N, K] for DiRotQ from its input's second moment, [K, K] or blocks [n, b, b] (see the
    module docstring). ``dtype``: of the basis and the 16-bit columns (default: the weight's); ``basis``: the
    blocks' PCA bases in that dtype when the caller has them already (shared by the linears of one input);
    ``gptq``: more options of ``gptq_quantize`` (its ``dtype`` and ``solver``)."""
    _check(weight, second_moment, group_size, hadamard, weights)
    moments = as_blocks(second_moment).to(weight.device).double()
    n_out, k = weight.shape
    nb, b = moments.shape[:2]
    dtype = dtype or weight.dtype
    r = high_precision_rank(b, high_precision_fraction, group_size)
    if basis is None:
        basis = pca_bases(moments).to(dtype)
    elif basis.shape != (nb, b, b) or basis.dtype != dtype:
        raise ValueError(f"basis must be [{nb}, {b}, {b}] in {dtype}, got {tuple(basis.shape)} {basis.dtype}")
    bd = basis.double()
    w = weight.double().reshape(n_out, nb, b)
    w_rot = torch.stack([torch.linalg.solve(bd[j], w[:, j].T).T for j in range(nb)], 1)  # W_j B_j^-T
    w_hi = w_rot[:, :, :r].reshape(n_out, nb * r)
    w_lo = _rotate_lo(w_rot[:, :, r:].reshape(n_out, nb * (b - r)), group_size, hadamard)
    lo = nb * (b - r)
    if weights == "gptq":
        c = torch.block_diag(*[(bd[j].T @ moments[j] @ bd[j])[r:, r:] for j in range(nb)])
        h = _rotate_lo(_rotate_lo(c, group_size, hadamard).T, group_size, hadamard)
        q, scale = gptq_quantize(w_lo, h, 4, group_size=group_size, damp=damp, **(gptq or {}))
    else:
        q, scale = quantize_symmetric(w_lo.reshape(n_out, lo // group_size, group_size), 4)
        q = q.reshape(n_out, lo)
    return PCAWeight(basis, w_hi.to(dtype), pack_int4(q, int4_pack(lo, group_size)), scale.float(), k, n_out, r,
                     group_size, hadamard, weights)


def pca_rotate_quantize(x: torch.Tensor, basis: torch.Tensor, h: torch.Tensor | None, rank: int,
                        group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (z_hi [M, n r] in x's dtype, int8 values [M, n (b - r)] in [-7, 7], float32 scales
    [M, n (b - r) / G]): each block z_j = x_j B_j in float32 (``basis`` [n, b, b]), its first ``rank``
    columns kept, the rest of every block side by side, multiplied group by group by ``h`` [G, G] (None: not at
    all) and quantized per token and group."""
    m = x.shape[0]
    nb, b = basis.shape[:2]
    z = torch.einsum("mjk,jkc->mjc", x.float().reshape(m, nb, b), basis.float())
    lo = rotate_with(z[:, :, rank:].reshape(m, -1), None if h is None else h.float(), group_size)
    q, s = quantize_symmetric(lo.reshape(m, -1, group_size), 4)
    return z[:, :, :rank].reshape(m, -1).to(x.dtype), q.reshape(m, -1), s


def group_int_gemm(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                   group_size: int) -> torch.Tensor:
    """float32 [M, N] = sum over groups g of (qa_g qw_g^T, exact) * sa[:, g] * sw[:, g]."""
    m, lo = qa.shape
    groups = lo // group_size
    exact = torch.einsum("mgk,ngk->gmn", qa.double().reshape(m, groups, group_size),
                         qw.double().reshape(qw.shape[0], groups, group_size)).float()
    return (exact * sa.T.unsqueeze(-1) * sw.T.unsqueeze(1)).sum(0)


def pca_matmul(z_hi: torch.Tensor, qa: torch.Tensor, sa: torch.Tensor, w_hi: torch.Tensor, qw_packed: torch.Tensor,
               sw: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """The DiRotQ GEMM: z_hi w_hi^T + the group-scaled int4 product of the rest (+ bias), in z_hi's dtype."""
    qw = unpack_int4(qw_packed, int4_pack(qa.shape[1], group_size))
    out = z_hi.float() @ w_hi.float().T + group_int_gemm(qa, sa, qw, sw, group_size)
    return with_bias(out, bias).to(z_hi.dtype)


def pca_linear(x: torch.Tensor, pw: PCAWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The DiRotQ linear, the reference way: x [..., K] -> [..., N] in x's dtype."""
    check_in_features(x, pw.in_features)
    lead = x.shape[:-1]
    z_hi, q, s = pca_rotate_quantize(x.reshape(-1, x.shape[-1]), pw.basis, pw.hadamard_matrix(), pw.rank,
                                     pw.group_size)
    return pca_matmul(z_hi, q, s, pw.w_hi, pw.values, pw.scale, bias, pw.group_size).reshape(*lead, pw.out_features)
