"""Find the linear ops of a Dynamo FX graph and the parameters and modules behind them."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)


@dataclass
class LinearMatch:
    node: fx.Node
    name: str
    in_features: int
    out_features: int
    rows: int | None
    weight_index: int | None  # position of the weight among the graph's placeholders / example inputs
    weight: torch.Tensor | None
    x: fx.Node | None           # the linear's input and bias arguments, as the graph passes them
    bias: fx.Node | None
    dtype: torch.dtype | None


_SELF = re.compile(r"^(L|G)\['[^']*'\]")


def qualified_name(path: str) -> str:
    """Dynamo's module path (e.g. ``L['self'].__dict__['_modules']['blocks'][0].attn``) as a
    ``named_modules`` name (``blocks.0.attn``)."""
    s = _SELF.sub("", path)
    s = s.replace(".__dict__['_modules']", "").replace("._modules", "")
    s = re.sub(r"\['([^']*)'\]", r".\1", s)
    s = re.sub(r"\[(\d+)\]", r".\1", s)
    return s.strip(".")


def module_name(node: fx.Node) -> str | None:
    """The qualified name of the module a node was traced from (from nn_module_stack), or None."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return qualified_name(path)


def _example(node) -> torch.Tensor | None:
    if isinstance(node, fx.Node):
        v = node.meta.get("example_value", node.meta.get("val"))
        return v if isinstance(v, torch.Tensor) else None
    return None


def find_linears(gm: fx.GraphModule, example_inputs: list, names: Callable | None = None) -> list[LinearMatch]:
    """The linear ops of a graph. Each is named by ``names(weight)`` where that gives a name, else by the module
    path Dynamo recorded, relative to where the graph's frame starts."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index = {n: i for i, n in enumerate(placeholders)}
    found = []
    for i, node in enumerate(gm.graph.nodes):
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        args = list(node.args) + [None] * 3
        x, w, b = args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
        w_idx = index.get(w) if isinstance(w, fx.Node) else None
        weight = example_inputs[w_idx] if w_idx is not None and w_idx < len(example_inputs) else None
        w_meta = weight if isinstance(weight, torch.Tensor) else _example(w)
        x_meta = _example(x)
        rows = None
        if x_meta is not None:
            try:
                rows = int(math.prod(int(d) for d in x_meta.shape[:-1]))
            except (TypeError, ValueError):  # symbolic sizes
                rows = None
        out_f, in_f = (tuple(w_meta.shape) if w_meta is not None and w_meta.dim() == 2 else (0, 0))
        name = names(weight) if names is not None and isinstance(weight, torch.Tensor) else None
        found.append(LinearMatch(node, name or module_name(node) or f"<linear {i}>", int(in_f), int(out_f), rows, w_idx,
                                 weight if isinstance(weight, torch.Tensor) else None, x, b,
                                 w_meta.dtype if w_meta is not None else None))
    return found
