"""Inductor's kernel choices for the rewritten graph (the ``lower`` stage), where they differ from its defaults.

Inductor compiles a row reduction (a LayerNorm's mean and variance) persistent, the whole row held in registers
and read once, only up to 1024 values; a wider row is looped over, and a LayerNorm then reads it twice. FLUX's
adaLN LayerNorm + modulation kernels (3072 channels) ran looped at 40-45% of copy speed. Their persistent forms,
which Inductor's multi-kernel timing picked over the looped ones, took the single blocks' kernel from 1.65 ms to
0.78 ms of a forward and the double blocks' two from 0.64 and 0.53 to 0.42 and 0.33 (H200; docs/PERFORMANCE.md).
``persistent_rows`` makes that choice without the multi-kernel, whose compiled code fails when Inductor loads it
back from its cache (torch 2.11, triton 3.6). ``inductor_choices`` sets it for a compile, with a cache tag that
keeps each choice's graphs apart in Inductor's FX graph cache.
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


CHOICES_CACHE_VERSION = 1  # raise when a choice's code changes: graphs cached with the old one then miss


def choices_cache_tag(config: "ConvRotConfig") -> str:
    """What Inductor's FX graph cache keys a graph compiled with ``config``'s choices on, beside the graph. The
    cache does not key on the choices handler; without this, a graph cached under one choice (or by an earlier
    version of the package) would come back in its form under the other."""
    return f"convrot-inductor-choices:v{CHOICES_CACHE_VERSION}:persistent_rows={int(config.persistent_rows)}"


@contextlib.contextmanager
def inductor_choices(config: "ConvRotConfig") -> Iterator[None]:
    """Inside the ``with``: Inductor's choices for ``config`` (``persistent_rows``), and its FX graph cache keyed
    on them (torch.compiler.config.cache_key_tag, the tag already set kept in front)."""
    import torch.compiler.config as compiler_config

    tag = "|".join(t for t in (compiler_config.cache_key_tag, choices_cache_tag(config)) if t)
    with persistent_rows(config.persistent_rows), compiler_config.patch(cache_key_tag=tag):
        yield
