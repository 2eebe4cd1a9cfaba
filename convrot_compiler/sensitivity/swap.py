"""Putting modules in and out of a model by name, as the measurements do with quantized linears."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def swap_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``name`` in ``model``; returns the module that was there."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, child)
    setattr(owner, child, module)
    return old


@contextmanager
def swapped(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """``model`` with the modules at the given names replaced, restored on exit."""
    old = {name: swap_module(model, name, m) for name, m in modules.items()}
    try:
        yield
    finally:
        for name, m in old.items():
            swap_module(model, name, m)
