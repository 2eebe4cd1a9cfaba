"""The convrot rewrite as an Inductor post-grad pass, for users who keep the stock backend.

    import torch, torch._inductor.config as inductor_config
    from convrot_compiler.passes.inductor_pass import ConvRotInductorPass

    inductor_config.freezing = True                      # weights become constants the pass can read
    inductor_config.post_grad_custom_post_pass = ConvRotInductorPass(plan="w4a4")
    with torch.no_grad():
        out = torch.compile(model)(x)

Under freezing a linear reaches the post-grad graph as ``mm`` / ``addmm`` of a reshaped
activation and a frozen (already transposed) weight constant. The pass quantizes that
constant, registers the prepared tensors as new constants and replaces the GEMM with the
convrot custom ops; GEMMs of one activation node (AOTAutograd's CSE makes Q/K/V's reshapes one
node) share its rotate+quantize and one GEMM. DiRotQ (``rotation="pca"``, ``"pca-hadamard"``) and GPTQ weights
take a ``calibration``, read by each GEMM's module name: DiRotQ's linears of one input share its basis constant
and its rotate+split+quantize. The backend's GELU epilogue and producer fusions are not done here. Its
``uuid()`` is None on purpose: prepared weights are graph constants here, and a cacheable pass would pickle them into every FX-cache entry (gigabytes for FLUX),
so graphs compiled with it bypass the FX graph cache. The ``convrot`` backend has no such
cost (its prepared weights are graph inputs); prefer it.

On CPU, Inductor's weight prepacking rewrites linears into ``mkl._mkl_linear`` before this
pass runs; set ``torch._inductor.config.cpp.weight_prepack = False`` (the pass says so).
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, field

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from ..config import ConvRotConfig
from ..numerics.pca import PCAWeight
from ..numerics.quant import SCHEME_BITS, WEIGHT_ONLY
from ..plans import LayerDecision, decide
from .emit import QuantizedUse, emit
from .match import module_name
from .stages import graph_rotation_matrix
from .weights import prepare_weight

aten = torch.ops.aten


@dataclass
class _Target:
    """The graph being rewritten, for one call of the pass. Kept off the pass object, which Inductor's
    config holds for the life of the process: fx nodes and a fake mode kept alive until interpreter
    exit crash its teardown."""
    gm: fx.GraphModule
    fake_mode: object
    anchor: fx.Node | None  # the first non-placeholder node: new constants are read before it
    h: fx.Node | None = None
    bases: dict = field(default_factory=dict)  # DiRotQ: id(basis tensor) -> its constant

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph


class ConvRotInductorPass(CustomGraphPass):
    """Linears that read the same activation at the same precision share one rotate+quantize and,
    with ``fuse_gemms`` (default), one GEMM whose output they slice, as in the ``convrot`` backend
    (FLUX's Q/K/V, and Q/K/V/MLP-in in the single blocks). After a compile, ``decisions`` says what
    happened to each linear, ``activation_quantizations`` and ``fused_gemms`` what was shared."""

    def __init__(self, config: ConvRotConfig | None = None, **overrides):
        """The pass reads ``plan``, ``group_size``, ``rotation``, ``fuse_gemms`` and the calibrated methods'
        ``weights``, ``calibration`` and ``high_precision_fraction`` of a ``ConvRotConfig`` (or those names as
        ``overrides``); the other graph options are the backend's alone. DiRotQ (``rotation="pca"``) and GPTQ
        find each linear's input statistics by its module name, which freezing keeps."""
        config = (config or ConvRotConfig()).replace(**overrides)
        default = ConvRotConfig()
        backend_only = ("fuse_producers", "fuse_norms", "gelu_epilogue", "attention", "inductor", "dry_run")
        others = [f for f in backend_only if getattr(config, f) != getattr(default, f)]
        if others:
            raise ValueError(f"the Inductor post-grad pass takes plan, group_size, rotation, fuse_gemms, weights, "
                             f"calibration and high_precision_fraction; {others} are the convrot backend's only "
                             "(torch.compile(model, backend='convrot'))")
        self.config = config
        self.decisions: list[LayerDecision] = []
        self.activation_quantizations = 0
        self.fused_gemms = 0

    @property
    def plan(self):
        return self.config.plan

    @property
    def group_size(self) -> int:
        return self.config.group_size

    @property
    def rotation(self) -> str:
        return self.config.rotation

    @property
    def fuse_gemms(self) -> bool:
        return self.config.fuse_gemms

    def uuid(self):
        return None  # deliberately uncacheable: see module docstring

    def __call__(self, graph: fx.Graph) -> None:
        gm = graph.owning_module
        prepacked = [n for n in graph.nodes if n.op == "call_function" and "mkl" in str(n.target) and "linear" in str(n.target)]
        if prepacked:
            raise RuntimeError(f"{len(prepacked)} linear(s) were prepacked for MKL before the convrot pass could see them; "
                               "set torch._inductor.config.cpp.weight_prepack = False")
        fake_mode = next((n.meta["val"].fake_mode for n in graph.nodes
                          if isinstance(n.meta.get("val"), torch._subclasses.FakeTensor)), None)
        g = _Target(gm, fake_mode, next((n for n in graph.nodes if n.op != "placeholder"), None))
        self._undo_concatenations(g)
        uses = [u for node in list(graph.nodes) if _is_gemm(node) and (u := self._prepare(g, node)) is not None]
        done = emit(graph, uses, _InductorForm(g, self.group_size), self.fuse_gemms)
        self.activation_quantizations += done.activation_quantizations
        self.fused_gemms += done.fused_gemms
        graph.lint()

    @staticmethod
    def _constant(g: _Target, name: str, t: torch.Tensor) -> fx.Node:
        """t as a new graph constant, read by a get_attr before the graph's first computation (so that
        every GEMM of a fused group can use it)."""
        g.gm.register_buffer(name, t)
        with g.graph.inserting_before(g.anchor):
            node = g.graph.get_attr(name)
        node.meta["val"] = g.fake_mode.from_tensor(t, static_shapes=True) if g.fake_mode else t
        return node

    def _undo_concatenations(self, g: _Target) -> None:
        """Split each GEMM that Inductor's freezing concatenated back into one GEMM per linear.

        Before this pass runs, freezing merges linears that read one input into one GEMM of their
        concatenated weights (always on CUDA; on CPU with ``cpp.enable_concat_linear``). That GEMM has
        lost the linears' names, which only the nodes after its split still carry, so the plan could not be
        applied by name (``mix`` gives FLUX's to_v another precision than to_q/to_k). Each linear gets
        its GEMM back on a view of the concatenated weight; the grouping below fuses them again where
        their precisions agree."""
        graph = g.graph
        for node in list(graph.nodes):
            if not _is_gemm(node) or module_name(node) is not None or node.kwargs or len(node.users) != 1:
                continue
            split = next(iter(node.users))
            sizes = _split_sizes(split, node)
            if sizes is None or not all(u.target is operator.getitem for u in split.users):
                continue
            items = sorted(split.users, key=lambda u: u.args[1])
            named = [_named_source(u) for u in items]
            if None in named:
                continue
            x, wt, bias = _gemm_operands(node)
            if not all(isinstance(t, fx.Node) and t.op == "get_attr" for t in (wt, bias) if t is not None):
                continue
            w, b = getattr(g.gm, wt.target), None if bias is None else getattr(g.gm, bias.target)
            starts = [0, *itertools.accumulate(sizes)]
            for item, source in zip(items, named):
                i = item.args[1]
                lo, hi = starts[i], starts[i + 1]
                w_i = self._constant(g, f"_convrot_{node.name}_w{i}", w[:, lo:hi])
                with graph.inserting_before(item):
                    if b is None:
                        new = graph.call_function(aten.mm.default, (x, w_i))
                    else:
                        b_i = self._constant(g, f"_convrot_{node.name}_b{i}", b[lo:hi])
                        new = graph.call_function(aten.addmm.default, (b_i, x, w_i))
                    _set_val([new], g.fake_mode)
                stack = source.meta["nn_module_stack"]
                _replace(graph, item, new)
                new.meta["nn_module_stack"] = stack
            graph.erase_node(split)
            graph.erase_node(node)

    def _prepare(self, g: _Target, node: fx.Node) -> QuantizedUse | None:
        """Decide one GEMM and prepare its frozen weight; None when it stays bf16 (the decision says why)."""
        x, wt, bias = _gemm_operands(node)
        known = module_name(node)
        name = known or f"<{node.name}>"
        x_val = x.meta.get("val") if isinstance(x, fx.Node) else None
        rows = int(x_val.shape[0]) if x_val is not None and isinstance(x_val.shape[0], int) else None
        planned, rule = self.plan.match(name)
        unsupported = None
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            unsupported = "addmm with beta or alpha other than 1 is not a plain linear"
        elif not (isinstance(wt, fx.Node) and wt.op == "get_attr"):
            unsupported = "weight is not a frozen constant: set torch._inductor.config.freezing = True and run under no_grad"
        if unsupported:
            n_out = int(node.meta["val"].shape[-1]) if "val" in node.meta else 0
            self.decisions.append(LayerDecision(name, 0, n_out, planned, "bf16", unsupported, rule, rows=rows))
            return None
        w = getattr(g.gm, wt.target).T  # frozen constants hold W^T [K, N]
        n_out, k_in = w.shape
        decision = decide(self.plan, name, k_in, n_out, w.dtype, self.group_size, rows=rows,
                          nbytes=w.numel() * w.element_size())
        if not known:
            decision.reason += (f" on {name!r}: the GEMM has no module name (Inductor built it), so only a rule "
                                "matching that placeholder applies")
        self.decisions.append(decision)
        if decision.precision == "bf16":
            return None
        spec = self.config.spec_for(decision.precision, w)
        if spec.calibration is not None and not known:
            raise ValueError(f"{name}: a GEMM with no module name (Inductor built it) cannot find its input's "
                             f"statistics in the calibration that rotation={self.rotation!r}, "
                             f"weights={self.config.weights!r} need")
        qw = prepare_weight(w.contiguous(), spec, layer=known)
        decision.bytes_after = qw.nbytes()
        if decision.precision not in WEIGHT_ONLY and g.h is None:
            h = graph_rotation_matrix(self.config)
            if h is not None:
                # in the weights' (= activations') dtype, as the backend passes it: the kernel would otherwise
                # cast it on every call; group-Hadamard entries are exact in bf16/fp16
                g.h = self._constant(g, "_convrot_h", h.to(w.device, w.dtype))
        values = self._constant(g, f"_convrot_{node.name}_values", qw.values)
        scale = self._constant(g, f"_convrot_{node.name}_scale", qw.scale)
        if not isinstance(qw, PCAWeight):
            return QuantizedUse(node, x, bias, values, scale, n_out, decision.precision, spec.act_order)
        decision.extra["rank"] = qw.rank
        basis = g.bases.get(id(qw.basis))  # one constant per input's basis, which its linears share
        if basis is None:
            basis = g.bases[id(qw.basis)] = self._constant(g, f"_convrot_{node.name}_basis", qw.basis)
        return QuantizedUse(node, x, bias, values, scale, n_out, decision.precision, basis=basis,
                            w_hi=self._constant(g, f"_convrot_{node.name}_w_hi", qw.w_hi), rank=qw.rank,
                            share=spec.calibration.shared.get(known, known))


class _InductorForm:
    """emit.GraphForm for the post-grad aten graph: the convrot ops as OpOverloads, with fake values
    propagated (Inductor lowers from node.meta['val'])."""

    def __init__(self, g: _Target, group_size: int):
        self.g, self.group_size = g, group_size

    def _call(self, target, args) -> fx.Node:
        node = self.g.graph.call_function(target, args)
        _set_val([node], self.g.fake_mode)
        return node

    def quantize(self, x, bits, act_order):
        rq = self._call(torch.ops.convrot.rotate_quantize.default, (x, self.g.h, self.group_size, bits, act_order))
        return self._call(operator.getitem, (rq, 0)), self._call(operator.getitem, (rq, 1)), x

    def gemm(self, q, s, like, uses, biases, gelu_from):
        out_dtype = uses[0].node.meta["val"].dtype
        return self._call(torch.ops.convrot.int_gemm.default, (
            q, s, [u.values for u in uses], [u.scale for u in uses], biases, uses[0].scheme == "w4a4",
            self.group_size, out_dtype))

    def column_block(self, out, start, length):
        return self._call(aten.slice.Tensor, (out, 1, start, start + length))

    def weight_only(self, use, x, bias):
        return self._call(torch.ops.convrot.weight_only_gemm.default,
                          (x, use.values, use.scale, bias, self.group_size, SCHEME_BITS[use.scheme][0]))

    def pca_quantize(self, x, use):
        return self._call(torch.ops.convrot.pca_rotate_quantize.default,
                          (x, use.basis, self.g.h, use.rank, self.group_size))

    def pca_gemm(self, zqs, like, use, bias):
        z_hi, q, s = (self._call(operator.getitem, (zqs, i)) for i in range(3))
        return self._call(torch.ops.convrot.pca_gemm.default,
                          (z_hi, q, s, use.w_hi, use.values, use.scale, bias, self.group_size))

    def replace(self, old, new):
        _replace(self.g.graph, old, new)


def _is_gemm(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (aten.mm.default, aten.addmm.default)


def _gemm_operands(node: fx.Node) -> tuple:
    """(x, W^T, bias or None) of an aten mm / addmm node."""
    if node.target is aten.addmm.default:
        bias, x, wt = node.args[:3]
        return x, wt, bias
    return node.args[0], node.args[1], None


def _split_sizes(split: fx.Node, node: fx.Node) -> list[int] | None:
    """The column widths a split of a GEMM's output along its last dim cuts, or None when it is not one:
    ``split_with_sizes`` (torch 2.13's concatenation) or ``split`` into equal chunks (2.11's ``chunk``)."""
    if split.op != "call_function" or split.args[0] is not node:
        return None
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    n = node.meta["val"].shape[-1] if "val" in node.meta else None
    if dim not in (1, -1) or not isinstance(n, int):
        return None
    if split.target is aten.split_with_sizes.default:
        return [int(s) for s in split.args[1]]
    if split.target is aten.split.Tensor and isinstance(split.args[1], int) and split.args[1] > 0:
        return [min(split.args[1], n - lo) for lo in range(0, n, split.args[1])]
    return None


def _named_source(item: fx.Node) -> fx.Node | None:
    """The node that still names the linear an output column block of a concatenated GEMM belongs to:
    the block itself (torch 2.13 keeps the name on the split's getitem), or else its reshapes back to
    the input's batch shape when they all carry one name (torch 2.11 keeps it only there)."""
    if module_name(item) is not None:
        return item
    reshapes = (aten.reshape.default, aten.view.default)
    users = list(item.users)
    if not users or not all(u.op == "call_function" and u.target in reshapes for u in users):
        return None
    names = {module_name(u) for u in users}
    return users[0] if len(names) == 1 and None not in names else None


def _replace(graph: fx.Graph, old: fx.Node, new: fx.Node) -> None:
    new.meta["nn_module_stack"] = old.meta.get("nn_module_stack")
    old.replace_all_uses_with(new)
    graph.erase_node(old)


def _set_val(nodes: list[fx.Node], fake_mode) -> None:
    """Propagate fake values through newly inserted nodes (Inductor lowers from node.meta['val'])."""
    for n in nodes:
        args = fx.node.map_arg(n.args, lambda a: a.meta["val"])
        if fake_mode is not None:
            with fake_mode:
                n.meta["val"] = n.target(*args)
        else:
            n.meta["val"] = n.target(*args)
