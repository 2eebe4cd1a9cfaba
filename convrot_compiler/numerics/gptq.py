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
    return absmax / m


def _round(w: torch.Tensor, scale: torch.Tensor, m: int) -> torch.Tensor:
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe.unsqueeze(-1)).clamp_(-m, m)
    return torch.where((scale > 0).unsqueeze(-1), q, torch.zeros_like(q))


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = None,
                  damp: float = 0.01, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` [N, K] with GPTQ. ``hessian`` [K, K]: the inputs' second moment (any positive
    multiple). ``group_size`` None: one scale per output channel, float32 [N]; else one per channel and
    group of ``group_size`` inputs, float32 [N, K / group_size]. Returns (int8 values [N, K], scale)."""
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"the Hessian must be [{k}, {k}] for a weight of {k} inputs, got {tuple(hessian.shape)}")
    if group_size is not None and (k % group_size or block % group_size and group_size % block):
        raise ValueError(f"{k} inputs do not split into groups of {group_size} that line up with blocks of {block}")
    if not torch.isfinite(weight).all() or not torch.isfinite(hessian).all():
        raise ValueError("GPTQ needs a finite weight and Hessian")
    m = qmax(bits)
    w = weight.double().clone()
    u = damped_inverse_cholesky(hessian.to(w.device), damp)
    q = torch.zeros(n, k, dtype=torch.int8, device=w.device)
    if group_size is None:
        scale = _scale_of(w, m)
    else:
        scale = torch.zeros(n, k // group_size, dtype=torch.float64, device=w.device)
    for start in range(0, k, block):
        end = min(start + block, k)
        wb = w[:, start:end].clone()
        err = torch.zeros_like(wb)
        ub = u[start:end, start:end]
        for j in range(end - start):
            col = start + j
            if group_size is not None and col % group_size == 0:
                ahead = torch.cat([wb[:, j:], w[:, end:]], 1)  # the weights as they stand now
                scale[:, col // group_size] = _scale_of(ahead[:, :group_size], m)
            s = scale if group_size is None else scale[:, col // group_size]
            qj = _round(wb[:, j:j + 1], s, m)[:, 0]
            q[:, col] = qj.to(torch.int8)
            e = (wb[:, j] - qj * s) / ub[j, j]
            wb[:, j:] -= e.unsqueeze(1) * ub[j, j:].unsqueeze(0)
            err[:, j] = e
        w[:, start:end] = wb
        w[:, end:] -= err @ u[start:end, end:]
    return q, scale.float()


def gptq_quantizer(second_moment: torch.Tensor, rotation, damp: float = 0.01):
    """A ``quant.WeightQuantizer`` for ``quantize_weight``: GPTQ with one scale per output channel, the Hessian
    carried into the rotated space of ``rotation`` (R^T C R, C zero-padded to the rotated width). A second moment
    in blocks [n, b, b] (a wide input's calibration) is the block-diagonal Hessian."""
    c = second_moment.double()
    if c.dim() == 3:
        c = torch.block_diag(*c)
    rotated = rotation.apply(rotation.apply(c).T)

    def quantize(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        return gptq_quantize(w, rotated.to(w.device), bits, group_size=None, damp=damp)

    return quantize
