"""Eager, plug-and-play quantized linears and the module-swapping quantizer.

These are ConvRot's ``ConvLinear4bit`` and an int4 weight-only linear: weights
are rotated, quantized and packed once in ``from_linear`` and the float weight is
released. They are the reference the compiled path must match, and the fallback
for users who do not use torch.compile.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..numerics.gptq import gptq_quantizer
from ..numerics.pca import (
    PCA_ROTATIONS,
    WEIGHT_METHODS,
    PCAWeight,
    default_group_size,
    needs_calibration,
    pca_quantize_weight,
)
from ..numerics.quant import (
    WEIGHT_ONLY,
    QuantizedWeight,
    WeightQuantizer,
    check_act_order,
    packed_layout,
    quantize_weight,
    reference_linear,
    rtn_weight_quantizer,
)
from ..numerics.rotations import Rotation, make_rotation
from ..ops import pca_linear, quantized_linear
from ..ops.dispatch import act_order_for, gptq_options, has_kernel, weight_only_layout
from ..plans import LayerDecision, PlanSpec, decide_linears, module_bytes


class _QuantizedLinearBase(nn.Module):
    scheme: str

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None, out_dtype: torch.dtype):
        super().__init__()
        self.in_features = qweight.in_features
        self.out_features = qweight.out_features
        self.padded_in_features = qweight.padded_in_features
        self.group_size = qweight.group_size
        self.rotation = qweight.rotation
        self.act_order = qweight.act_order
        self.out_dtype = out_dtype
        self.register_buffer("qweight", qweight.values)
        self.register_buffer("weight_scale", qweight.scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        kernel_matrix = getattr(self.rotation, "kernel_matrix", None)
        self.register_buffer("rotation_matrix", kernel_matrix() if kernel_matrix else None, persistent=False)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(
            self.scheme, self.qweight, self.weight_scale, self.in_features, self.out_features,
            self.padded_in_features, self.group_size, self.rotation,
            packed_layout(self.qweight), self.act_order,
        )

    def get_extra_state(self) -> dict:
        """The weight's channel order travels with its values: loaded into a module prepared in the other
        order, they would multiply the wrong activations."""
        return {"act_order": self.act_order}

    def set_extra_state(self, state: dict) -> None:
        order = state.get("act_order", "natural") if isinstance(state, dict) else "natural"
        check_act_order(order, self.group_size)
        self.act_order = order

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a state dict saved before the order existed holds natural-order weights
        state_dict.setdefault(prefix + "_extra_state", {"act_order": "natural"})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qw = self.quantized_weight
        if has_kernel(qw):
            return quantized_linear(x, qw.values, qw.scale, self.rotation_matrix, self.bias, qw.scheme,
                                    qw.group_size, qw.out_features, qw.act_order)
        if x.is_cuda:
            warnings.warn(f"{type(self).__name__} ({qw.scheme}, group_size {qw.group_size}, rotation "
                          f"{getattr(qw.rotation, 'name', 'none')}): no CUDA kernel for this configuration, running the "
                          "plain-torch reference (slow); the kernels take group_size 256", stacklevel=2)
        return reference_linear(x, qw, self.bias)

    def extra_repr(self) -> str:
        rot = self.rotation.name if self.rotation is not None else "none"
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, rotation={rot}"


class ConvLinear4bit(_QuantizedLinearBase):
    """W4A4 (``bits=4``) or W8A8 (``bits=8``) linear with group-wise Hadamard rotation.

    ``from_linear`` prepares the weight in the channel order that is fastest where the linear's weight is
    (dispatch.act_order_for: "mma" on an sm_90 GPU); the module runs correctly in either order on any device,
    and its state dict records which."""

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int = 256,
        rotation: "str | Rotation" = "regular",
        bits: int = 4,
        weight_quantizer: WeightQuantizer = rtn_weight_quantizer,
    ) -> "ConvLinear4bit":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 (W4A4) or 8 (W8A8), got {bits!r}")
        rot = make_rotation(rotation, group_size)
        scheme = "w4a4" if bits == 4 else "w8a8"
        kernel_matrix = getattr(rot, "kernel_matrix", None)
        h = kernel_matrix() if kernel_matrix else None
        act_order = act_order_for(linear.weight.device, linear.weight.dtype, group_size,
                                  h is not None and tuple(h.shape) == (16, 16))
        with torch.no_grad():
            qw = quantize_weight(linear.weight, scheme, rot, group_size=group_size, weight_quantizer=weight_quantizer,
                                 act_order=act_order)
        mod = cls(qw, linear.bias, linear.weight.dtype)
        mod.scheme = scheme
        return mod


class Int4WeightOnlyLinear(_QuantizedLinearBase):
    """W4A16: int4 weights with one scale per output channel and ``group_size`` inputs;
    activations stay in their float dtype. For linears that see one row per sample."""

    scheme = "w4a16"

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 256) -> "Int4WeightOnlyLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        layout = weight_only_layout(linear.weight, group_size)
        with torch.no_grad():
            qw = quantize_weight(linear.weight, cls.scheme, None, group_size=group_size, layout=layout)
        return cls(qw, linear.bias, linear.weight.dtype)


class Int8WeightOnlyLinear(Int4WeightOnlyLinear):
    """W8A16: int8 weights with one scale per output channel and ``group_size`` inputs; activations stay in
    their float dtype. For the linears whose 4-bit weights cost most of a model's error (adaLN modulation)."""

    scheme = "w8a16"


