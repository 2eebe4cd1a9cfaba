"""Graph inspection: what the convrot pass rewrote, what it left alone, and why."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch

from ..compiler.attention_rewrite import PROLOGUE_KERNEL, PROLOGUE_KERNEL_E4M3, AttentionDecision
from ..compiler.backend import CompileReport, convrot_backend
from ..compiler.roles import ROLE_RULE, decide_model
from ..config import ConvRotConfig
from ..families import MINIATURES
from ..numerics.pca import block_shape
from ..plans import PRECISIONS, LayerDecision, iter_linears


@dataclass
class InspectReport:
    reports: list[CompileReport]
    roles: str = ""  # how the linears' roles were found (compiler/roles.py), or why by names only

    @property
    def decisions(self) -> list[LayerDecision]:
        return [d for r in self.reports for d in r.decisions]

    @property
    def attention(self) -> list[AttentionDecision]:
        return [a for r in self.reports for a in r.attention]

    @property
    def graphs(self) -> int:
        return len(self.reports)

    def totals(self) -> dict:
        ds = self.decisions
        counts = {p: sum(d.precision == p for d in ds) for p in PRECISIONS}
        before = sum(d.bytes_before for d in ds)
        after = sum(d.bytes_after for d in ds)
        return {"graphs": self.graphs, "linears_matched": len(ds), "rewritten": sum(d.precision != "bf16" for d in ds),
                "activation_quantizations": sum(r.activation_quantizations for r in self.reports),
                "shared_activation_quantizations": sum(r.shared_activation_quantizations for r in self.reports),
                "fused_gemms": sum(r.fused_gemms for r in self.reports),
                "fused_linears": sum(r.fused_linears for r in self.reports),
                "fused_producers": sum(r.fused_producers for r in self.reports),
                "fused_norms": sum(r.fused_norms for r in self.reports),
                "gelu_epilogues": sum(r.gelu_epilogues for r in self.reports),
                "attention_fp8": sum(a.precision == "fp8" for a in self.attention),
                "attention_kept": sum(a.precision != "fp8" for a in self.attention),
                "attention_prologue_kernel": sum(a.prologue in (PROLOGUE_KERNEL, PROLOGUE_KERNEL_E4M3)
                                                 for a in self.attention),
                "by_precision": counts, "linear_weight_bytes_before": before, "linear_weight_bytes_after": after,
                "ratio": after / before if before else 1.0}

    def table(self) -> str:
        from tabulate import tabulate

        rot = {r.rotation for r in self.reports}
        rows = []
        for d in self.decisions:
            rotation = "-" if d.precision in ("bf16", "w4a16", "w8a16") else "/".join(sorted(rot))
            if d.extra.get("method") == "dirotq":
                rotation += f" ({_dirotq_label(d, self.reports[0].group_size)})"
            elif d.extra.get("weights") == "gptq":
                rotation += " + gptq"
            rows.append([d.name, f"{d.in_features}->{d.out_features}", d.rows if d.rows is not None else "?",
                         _precision_label(d), rotation, _mib(d.bytes_before), _mib(d.bytes_after),
                         d.reason if d.precision == "bf16" else d.extra.get("role", "")])
        return tabulate(rows, headers=["module", "in->out", "rows M", "precision", "rotation", "MiB before",
                                       "MiB after", "left alone because / role"], tablefmt="github")

    def attention_table(self) -> str:
        """One row per scaled-dot-product attention: fp8 and how its inputs are scaled, or kept and why."""
        from tabulate import tabulate

        rows = [[a.name, "x".join(map(str, a.shape)) if a.shape else "?", a.precision, a.scales or "-",
                 a.prologue or "-", a.output or "-", a.reason] for a in self.attention]
        return tabulate(rows, headers=["attention", "[B, H, S, D]", "precision", "e4m3 scales", "Q, K made by",
                                       "e4m3 output", "kept because"],
                        tablefmt="github")

    def summary(self) -> str:
        t = self.totals()
        counts = ", ".join(f"{v} {k}" for k, v in t["by_precision"].items() if v)
        return (f"{t['linears_matched']} linears matched in {t['graphs']} graph(s), {t['rewritten']} rewritten "
                f"({counts}); linear weights {_mib(t['linear_weight_bytes_before'])} MiB -> "
                f"{_mib(t['linear_weight_bytes_after'])} MiB ({t['ratio']:.3f}x); "
                f"{t['activation_quantizations']} activation rotate+quantize ops, "
                f"{t['shared_activation_quantizations']} linears sharing one with another linear on the same input; "
                f"{t['fused_linears']} linears computed by {t['fused_gemms']} fused GEMMs"
                + (f"; {t['gelu_epilogues']} GELUs computed in their GEMM's epilogue" if t["gelu_epilogues"] else "")
                + (f"; {t['fused_producers']} concatenations read inside their rotate+quantize"
                   if t["fused_producers"] else "")
                + (f"; {t['fused_norms']} adaLN normalizations computed by their rotate+quantize"
                   if t["fused_norms"] else "")
                + f"; {t['attention_fp8']} of {t['attention_fp8'] + t['attention_kept']} attentions in fp8"
                + (f", {t['attention_prologue_kernel']} with Q and K from one RMSNorm+RoPE kernel"
                   if t["attention_prologue_kernel"] else "")
                + self._coverage() + (f"; {self.roles}" if self.roles else ""))

    def _coverage(self) -> str:
        """How many of the linears a calibrated method quantizes the calibration covers (none when none does)."""
        flags = [d.extra["calibrated"] for d in self.decisions if "calibrated" in d.extra]
        if not flags:
            return ""
        return f"; the calibration covers {sum(flags)} of the {len(flags)} linears its method quantizes"

    def to_json(self) -> str:
        return json.dumps({"totals": self.totals(), "layers": [
            {k: v for k, v in asdict(d).items() if k != "extra"} for d in self.decisions],
            "attention": [asdict(a) for a in self.attention]}, indent=2)

    def dump(self, directory: str) -> list[str]:
        """Write each graph before/after the pass as readable code, and as DOT when pydot is installed."""
        os.makedirs(directory, exist_ok=True)
        written = []
        for i, r in enumerate(self.reports):
            for tag, text in (("before", r.graph_before), ("after", r.graph_after)):
                path = os.path.join(directory, f"graph{i}_{tag}.py")
                with open(path, "w") as f:
                    f.write(text)
                written.append(path)
            gm = r.graph_modules.get("after")
            if gm is not None:
                try:
                    from torch.fx.passes.graph_drawer import FxGraphDrawer

                    dot = FxGraphDrawer(gm, f"graph{i}_after").get_dot_graph()
                    path = os.path.join(directory, f"graph{i}_after.dot")
                    dot.write_raw(path)
                    written.append(path)
                    try:
                        dot.write_svg(path[:-4] + ".svg")
                        written.append(path[:-4] + ".svg")
                    except Exception:  # graphviz's dot binary missing: DOT only
                        pass
                except (ImportError, RuntimeError) as e:
                    written.append(f"(DOT skipped: {e}; pip install pydot for DOT, plus graphviz for SVG)")
        return written


def _precision_label(d: LayerDecision) -> str:
    """The precision, marked where a weight-only weight is prepared for the tensor-core kernels
    (dispatch.weight_only_layout) and where W4A4/W8A8 activations and weights take the sm_90 kernel's channel order (dispatch.act_order_for)."""
    if d.extra.get("layout") == "tiles":
        return f"{d.precision} (tensor-core tiles)"
    if d.extra.get("act_order") == "mma":
        return f"{d.precision} (mma channel order)"
    return d.precision


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f}"


