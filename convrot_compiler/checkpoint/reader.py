"""``convrot_compiler.load``: a quantized checkpoint in, the model out, ready for ``convrot_compiler.compile``.

The model is built on the meta device from the checkpoint's config. Each quantized linear's weight becomes a
placeholder with no float storage (as ``compile`` leaves a released weight), and its prepared tensors, read
one at a time (tensor_file.py) and moved to the device, are registered as that weight's prepared form in the
layout and channel order the device's kernels take (converted from the checkpoint's own: the integer values
moved, never quantized again). Every other tensor is loaded as saved. So the device holds the quantized model
and one layer's converted copy at most, and ``compile`` finds every weight prepared.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn

from ..compiler.compile_model import guard_released
from ..compiler.weights import PREPARED, placeholder
from ..config import ConvRotConfig
from ..numerics.pca import PCA_ROTATIONS, PCAWeight, pairs_from_group_packed, pca_rank, pca_shapes
from ..numerics.quant import WEIGHT_ONLY, QuantizedWeight, prepared_shapes, relayout
from ..numerics.rotations import GroupHadamardRotation
from ..plans import Plan, iter_linears
from .manifest import FORMAT_VERSION, MANIFEST, PCA_FORMAT_VERSION, CheckpointError, Manifest, dtype_name, read_manifest
from .source import meta_model
from .tensor_file import TensorFile


@dataclass(frozen=True)
class CheckpointInfo:
    """How a loaded model was quantized: ``compile`` takes these instead of its defaults."""

    path: str
    plan: Plan
    group_size: int
    rotation: str
    high_precision_fraction: float | None = None  # DiRotQ's checkpoints

    def config_fields(self) -> dict:
        fields = {"plan": self.plan, "group_size": self.group_size, "rotation": self.rotation, "prepared": True}
        if self.high_precision_fraction is not None:
            fields["high_precision_fraction"] = self.high_precision_fraction
        return fields


def check_model_config(manifest: Manifest, config: dict, where: str) -> None:
    """The checkpoint was made from a model with ``config`` (diffusers' own ``_`` keys aside)."""
    ours = {k: v for k, v in manifest.model_config.items() if not k.startswith("_")}
    theirs = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    differ = sorted(k for k in set(ours) | set(theirs) if _plain(ours.get(k)) != _plain(theirs.get(k)))
    if differ or manifest.model_class != dict(config).get("_class_name", manifest.model_class):
        detail = ", ".join(f"{k}: {ours.get(k)!r} vs {theirs.get(k)!r}" for k in differ[:4])
        raise CheckpointError(f"{where}: the checkpoint is for another model ({manifest.model_class} with {detail}); "
                              "quantize this model instead")


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _quantization(manifest: Manifest, path: str) -> ConvRotConfig:
    try:
        pca = {} if manifest.high_precision_fraction is None else \
            {"high_precision_fraction": manifest.high_precision_fraction}
        config = ConvRotConfig(plan=Plan(manifest.plan_name, tuple(manifest.plan_rules)),
                               group_size=manifest.group_size, rotation=manifest.rotation, prepared=True, **pca)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(path, MANIFEST)}: {e}") from None
    if (manifest.rotation in PCA_ROTATIONS) != (manifest.high_precision_fraction is not None):
        raise CheckpointError(f"{os.path.join(path, MANIFEST)}: rotation {manifest.rotation!r} in a checkpoint of "
                              f"format version {manifest.format_version}: DiRotQ's rotations take version "
                              f"{PCA_FORMAT_VERSION}, ConvRot's {FORMAT_VERSION}")
    return config


def _check_layers(manifest: Manifest, model: nn.Module, path: str) -> dict[str, nn.Linear]:
    """The manifest's layers are the model's nn.Linear modules, with their sizes, and each quantized one's
    tensors have the shapes its precision gives."""
    where = os.path.join(path, MANIFEST)
    linears = dict(iter_linears(model))
    names = [layer.name for layer in manifest.layers]
    lacking = [n for n in names if n not in linears]
    if lacking:
        raise CheckpointError(f"{where}: its plan names layers the model ({manifest.model_class} with its config) "
                              f"lacks: {lacking[:5]}")
    unlisted = sorted(set(linears) - set(names))
    if unlisted:
        raise CheckpointError(f"{where}: the model's linears {unlisted[:5]} have no entry in the manifest")
    for layer in manifest.layers:
        lin = linears[layer.name]
        if (lin.in_features, lin.out_features) != (layer.in_features, layer.out_features):
            raise CheckpointError(f"{where}: layer {layer.name!r} is {layer.in_features}->{layer.out_features}, the "
                                  f"model's is {lin.in_features}->{lin.out_features}")
        if layer.precision == "bf16":
            continue
        if layer.basis is not None:
            fraction = manifest.high_precision_fraction
            shapes = pca_shapes(layer.out_features, layer.in_features, fraction, manifest.group_size,
                                layer.weight_dtype)
            rank = pca_rank(layer.in_features, fraction, manifest.group_size)
            if layer.rank != rank:
                raise CheckpointError(f"{where}: layer {layer.name!r} has rank {layer.rank}; {fraction} of its inputs "
                                      f"in 16 bits is {rank} per block")
            expected = [(getattr(layer, k), *shapes[k]) for k in ("basis", "w_hi", "values", "scale")]
        else:
            layout = manifest.w4a16_layout if layer.precision == "w4a16" else "groups"
            values, values_dtype, scale = prepared_shapes(layer.precision, layer.out_features, layer.in_features,
                                                          manifest.group_size, layout)
            expected = [(layer.values, values, values_dtype), (layer.scale, scale, torch.float32)]
        for key, shape, dtype in expected:
            entry = manifest.tensors[key]
            if entry.shape != shape or entry.dtype != dtype:
                raise CheckpointError(f"{os.path.join(path, entry.file)}: tensor {key!r} is {dtype_name(entry.dtype)} "
                                      f"{list(entry.shape)}; {layer.precision} {layer.name!r} needs "
                                      f"{dtype_name(dtype)} {list(shape)}")
    return linears


