"""Input checks a compiled model runs before each call: a shape that does not fit the model is one
line naming the argument, the expected and the given shape, not a trace through Dynamo and Inductor."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_flux(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """diffusers' FluxTransformer2DModel: hidden_states [B, N, in_channels], encoder_hidden_states
    [B, T, joint_attention_dim], pooled_projections [B, pooled_projection_dim], img_ids [N, 3], txt_ids [T, 3]."""
    cfg = model.config
    names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids")
    given = dict(zip(names, args), **kwargs)
    hidden, text = given.get("hidden_states"), given.get("encoder_hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[-1] != cfg.in_channels:
        raise ValueError(f"hidden_states: expected a tensor of shape (batch, image tokens, {cfg.in_channels}), got "
                         f"{_shape(hidden)}")
    batch, tokens = hidden.shape[:2]
    expected = {"encoder_hidden_states": (batch, "text tokens", cfg.joint_attention_dim),
                "pooled_projections": (batch, cfg.pooled_projection_dim)}
    for name, shape in expected.items():
        t = given.get(name)
        fixed = [(i, n) for i, n in enumerate(shape) if isinstance(n, int)]
        if not isinstance(t, torch.Tensor) or t.dim() != len(shape) or any(t.shape[i] != n for i, n in fixed):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {_shape(t)}".replace("'", ""))
    ids = {"img_ids": tokens, "txt_ids": text.shape[1]}
    for name, rows in ids.items():
        t = given.get(name)
        if not isinstance(t, torch.Tensor) or t.shape[-2:] != (rows, 3):
            raise ValueError(f"{name}: expected shape ({rows}, 3), got {_shape(t)}")
    timestep = given.get("timestep")
    if not isinstance(timestep, torch.Tensor) or timestep.numel() not in (1, batch):
        count = "1 value" if batch == 1 else f"{batch} values (or 1)"
        raise ValueError(f"timestep: expected a tensor of {count}, got {_shape(timestep)}")


INPUT_CHECKS: dict[str, Callable[[nn.Module, tuple, dict], None]] = {"FluxTransformer2DModel": check_flux}


def input_check(model: nn.Module) -> Callable[[tuple, dict], None] | None:
    """The check for ``model``'s class, bound to it, or None for a class without one."""
    check = INPUT_CHECKS.get(type(model).__name__)
    return None if check is None else (lambda args, kwargs: check(model, args, kwargs))
