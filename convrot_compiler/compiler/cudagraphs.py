"""Replay a compiled forward as one CUDA graph per input signature.

Why: every quantized linear launches two or three Triton kernels through Python
(the custom op, then Triton's launcher). On FLUX.1-dev that is about 1,500
launches a forward, and the CPU, not the GPU, sets the pace without replay.
A captured graph launches them all at once.

Inductor's own CUDA graphs (``mode="reduce-overhead"``) would copy every input
that is not a parameter into a static buffer on each call; the prepared weights
are graph inputs that are not parameters (see weights.py), so it would copy the
whole quantized model each forward. Here the weights keep their addresses, and
only the call's own tensors (latents, embeddings, timestep) are copied in.

Contract: the wrapped callable must be a pure function of its tensor arguments
on one CUDA device, with no CPU synchronisation inside (true of a compiled
convrot model). Non-tensor arguments (a LoRA scale, ``return_dict``, ``None``)
are part of the signature, and so are the grad and inference modes. Outputs are
cloned, so a result stays valid after the next call. Graphs share one memory
pool; at most ``max_graphs`` are kept, the least recently used is dropped first.
A call that cannot be replayed runs the callable directly, with a warning once
per reason.
"""

from __future__ import annotations

import collections
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch
from torch.utils import _pytree as pytree


class NotReplayable(Exception):
    """A call that CUDA-graph replay cannot serve; the message says why."""


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_inputs: list[torch.Tensor]
    static_output: Any
    pool_bytes: int    # memory the capture added to the shared pool
    static_bytes: int  # the static input copies, outside the pool


def signature(args: tuple, kwargs: dict) -> Hashable:
    """What must match for a captured graph to be replayed: tensor shapes, strides, dtypes, devices;
    other values; the grad and inference modes."""
    return _signature(*pytree.tree_flatten((args, kwargs)))


def _signature(leaves: list, spec) -> Hashable:
    key: list[Hashable] = [str(spec), torch.is_grad_enabled(), torch.is_inference_mode_enabled()]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append(("tensor", tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device))
        else:
            try:
                hash(leaf)
            except TypeError as e:
                raise NotReplayable(f"an argument of type {type(leaf).__name__} is not hashable, so calls cannot be "
                                    "keyed by their arguments") from e
            key.append(("value", type(leaf), leaf))
    return tuple(key)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class CUDAGraphReplay:
    """Calls ``fn`` once per new signature (compiling, autotuning), then captures and replays it."""

    def __init__(self, fn: Callable, warmup: int = 1, max_graphs: int = 8):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.fn = fn
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.graphs: "collections.OrderedDict[Hashable, _Captured]" = collections.OrderedDict()
        self.unreplayable: dict[Hashable, str] = {}
        self.evicted = 0
        self.pool = None
        self._warned: set[str] = set()

    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        try:
            key = _signature(leaves, spec)
        except NotReplayable as e:
            return self._direct(str(e), args, kwargs)
        if key in self.unreplayable:
            return self.fn(*args, **kwargs)
        captured = self.graphs.get(key)
        if captured is None:
            out = self.fn(*args, **kwargs)  # compiles and autotunes outside capture
            try:
                captured = self._capture(leaves, spec)
            except NotReplayable as e:
                self.unreplayable[key] = str(e)
                self._warn(str(e))
                return out
            self.graphs[key] = captured
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
                self.evicted += 1
            return out
        self.graphs.move_to_end(key)
        for static, live in zip(captured.static_inputs, (x for x in leaves if isinstance(x, torch.Tensor))):
            static.copy_(live)
        captured.graph.replay()
        return pytree.tree_map_only(torch.Tensor, torch.clone, captured.static_output)

    def memory(self) -> list[dict]:
        """Per kept graph, most recently used last: the shapes it serves and the memory it holds."""
        return [{"shapes": [tuple(t.shape) for t in c.static_inputs], "pool_bytes": c.pool_bytes,
                 "static_bytes": c.static_bytes} for c in self.graphs.values()]

    def _direct(self, why: str, args: tuple, kwargs: dict):
        self._warn(why)
        return self.fn(*args, **kwargs)

    def _warn(self, why: str) -> None:
        if why not in self._warned:
            self._warned.add(why)
            warnings.warn(f"CUDA-graph replay is off for these calls, which run without it: {why}", stacklevel=4)

    def _capture(self, leaves: list, spec) -> _Captured:
        devices = {x.device for x in leaves if isinstance(x, torch.Tensor)}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise NotReplayable(f"CUDA-graph replay needs every tensor argument on one CUDA device, got "
                                f"{sorted(map(str, devices)) or 'no tensor'}")
        static_leaves = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        static_inputs = [x for x in static_leaves if isinstance(x, torch.Tensor)]
        static_args, static_kwargs = pytree.tree_unflatten(static_leaves, spec)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.fn(*static_args, **static_kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # as the capture itself does first, so that the difference is the pool's growth
        reserved = torch.cuda.memory_reserved()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                static_output = self.fn(*static_args, **static_kwargs)
        except Exception as e:  # an op that cannot be captured (a CPU sync, a host read)
            raise NotReplayable(f"the forward could not be captured ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
        pool_bytes = torch.cuda.memory_reserved() - reserved
        if any(not isinstance(x, torch.Tensor) for x in pytree.tree_leaves(static_output)):
            raise NotReplayable(f"the forward returns {type(static_output).__name__}, which holds leaves that are not "
                                "tensors (or is not a registered pytree)")
        return _Captured(graph, static_inputs, static_output, pool_bytes, _tensor_bytes(static_inputs))
