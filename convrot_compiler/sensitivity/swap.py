"""Putting modules in and out of a model by name, as the measurements do with quantized linears."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..nn.linear import swap_module


@contextmanager
def swapped(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """``model`` with the modules at the given names replaced, restored on exit."""
    old = {name: swap_module(model, name, m) for name, m in modules.items()}
    try:
        yield
    finally:
        for name, m in old.items():
            swap_module(model, name, m)
