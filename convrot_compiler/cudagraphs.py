"""Replay a compiled forward as one CUDA graph per input signature.

Why: every quantized linear launches two or three Triton kernels through Python
(the custom op, then Triton's launcher). On FLUX.1-dev that is about 1,500
launches a forward, and the CPU, not the GPU, set the pace: the kernels of the
w4a4 forward summed to 132 ms while the forward took 169 ms
(bench/results/model_flux_dev.md). A captured graph launches them all at once.

Inductor's own CUDA graphs (``mode="reduce-overhead"``) would copy every input
that is not a parameter into a static buffer on each call; the prepared weights
are graph inputs that are not parameters (see weights.py), so it would copy the
whole quantized model each forward. Here the weights keep their addresses, and
only the call's own tensors (latents, embeddings, timestep) are copied in.

Contract: the wrapped callable must be a pure function of its tensor arguments
on one CUDA device, with no CPU synchronisation inside (true of a compiled
convrot model). Non-tensor arguments are part of the signature. Outputs are
cloned, so a result stays valid after the next call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch
from torch.utils import _pytree as pytree


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_inputs: list[torch.Tensor]
    static_output: Any


def signature(args: tuple, kwargs: dict) -> Hashable:
    """What must match for a captured graph to be replayed: tensor shapes, dtypes, devices; other values."""
    return _signature(*pytree.tree_flatten((args, kwargs)))


def _signature(leaves: list, spec) -> Hashable:
    key: list[Hashable] = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append(("tensor", tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device))
        else:
            try:
                hash(leaf)
            except TypeError as e:
                raise TypeError(f"CUDA-graph replay keys calls by their arguments; {type(leaf).__name__} is "
                                "not hashable: pass cuda_graphs=False") from e
            key.append(("value", type(leaf), leaf))
    return tuple(key)


class CUDAGraphReplay:
    """Calls ``fn`` once per new signature (compiling, autotuning), then captures and replays it."""

    def __init__(self, fn: Callable, warmup: int = 1):
        self.fn = fn
        self.warmup = warmup
        self.graphs: dict[Hashable, _Captured] = {}
        self.pool = None

    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = _signature(leaves, spec)
        captured = self.graphs.get(key)
        if captured is None:
            out = self.fn(*args, **kwargs)  # compiles and autotunes outside capture
            self.graphs[key] = self._capture(args, kwargs)
            return out
        for static, live in zip(captured.static_inputs, (x for x in leaves if isinstance(x, torch.Tensor))):
            static.copy_(live)
        captured.graph.replay()
        return pytree.tree_map_only(torch.Tensor, torch.clone, captured.static_output)

    def _capture(self, args: tuple, kwargs: dict) -> _Captured:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        devices = {x.device for x in leaves if isinstance(x, torch.Tensor)}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise ValueError(f"CUDA-graph replay needs every tensor argument on one CUDA device, got {devices or 'none'}; "
                             "pass cuda_graphs=False")
        static_leaves = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        static_args, static_kwargs = pytree.tree_unflatten(static_leaves, spec)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.fn(*static_args, **static_kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_output = self.fn(*static_args, **static_kwargs)
        if any(not isinstance(x, torch.Tensor) for x in pytree.tree_leaves(static_output)):
            raise TypeError(f"CUDA-graph replay clones the outputs, and {type(static_output).__name__} holds leaves "
                            "that are not tensors (or is not a registered pytree); pass cuda_graphs=False")
        return _Captured(graph, [x for x in static_leaves if isinstance(x, torch.Tensor)], static_output)
