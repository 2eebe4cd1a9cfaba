"""Prepared (rotated, quantized, packed) weights, keyed by the parameter they come from.

The compiled graph does not bake quantized weights in as constants: it takes them
as extra inputs, looked up at every call from the parameter tensors Dynamo passes
in. Two instances of one model class therefore never share folded weights
(pytorch#139272), a second call never re-quantizes, and no weight ends up in a
compile-cache entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..numerics.gptq import gptq_quantizer
from ..numerics.pca import PCA_ROTATIONS, PCAWeight, pca_quantize_weight
from ..numerics.quant import WEIGHT_ONLY, QuantizedWeight, quantize_weight
from ..numerics.rotations import GroupHadamardRotation
from ..ops.dispatch import act_order_for, gptq_options, weight_only_layout


@dataclass(frozen=True)
class PrepSpec:
    """How one weight is prepared."""

    scheme: str
    rotation_kind: str
    group_size: int
    layout: str = "groups"  # a weight-only packed layout (quant.WEIGHT_ONLY_LAYOUTS)
    act_order: str = "natural"  # w4a4/w8a8: the input channels' order (quant.ACT_ORDERS, dispatch.act_order_for)
    weights: str = "rtn"        # "rtn", or "gptq" (with the calibration's Hessian)
    calibration: Any = None     # calibration.Calibration, for DiRotQ and GPTQ; compared by identity
    high_precision_fraction: float = 0.125  # DiRotQ's 16-bit subspace

    @property
    def rotation(self) -> GroupHadamardRotation | None:
        """The weight's rotation: none for weight-only int4, whose activations stay in float (DiRotQ's basis
        comes from the calibration)."""
        return None if self.scheme in WEIGHT_ONLY else GroupHadamardRotation(self.rotation_kind, self.group_size)

    @property
    def is_pca(self) -> bool:
        return self.rotation_kind in PCA_ROTATIONS and self.scheme not in WEIGHT_ONLY


def weight_spec(scheme: str, rotation_kind: str, group_size: int, weight: torch.Tensor, weights: str = "rtn",
                calibration: Any = None, high_precision_fraction: float = 0.125) -> PrepSpec:
    """How a weight is prepared for ``scheme`` where it runs (the packed layout, the channel order, the method):
    the one place, for the backend, ``compile`` and the Inductor post-grad pass."""
    if scheme in WEIGHT_ONLY:
        return PrepSpec(scheme, "none", group_size, weight_only_layout(weight, group_size))
    if rotation_kind in PCA_ROTATIONS:
        return PrepSpec(scheme, rotation_kind, group_size, weights=weights, calibration=calibration,
                        high_precision_fraction=high_precision_fraction)
    return PrepSpec(scheme, rotation_kind, group_size,
                    act_order=act_order_for(weight.device, weight.dtype, group_size, rotation_kind != "none"),
                    weights=weights, calibration=calibration if weights == "gptq" else None)


def record_spec(decision, spec: PrepSpec, qweight: QuantizedWeight | PCAWeight | None = None) -> None:
    """Write into a decision's ``extra`` how its weight is prepared, for reports and ``inspect``: the W4A16 layout,
    the W4A4/W8A8 channel order, the method and weight quantizer of a calibrated one, and DiRotQ's 16-bit rank
    (from ``qweight`` once prepared)."""
    if spec.scheme in WEIGHT_ONLY:
        decision.extra["layout"] = spec.layout
        return
    if spec.is_pca:
        decision.extra["method"] = "dirotq"
    else:
        decision.extra["act_order"] = spec.act_order
    if spec.calibration is not None:
        decision.extra["weights"] = spec.weights
    if isinstance(qweight, PCAWeight):
        decision.extra["rank"] = qweight.rank


def prepare_weight(weight: torch.Tensor, spec: PrepSpec, layer: str | None = None) -> QuantizedWeight | PCAWeight:
    """Rotate, quantize and pack a [N, K] weight as ``spec`` says. DiRotQ and GPTQ read the second moment of
    linear ``layer``'s input from ``spec.calibration`` (``layer`` None: the calibration's name of ``weight``)."""
    with torch.no_grad():
        if spec.calibration is None:
            return quantize_weight(weight.detach(), spec.scheme, spec.rotation, group_size=spec.group_size,
                                   layout=spec.layout, act_order=spec.act_order)
        cal = spec.calibration
        layer = layer or cal.layer_of(weight)
        moment = cal.second_moment(layer, weight.shape[1]).to(weight.device)
        if spec.is_pca:
            if spec.scheme != "w4a4":
                raise ValueError(f"{layer}: rotation {spec.rotation_kind!r} (DiRotQ) is a W4A4 method, not for "
                                 f"{spec.scheme}: use a plan whose activation-quantized linears are all w4a4")
            return pca_quantize_weight(weight.detach(), moment, spec.high_precision_fraction, spec.group_size,
                                       PCA_ROTATIONS[spec.rotation_kind], spec.weights,
                                       basis=cal.basis(layer, weight.dtype, weight.device),
                                       gptq=gptq_options(weight.device))
        return quantize_weight(weight.detach(), spec.scheme, spec.rotation, group_size=spec.group_size,
                               weight_quantizer=gptq_quantizer(moment, spec.rotation, **gptq_options(weight.device)),
                               layout=spec.layout, act_order=spec.act_order)


class PreparedWeights:
    """Cache of QuantizedWeight per (parameter, spec), with a counter of how often weights were prepared."""

    def __init__(self) -> None:
        self._cache = WeakIdKeyDictionary()  # identity, not tensor equality; entries die with the parameter
        self.prepared_count = 0

    def get(self, param: torch.Tensor, spec: PrepSpec) -> QuantizedWeight:
        per_param = self._cache.setdefault(param, {})
        entry = per_param.get(spec)
        version = param._version
        if entry is not None and entry[0] == version:
            return entry[1]
        if is_released(param):
            raise RuntimeError("a released weight (its float storage was freed by convrot_compiler.compile) has no "
                               f"prepared form for {spec}; compile the model again from its original weights")
        qw = prepare_weight(param, spec)
        self.prepared_count += 1
        per_param[spec] = (version, qw)
        return qw

    def put(self, param: torch.Tensor, spec: PrepSpec, qweight: QuantizedWeight) -> None:
        """Give ``param`` a weight prepared elsewhere (a checkpoint, another device) as its form for ``spec``."""
        self._cache.setdefault(param, {})[spec] = (param._version, qweight)


PREPARED = PreparedWeights()
_RELEASED = WeakIdKeyDictionary()


def release(param: torch.nn.Parameter) -> int:
    """Free a parameter's float storage, keeping shape, dtype and device (a stride-0 view of one
    element), so its memory goes back while the module and the compiled graph still see it.
    Returns the bytes freed."""
    freed = param.numel() * param.element_size()
    with torch.no_grad():
        param.data = torch.zeros(1, dtype=param.dtype, device=param.device).expand(param.shape)
    _RELEASED[param] = True
    return freed


def placeholder(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.nn.Parameter:
    """A released weight parameter from the start: the shape, dtype and device of a float weight whose
    storage is one element (as ``release`` leaves it), for a linear whose prepared weight comes from a
    checkpoint or was prepared on another device."""
    param = torch.nn.Parameter(torch.zeros(1, dtype=dtype, device=device).expand(shape), requires_grad=False)
    _RELEASED[param] = True
    return param


def release_storage(param: torch.nn.Parameter) -> int:
    """Free a parameter's float storage in place, keeping its shape, strides, dtype and device: for a weight
    that graphs already compiled take as an input (a functional linear's, found only when traced). ``release``
    gives the parameter new strides, which Dynamo's guards would see and compile again for; this changes
    nothing they check, and any read of the weight outside the compiled graphs fails loudly instead of
    reading zeros. The caller makes sure no other tensor shares the storage. Returns the bytes freed."""
    storage = param.untyped_storage()
    freed = storage.nbytes()
    storage.resize_(0)
    _RELEASED[param] = True
    return freed


def is_released(param: torch.Tensor) -> bool:
    return param in _RELEASED


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of storage held by a model's parameters and buffers (each storage counted once, so weights
    released by convrot_compiler.compile count as what they still hold; a tensor subclass such as
    torchao's float8 weights counts the tensors it is made of)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        for st in _storages(t):
            key = (st.data_ptr(), st.device)
            if key not in seen:
                seen.add(key)
                total += st.nbytes()
    return total


def _storages(t: torch.Tensor):
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        for name in t.__tensor_flatten__()[0]:
            yield from _storages(getattr(t, name))
    else:
        yield t.untyped_storage()