def load(path: str, device: str | torch.device | None = None, expect_config: dict | None = None) -> nn.Module:
    """The quantized model of the checkpoint in folder ``path`` (``convrot quantize``) on ``device`` (default:
    CUDA when there is one). ``expect_config``: the diffusers config of the model it must have been made from
    (a pipeline's transformer), else an error. Every file and tensor is checked before any is read."""
    manifest = read_manifest(path)
    quantization = _quantization(manifest, path)
    if expect_config is not None:
        check_model_config(manifest, expect_config, path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = meta_model(manifest.model_class, manifest.model_config)
    linears = _check_layers(manifest, model, path)
    quantized = [layer for layer in manifest.layers if layer.precision != "bf16"]
    prepared_keys = {k for layer in quantized for k in (layer.values, layer.scale, layer.basis, layer.w_hi)
                     if k is not None}
    expected = (set(model.state_dict()) - {f"{layer.name}.weight" for layer in quantized}) | prepared_keys
    stored = set(manifest.tensors)
    if expected - stored:
        raise CheckpointError(f"{os.path.join(path, MANIFEST)}: the model's tensors {sorted(expected - stored)[:5]} "
                              "are not in the checkpoint")
    if stored - expected:
        raise CheckpointError(f"{os.path.join(path, MANIFEST)}: tensors {sorted(stored - expected)[:5]} belong to no "
                              f"tensor of {manifest.model_class} with its config")

    tensors: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for key, entry in manifest.tensors.items():
        by_file.setdefault(entry.file, []).append(key)
    for file, keys in sorted(by_file.items()):
        with TensorFile(os.path.join(path, file)) as f:
            for key in keys:
                tensors[key] = f.read(key).to(device)
    state = {k: t for k, t in tensors.items() if k not in prepared_keys}
    model.load_state_dict(state, strict=False, assign=True)
    for layer in quantized:  # each stored form dropped as its device form is made: one layer's copy at a time
        lin = linears[layer.name]
        param = placeholder((layer.out_features, layer.in_features), layer.weight_dtype, device)
        spec = quantization.spec_for(layer.precision, param)
        if layer.basis is not None:
            values = tensors.pop(layer.values)
            if not manifest.pca_int4_pairs:
                values = pairs_from_group_packed(values, quantization.group_size)
            PREPARED.put(param, spec, PCAWeight(
                tensors[layer.basis], tensors.pop(layer.w_hi), values, tensors.pop(layer.scale),
                layer.in_features, layer.out_features, layer.rank, quantization.group_size,
                PCA_ROTATIONS[quantization.rotation], manifest.weights))
            lin.weight = param
            continue
        weight_only = layer.precision in WEIGHT_ONLY
        stored_weight = QuantizedWeight(
            layer.precision, tensors.pop(layer.values), tensors.pop(layer.scale), layer.in_features, layer.out_features,
            -(-layer.in_features // quantization.group_size) * quantization.group_size, quantization.group_size,
            None if weight_only else GroupHadamardRotation(quantization.rotation, quantization.group_size),
            manifest.w4a16_layout if layer.precision == "w4a16" else "groups",
            "natural" if weight_only else manifest.channel_order)
        PREPARED.put(param, spec, relayout(stored_weight, spec.act_order, spec.layout))
        lin.weight = param
    left = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: {left[:5]} of {manifest.model_class} are neither in the checkpoint nor "
                              "computed from its config")
    guard_released(model, {layer.name: linears[layer.name] for layer in quantized})
    model.convrot_checkpoint = CheckpointInfo(path, quantization.plan, quantization.group_size, quantization.rotation,
                                              manifest.high_precision_fraction)
    return model
