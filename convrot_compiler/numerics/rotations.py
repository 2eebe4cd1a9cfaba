"""Pluggable activation/weight rotations.

A rotation maps the input dimension K of a linear to K' >= K with an orthogonal
transform Q, applied to activations online and to weights offline, so that
(x Q)(W Q)^T = x W^T. ConvRot uses a block-diagonal regular Hadamard; other
methods (e.g. a calibrated PCA rotation) implement the same two methods and the
rest of the pipeline is unchanged. Only ``GroupHadamardRotation`` has fused GPU
kernels; the compiler reports any other rotation as "no kernel" and leaves the
layer alone rather than run it slowly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .hadamard import ROTATION_KINDS, RotationKind, check_group_size, hadamard_matrix, padded_size, rotate


@runtime_checkable
class Rotation(Protocol):
    name: str

    def padded_features(self, k: int) -> int:
        """Width K' of the rotated space for an input width K."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate the last dimension (width K) into width K', in float32 (float64 stays float64)."""


@dataclass(frozen=True)
class GroupHadamardRotation:
    """ConvRot's rotation: K zero-padded to a multiple of ``group_size``, then each
    group of channels multiplied by the same ``group_size`` Hadamard matrix."""

    kind: RotationKind = "regular"
    group_size: int = 256

    def __post_init__(self) -> None:
        check_group_size(self.kind, self.group_size)

    @property
    def name(self) -> str:
        return f"{self.kind}{self.group_size}" if self.kind != "none" else f"none(pad{self.group_size})"

    def padded_features(self, k: int) -> int:
        return padded_size(k, self.group_size)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return rotate(x, self.group_size, self.kind)

    def kernel_matrix(self) -> torch.Tensor | None:
        """What the fused kernel takes: the 16 x 16 Kronecker factor for 256-groups
        (H_256 = H_16 (x) H_16 for both kinds), the full matrix otherwise, None for no rotation."""
        if self.kind == "none":
            return None
        if self.group_size == 256:
            return hadamard_matrix(self.kind, 16)
        return hadamard_matrix(self.kind, self.group_size)


def make_rotation(rotation: "str | Rotation", group_size: int = 256) -> Rotation:
    """A rotation from its kind name (``regular``, ``sylvester``, ``none``) or a Rotation object."""
    if isinstance(rotation, str):
        if rotation not in ROTATION_KINDS:
            raise ValueError(f"unknown rotation {rotation!r}; choose one of {ROTATION_KINDS} or pass a Rotation")
        return GroupHadamardRotation(rotation, group_size)  # type: ignore[arg-type]
    if isinstance(rotation, Rotation):
        return rotation
    raise TypeError(f"rotation must be a kind name or a Rotation object, got {type(rotation).__name__}")