class DiRotQLinear(nn.Module):
    """DiRotQ's W4A4 linear (numerics/pca.py): activations rotated into the calibrated PCA basis of the input,
    the top-variance ``rank`` coefficients kept in 16 bits, the rest int4 per token and group; the weight in
    the same basis, its 16-bit columns beside int4 groups (round-to-nearest or GPTQ)."""

    def __init__(self, pw: PCAWeight, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = pw.in_features, pw.out_features
        self.rank, self.group_size, self.hadamard, self.weights = pw.rank, pw.group_size, pw.hadamard, pw.weights
        self.register_buffer("basis", pw.basis)
        self.register_buffer("w_hi", pw.w_hi)
        self.register_buffer("qweight", pw.values)
        self.register_buffer("weight_scale", pw.scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("rotation_matrix", pw.hadamard_matrix(), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, second_moment: torch.Tensor, high_precision_fraction: float = 0.125,
                    group_size: int = 64, hadamard: str = "none", weights: str = "rtn") -> "DiRotQLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        with torch.no_grad():
            pw = pca_quantize_weight(linear.weight, second_moment, high_precision_fraction, group_size, hadamard,
                                     weights, gptq=gptq_options(linear.weight.device))
        return cls(pw, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pca_linear(x, self.basis, self.rotation_matrix, self.w_hi, self.qweight, self.weight_scale, self.bias,
                          self.rank, self.group_size, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank} in 16 bits, "
                f"int4 groups of {self.group_size}, hadamard={self.hadamard}, weights={self.weights}")


def make_quantized_linear(linear: nn.Linear, precision: str, group_size: int, rotation: "str | Rotation",
                          weights: str = "rtn", second_moment: torch.Tensor | None = None,
                          high_precision_fraction: float = 0.125) -> nn.Module:
    """The quantized module of ``linear`` at ``precision``. ``rotation="pca"`` (DiRotQ, w4a4 only) and
    ``weights="gptq"`` need the input's ``second_moment`` (calibration.Calibration.second_moment)."""
    if needs_calibration(rotation, weights) and precision not in WEIGHT_ONLY and second_moment is None:
        raise ValueError(f"rotation={rotation!r}, weights={weights!r} needs the input's second moment from a "
                         "calibration (convrot_compiler.calibrate)")
    if rotation in PCA_ROTATIONS:
        if precision == "w4a4":
            return DiRotQLinear.from_linear(linear, second_moment, high_precision_fraction, group_size,
                                            PCA_ROTATIONS[rotation], weights)
        if precision not in WEIGHT_ONLY:
            raise ValueError(f"rotation={rotation!r} (DiRotQ) is a W4A4 method; {precision} linears need a ConvRot "
                             "rotation: use a plan whose activation-quantized linears are all w4a4")
    if precision in ("w4a4", "w8a8"):
        quantizer = rtn_weight_quantizer
        if weights == "gptq":
            quantizer = gptq_quantizer(second_moment, make_rotation(rotation, group_size),
                                       **gptq_options(linear.weight.device))
        return ConvLinear4bit.from_linear(linear, group_size, rotation, bits=4 if precision == "w4a4" else 8,
                                          weight_quantizer=quantizer)
    if precision == "w4a16":
        return Int4WeightOnlyLinear.from_linear(linear, group_size)
    if precision == "w8a16":
        return Int8WeightOnlyLinear.from_linear(linear, group_size)
    raise ValueError(f"no quantized module for precision {precision!r}")


def quantized_module_for(linear: nn.Linear, decision: LayerDecision, group_size: int, rotation: "str | Rotation",
                         weights: str = "rtn", calibration=None, high_precision_fraction: float = 0.125) -> nn.Module:
    """``make_quantized_linear`` for a plan's decision, the second moment of its input read from ``calibration``
    (a calibration.Calibration, for the calibrated methods) where its activations are quantized."""
    moment = None
    if calibration is not None and decision.precision not in WEIGHT_ONLY:
        moment = calibration.second_moment(decision.name, decision.in_features)
    return make_quantized_linear(linear, decision.precision, group_size, rotation, weights, moment,
                                 high_precision_fraction)


def swap_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``name`` in ``model``; returns the module that was there."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, child)
    setattr(owner, child, module)
    return old


def quantize_model(
    model: nn.Module,
    plan: PlanSpec = "w4a4",
    group_size: int | None = None,
    rotation: "str | Rotation" = "regular",
    progress: bool = True,
    weights: str = "rtn",
    calibration=None,
    high_precision_fraction: float = 0.125,
) -> list[LayerDecision]:
    """Swap every planned nn.Linear of ``model`` for its quantized module, in place.

    ``rotation``: ConvRot's (``regular``, ``sylvester``, ``none``) or DiRotQ's (``pca``, ``pca-hadamard``);
    ``weights``: ``rtn`` or ``gptq``; the last two need a ``calibration`` of this model. ``group_size``
    defaults to 256 (ConvRot), 64 for DiRotQ. Returns one LayerDecision per linear, including those left
    alone and why."""
    from tqdm.auto import tqdm

    group_size = group_size or default_group_size(rotation)
    if rotation not in PCA_ROTATIONS:
        make_rotation(rotation, group_size)
    if weights not in WEIGHT_METHODS:
        raise ValueError(f"weights must be one of {WEIGHT_METHODS}, got {weights!r}")
    calibrated = needs_calibration(rotation, weights)
    if calibrated and calibration is None:
        raise ValueError(f"rotation={rotation!r}, weights={weights!r} needs a calibration: "
                         "cal = convrot_compiler.calibrate(model, batches)")
    if calibration is not None:
        calibration.check_model(model)
    decisions = decide_linears(model, plan, group_size)
    todo = [d for d in decisions if d.precision != "bf16"]
    if calibrated:
        calibration.check_covers(todo)  # every missing second moment fails before any layer is swapped
    for d in tqdm(todo, desc="quantizing linears", unit="layer", disable=not progress):
        new = quantized_module_for(model.get_submodule(d.name), d, group_size, rotation, weights,
                                   calibration if calibrated else None, high_precision_fraction)
        swap_module(model, d.name, new)
        d.bytes_after = module_bytes(new)
        if isinstance(new, DiRotQLinear):
            d.extra.update(method="dirotq", rank=new.rank, weights=weights)
    return decisions
