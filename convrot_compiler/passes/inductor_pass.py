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
convrot custom ops. Its ``uuid()`` is None on purpose: prepared weights are graph constants
here, and a cacheable pass would pickle them into every FX-cache entry (gigabytes for FLUX),
so graphs compiled with it bypass the FX graph cache. The ``convrot`` backend has no such
cost (its prepared weights are graph inputs); prefer it.

On CPU, Inductor's weight prepacking rewrites linears into ``mkl._mkl_linear`` before this
pass runs; set ``torch._inductor.config.cpp.weight_prepack = False`` (the pass says so).
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from ..plans import LayerDecision, PlanSpec, eligibility, make_plan
from ..quant import quantize_weight
from ..rotations import GroupHadamardRotation
from .match import module_name

aten = torch.ops.aten


class ConvRotInductorPass(CustomGraphPass):
    def __init__(self, plan: PlanSpec = "w4a4", group_size: int = 256, rotation: str = "regular"):
        self.plan = make_plan(plan)
        self.group_size = group_size
        self.rotation = GroupHadamardRotation(rotation, group_size)
        self.decisions: list[LayerDecision] = []

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
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
                continue
            self._rewrite(gm, graph, node, fake_mode)
        graph.lint()

    def _rewrite(self, gm, graph: fx.Graph, node: fx.Node, fake_mode) -> None:
        if node.target is aten.addmm.default:
            bias, x, wt = node.args[:3]
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                return
        else:
            (x, wt), bias = node.args[:2], None
        name = module_name(node) or f"<{node.name}>"
        x_val = x.meta.get("val") if isinstance(x, fx.Node) else None
        rows = int(x_val.shape[0]) if x_val is not None and isinstance(x_val.shape[0], int) else None
        planned, rule = self.plan.match(name)
        if not (isinstance(wt, fx.Node) and wt.op == "get_attr"):
            reason = "weight is not a frozen constant: set torch._inductor.config.freezing = True and run under no_grad"
            n_out = int(node.meta["val"].shape[-1]) if "val" in node.meta else 0
            self.decisions.append(LayerDecision(name, 0, n_out, planned, "bf16", reason, rule, rows=rows))
            return
        w = getattr(gm, wt.target).T  # frozen constants hold W^T [K, N]
        n_out, k_in = w.shape
        decision = LayerDecision(name, k_in, n_out, planned, planned, f"plan rule {rule!r}", rule, rows=rows,
                                 bytes_before=w.numel() * w.element_size())
        self.decisions.append(decision)
        why = "kept by plan" if planned == "bf16" else eligibility(planned, k_in, n_out, w.dtype, self.group_size)
        if why:
            decision.precision, decision.reason, decision.bytes_after = "bf16", why, decision.bytes_before
            return
        rotation = None if planned == "w4a16" else self.rotation
        qw = quantize_weight(w.contiguous(), planned, rotation, group_size=self.group_size)
        decision.bytes_after = qw.nbytes()
        base = f"_convrot_{node.name}"
        consts = {"values": qw.values, "scale": qw.scale}
        if rotation is not None and self.rotation.kind != "none":
            consts["h"] = self.rotation.kernel_matrix().to(w.device)
        with graph.inserting_before(node):
            attrs = {}
            for key, t in consts.items():
                gm.register_buffer(f"{base}_{key}", t)
                attrs[key] = graph.get_attr(f"{base}_{key}")
                attrs[key].meta["val"] = fake_mode.from_tensor(t) if fake_mode else t
            if planned == "w4a16":
                new = graph.call_function(torch.ops.convrot.w4a16_gemm.default,
                                          (x, attrs["values"], attrs["scale"], bias, self.group_size))
            else:
                bits = 4 if planned == "w4a4" else 8
                rq = graph.call_function(torch.ops.convrot.rotate_quantize.default,
                                         (x, attrs.get("h"), self.group_size, bits))
                q = graph.call_function(operator.getitem, (rq, 0))
                s = graph.call_function(operator.getitem, (rq, 1))
                new = graph.call_function(torch.ops.convrot.int_gemm.default,
                                          (q, s, [attrs["values"]], [attrs["scale"]], [bias], bits == 4, self.group_size,
                                           node.meta["val"].dtype))
                _set_val([rq, q, s], fake_mode)
            _set_val([new], fake_mode)
        new.meta["nn_module_stack"] = node.meta.get("nn_module_stack")
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def _set_val(nodes: list[fx.Node], fake_mode) -> None:
    """Propagate fake values through newly inserted nodes (Inductor lowers from node.meta['val'])."""
    for n in nodes:
        args = fx.node.map_arg(n.args, lambda a: a.meta["val"])
        if fake_mode is not None:
            with fake_mode:
                n.meta["val"] = n.target(*args)
        else:
            n.meta["val"] = n.target(*args)
