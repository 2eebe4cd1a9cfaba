"""Inductor's kernel choices for the rewritten graph (the ``lower`` stage), where they differ from its defaults.

Inductor compiles a row reduction (a LayerNorm's mean and variance) persistent, the whole row held in registers
and read once, only up to 1024 values; a wider row is looped over, and a LayerNorm then reads it twice. FLUX's
adaLN LayerNorm + modulation kernels (3072 channels) ran looped at 40-45% of copy speed. Their persistent forms,
which Inductor's multi-kernel timing picked over the looped ones, took the single blocks' kernel from 1.65 ms to
0.78 ms of a forward and the double blocks' two from 0.64 and 0.53 to 0.42 and 0.33 (H200; docs/PERFORMANCE.md).
``persistent_rows`` makes that choice without the multi-kernel, whose compiled code fails when Inductor loads it
back from its cache (torch 2.11, triton 3.6).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import sympy

if TYPE_CHECKING:
    from ..config import ConvRotConfig

PERSISTENT_ROW_LIMIT = 4096  # values per row: FLUX.1's and Qwen-Image's 3072 channels, the width measured


def _inner_hint():
    from torch._inductor.runtime.hints import ReductionHint

    return ReductionHint.INNER


def persistent_row(features) -> bool:
    """Whether a reduction is a row reduction (Inductor's INNER hint) over a static length of more than Inductor's
    own limit (1024) and at most PERSISTENT_ROW_LIMIT values: the ones ``persistent_rows`` compiles persistent."""
    numel = getattr(features, "reduction_numel", None)
    if not isinstance(numel, (int, sympy.Integer)) or not hasattr(features, "get_reduction_hint"):
        return False
    return features.get_reduction_hint() == _inner_hint() and 1024 < int(numel) <= PERSISTENT_ROW_LIMIT


def _choices_class():
    from torch._inductor.choices import InductorChoices

    class PersistentRows(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, *args, **kwargs) -> bool:
            from torch._inductor import config

            cooperative = kwargs.get("cooperative_reduction", args[0] if args else False)
            if config.triton.persistent_reductions and not cooperative and persistent_row(features):
                return True
            return InductorChoices.should_use_persistent_reduction(features, *args, **kwargs)

    return PersistentRows


@contextlib.contextmanager
def persistent_rows(enabled: bool = True) -> Iterator[None]:
    """Inductor's choices inside the ``with``: row reductions of up to PERSISTENT_ROW_LIMIT values persistent
    (``enabled``), else Inductor's own."""
    if not enabled:
        yield
        return
    from torch._inductor.virtualized import V

    with V.set_choices_handler(_choices_class()()):
        yield


def inductor_cache_patch(config: "ConvRotConfig") -> dict:
    """compile_fx's keyword arguments for ``config``'s choices. Inductor's FX graph cache does not key on the
    choices handler, so a graph compiled with Inductor's own choices (``persistent_rows=False``) skips that cache:
    it then holds only the persistent form, and a cached graph always comes back in the form its option asks for."""
    return {} if config.persistent_rows else {"config_patches": {"fx_graph_cache": False}}