def _dirotq_label(d: LayerDecision, group_size: int) -> str:
    """DiRotQ's subspace: 16-bit columns of each block x blocks, the weight quantizer, the calibration coverage."""
    blocks, _ = block_shape(d.in_features, group_size)
    label = f"{d.extra.get('rank', '?')} x {blocks} in bf16, {d.extra.get('weights', 'rtn')}"
    return label + ("" if d.extra.get("calibrated", True) else ", NOT CALIBRATED")


def inspect(model: torch.nn.Module, example_args: tuple = (), example_kwargs: dict | None = None,
            config: ConvRotConfig | None = None, **overrides) -> InspectReport:
    """Trace ``model`` on the example inputs and report what the convrot pass would do to each linear, under
    ``config`` (default ``ConvRotConfig()``) with ``overrides`` by field name, as ``compile`` takes them.

    Nothing is prepared or changed: works on the meta device too, for models too large for the machine."""
    reports: list[CompileReport] = []
    config = (config or ConvRotConfig()).replace(**overrides, dry_run=True, report=reports.append)
    by_role, roles = {}, "decided by the checkpoint"
    if not config.prepared:
        decisions, plan, roles = decide_model(model, config.plan, config.group_size)
        config = config.replace(plan=plan)
        by_role = {d.name: d for d in decisions if d.rule == ROLE_RULE}
    # a graph that starts inside a submodule (after a graph break) names its linears from there: name them by
    # their weights as the model does, so that the plan's rules by name reach them
    by_weight = {id(lin.weight): name for name, lin in iter_linears(model)}
    options = {"config": config.replace(linear_names=lambda weight: by_weight.get(id(weight)))}
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            compiled = torch.compile(model, backend=convrot_backend, options=options)
            compiled(*example_args, **(example_kwargs or {}))
    except Exception as e:
        kind = type(model).__name__
        if kind in MINIATURES and any(p.is_meta for p in model.parameters()):
            raise RuntimeError(f"{kind}'s forward branches on its inputs' values, which the meta device cannot run "
                               f"({type(e).__name__}: {str(e).splitlines()[0]}): inspect it with weights, e.g. its "
                               "tiny config on the CPU (convrot inspect --config hunyuanvideo-1.5-tiny)") from e
        raise
    finally:
        torch._dynamo.reset()
    if not reports:
        raise RuntimeError("torch.compile produced no graph for this model and inputs: nothing to inspect")
    for d in (d for r in reports for d in r.decisions if d.name in by_role):
        d.rule, d.reason = ROLE_RULE, by_role[d.name].reason
        d.extra["role"] = by_role[d.name].extra["role"]
    return InspectReport(reports, roles)
