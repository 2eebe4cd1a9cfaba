"""GPTQ (Frantar et al., 2022): quantize a weight one input channel at a time, spreading each channel's
rounding error over the channels not yet quantized, weighted by the inverse Hessian of the layer's
inputs, H = E[x^T x]. Symmetric, round half to even, values in [-qmax, qmax] as everywhere else here
(quant.py); the scales are those round-to-nearest would take, per output channel or per group of
input channels, each group's computed from the weights as they stand when GPTQ reaches it (the
reference implementation's static-groups-off behaviour).

With H a multiple of the identity GPTQ is round-to-nearest; in a PCA basis H is diagonal, and it is
round-to-nearest again. It pays where the inputs' channels are correlated: after a Hadamard rotation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .quant import qmax


def damped_inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, in float64: row i holds what GPTQ
    divides channel i's error by (its diagonal) and spreads it with. Channels with no signal (a zero
    diagonal) get weight 1 on the diagonal so that they are rounded alone. A Hessian too close to singular
    for that damping (fewer calibration tokens than inputs, float rounding) is damped ten times more, up to
    four times, before this gives up."""
    h = (hessian.double() + hessian.double().T) / 2
    dead = h.diagonal() <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h.diagonal()[dead] = 1
    mean_diag = h.diagonal().mean()
    for attempt in range(5):
        damped = h.clone()
        damped.diagonal().add_(damp * 10**attempt * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            break
    else:
        raise ValueError(f"the Hessian is not positive definite even damped by {damp * 10**4:g} x its mean diagonal: "
                         "calibrate on more tokens")
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True)


def _scale_of(w: torch.Tensor, m: int) -> torch.Tensor:
    absmax = w.abs().amax(dim=-1)
    return absmax / torch.full_like(absmax, m)  # CUDA divides by a Python number through its reciprocal


def _round(w: torch.Tensor, scale: torch.Tensor, m: int) -> torch.Tensor:
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe.unsqueeze(-1)).clamp_(-m, m)
    return torch.where((scale > 0).unsqueeze(-1), q, torch.zeros_like(q))


def quantize_columns(wb: torch.Tensor, ub: torch.Tensor, m: int, scale: torch.Tensor | None,
                     group_size: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ within one block of columns, the step a kernel may take over (kernels/triton/gptq.py does, in
    float32): ``wb`` [N, B] (updated in place) the block's weights as they stand, ``ub`` [B, B] its part of
    the upper Cholesky factor; ``scale`` [N] one per output channel, or None with ``group_size`` dividing B,
    when each group's scales come from the weights as they stand at its first column. Returns (int8 values
    [N, B], the scaled errors [N, B] that the columns after the block take, the group scales [N, B / G] or
    None)."""
    n, b = wb.shape
    q = torch.empty(n, b, dtype=torch.int8, device=wb.device)
    err = torch.empty_like(wb)
    groups = None if scale is not None else torch.empty(n, b // group_size, dtype=wb.dtype, device=wb.device)
    s = scale
    for j in range(b):
        if groups is not None and j % group_size == 0:
            s = groups[:, j // group_size] = _scale_of(wb[:, j:j + group_size], m)
        qj = _round(wb[:, j:j + 1], s, m)[:, 0]
        q[:, j] = qj.to(torch.int8)
        e = (wb[:, j] - qj * s) / ub[j, j]
        wb[:, j:] -= e.unsqueeze(1) * ub[j, j:].unsqueeze(0)
        err[:, j] = e
    return q, err, groups


ColumnSolver = Callable[[torch.Tensor, torch.Tensor, int, "torch.Tensor | None", "int | None"],
                        tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]]


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = None,
                  damp: float = 0.01, block: int = 128, dtype: torch.dtype = torch.float64,
                  solver: ColumnSolver = quantize_columns) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` [N, K] with GPTQ. ``hessian`` [K, K]: the inputs' second moment (any positive
    multiple). ``group_size`` None: one scale per output channel, float32 [N]; else one per channel and
    group of ``group_size`` inputs (a divisor of ``block``), float32 [N, K / group_size]. The weights are
    updated in ``dtype``; ``solver`` does each block's columns (``quantize_columns`` or a kernel's). Returns
    (int8 values [N, K], scale)."""
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"the Hessian must be [{k}, {k}] for a weight of {k} inputs, got {tuple(hessian.shape)}")
    if group_size is not None and (k % group_size or block % group_size):
        raise ValueError(f"{k} inputs do not split into groups of {group_size} that divide blocks of {block}")
    if not torch.isfinite(weight).all() or not torch.isfinite(hessian).all():
        raise ValueError("GPTQ needs a finite weight and Hessian")
    m = qmax(bits)
    w = weight.to(dtype).clone()
    u = damped_inverse_cholesky(hessian.to(w.device), damp).to(dtype)
    q = torch.zeros(n, k, dtype=torch.int8, device=w.device)
    scale = _scale_of(w, m) if group_size is None else torch.zeros(n, k // group_size, dtype=dtype, device=w.device)
    for start in range(0, k, block):
        end = min(start + block, k)
        wb = w[:, start:end].contiguous()
        qb, err, groups = solver(wb, u[start:end, start:end].contiguous(), m,
                                 scale if group_size is None else None, group_size)
        q[:, start:end] = qb
        if groups is not None:
            scale[:, start // group_size:end // group_size] = groups
        w[:, end:] -= err @ u[start:end, end:]
    return q, scale.float()


def gptq_quantizer(second_moment: torch.Tensor, rotation, damp: float = 0.01, dtype: torch.dtype = torch.float64,
                   solver: ColumnSolver = quantize_columns):
    """A ``quant.WeightQuantizer`` for ``quantize_weight``: GPTQ with one scale per output channel, the Hessian
    carried into the rotated space of ``rotation`` (R^T C R, C zero-padded to the rotated width). A second moment
    in blocks [n, b, b] (a wide input's calibration) is the block-diagonal Hessian. ``dtype`` and ``solver``: as
    ``gptq_quantize``'s."""
    c = second_moment.double()
    if c.dim() == 3:
        c = torch.block_diag(*c)
    rotated = rotation.apply(rotation.apply(c).T)

    def quantize(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        return gptq_quantize(w, rotated.to(w.device), bits, group_size=None, damp=damp, dtype=dtype, solver=solver)

    return quantize
