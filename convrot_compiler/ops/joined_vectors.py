"""A fused GEMM's per-linear vectors (channel scales, biases) joined into one, once.

One GEMM computes several linears (FLUX's Q, K, V, and the single blocks' MLP input with them), and its kernel
reads their channel scales and biases as one vector each. Joined on every call, that is two small kernels per fused
GEMM, 152 in a FLUX.1-dev forward. The vectors are prepared weights and parameters, the same tensors at every
call: ``JoinedVectors`` keeps each join while every part is alive and unchanged (quant.contents_key), and joins
again otherwise. Parts that keep no version counter (inference tensors) are joined on every call.
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch

from ..numerics.quant import contents_key


class JoinedVectors:
    """Joins of vector lists, each kept while its parts live unchanged."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, ...], tuple[tuple, tuple, Optional[torch.Tensor]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, parts: list[Optional[torch.Tensor]],
            join: Callable[[], Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
        """``join()``, or what it returned for these parts before while none of them has changed since."""
        state = contents_key(parts)
        if state is None or all(p is None for p in parts):
            return join()
        key = tuple(id(p) for p in parts)
        entry = self._entries.get(key)
        if entry is not None:
            refs, seen, joined = entry
            if seen == state and all((r is None) == (p is None) and (r is None or r() is p)
                                        for r, p in zip(refs, parts)):
                return joined
        joined = join()
        drop = self._drop_callback(key)
        self._entries[key] = (tuple(None if p is None else weakref.ref(p, drop) for p in parts), state, joined)
        return joined

    def _drop_callback(self, key: tuple[int, ...]) -> Callable:
        owner = weakref.ref(self)

        def drop(_ref) -> None:  # a part died: its id may be reused, and the join holds memory
            joined = owner()
            if joined is not None:
                joined._entries.pop(key, None)
        return drop
