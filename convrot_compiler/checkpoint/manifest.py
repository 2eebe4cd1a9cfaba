"""The checkpoint's manifest (``convrot.json``) and the safetensors headers it is checked against.

A checkpoint is a folder of safetensors shards and one JSON manifest: nothing is pickled. The manifest says
which model it is (the diffusers class and config), how it was quantized (plan, group size, rotation, the
packing and channel order of its tensors), every linear's decision with its reason, and every tensor's file,
dtype and shape. ``read_manifest`` validates the manifest and every shard's header against it before a
single tensor is read, so a broken checkpoint is one clear error naming the file and the tensor, never a
model that is half loaded or loaded wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .tensor_file import SAFETENSORS_DTYPES, CheckpointError, read_header

FORMAT = "convrot-checkpoint"
FORMAT_VERSION = 1       # ConvRot's checkpoints
PCA_FORMAT_VERSION = 3   # DiRotQ's: a basis per input and 16-bit columns besides the int4 ones, packed in pairs
PCA_GROUP_PACKED_VERSION = 2  # DiRotQ's with int4 packed per group: read, and repacked when loaded
MANIFEST = "convrot.json"
INT4_PACKING = "per group of G inputs: byte j holds input j (low nibble) and input j + G/2 (high nibble)"
PCA_INT4_PACKING = ("per pair of groups where the groups pair up, else per group (numerics.pca.int4_pack): per P "
                    "inputs, byte j holds input j (low nibble) and input j + P/2 (high nibble)")

def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{where}: unknown dtype {name!r}")
    return dtype


@dataclass
class TensorEntry:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class LayerEntry:
    """One nn.Linear of the model: what was decided and, when quantized, the keys of its prepared tensors."""

    name: str
    precision: str
    reason: str
    in_features: int
    out_features: int
    weight_dtype: torch.dtype
    values: str | None = None
    scale: str | None = None
    basis: str | None = None   # DiRotQ: its input's PCA basis (shared by the linears reading that input)
    w_hi: str | None = None    # DiRotQ: the 16-bit columns
    rank: int | None = None    # DiRotQ: the 16-bit columns of each block of inputs


@dataclass
class Manifest:
    model_class: str
    model_config: dict[str, Any]
    plan_name: str
    plan_rules: list[tuple[str, str]]
    group_size: int
    rotation: str
    channel_order: str
    w4a16_layout: str
    layers: list[LayerEntry]
    tensors: dict[str, TensorEntry]
    library_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    weights: str = "rtn"                    # the weight quantizer: "rtn" or "gptq"
    high_precision_fraction: float | None = None  # DiRotQ's checkpoints only
    pca_int4_pairs: bool = True             # DiRotQ's int4 packed per pair of groups (False: an older checkpoint)

    @property
    def format_version(self) -> int:
        return FORMAT_VERSION if self.high_precision_fraction is None else PCA_FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT,
            "format_version": self.format_version,
            "library": {"name": "convrot-compiler", "version": self.library_version},
            "model": {"class": self.model_class, "config": self.model_config},
            "quantization": {"plan": {"name": self.plan_name, "rules": [list(r) for r in self.plan_rules]},
                             "group_size": self.group_size, "rotation": self.rotation,
                             "channel_order": self.channel_order, "w4a16_layout": self.w4a16_layout,
                             "int4_packing": INT4_PACKING if self.high_precision_fraction is None else
                             PCA_INT4_PACKING, "weights": self.weights,
                             **({} if self.high_precision_fraction is None else
                                {"high_precision_fraction": self.high_precision_fraction})},
            "layers": [{"name": d.name, "precision": d.precision, "reason": d.reason, "in_features": d.in_features,
                        "out_features": d.out_features, "weight_dtype": dtype_name(d.weight_dtype),
                        **({"tensors": {"values": d.values, "scale": d.scale,
                                        **({"basis": d.basis, "w_hi": d.w_hi} if d.basis else {})}}
                           if d.values else {}),
                        **({"rank": d.rank} if d.rank is not None else {})}
                       for d in self.layers],
            "tensors": {k: {"file": t.file, "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
                        for k, t in self.tensors.items()},
        }, indent=1)


def _need(obj: dict, key: str, kind: type, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise CheckpointError(f"{where}: no {key!r}")
    value = obj[key]
    if not isinstance(value, kind):
        raise CheckpointError(f"{where}: {key!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def read_manifest(folder: str) -> Manifest:
    """The manifest of the checkpoint in ``folder``, validated, with every shard's header checked against it
    (files present and complete, every tensor there with its dtype and shape)."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not a folder; pass the folder convrot quantize wrote")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no manifest; this is not a convrot checkpoint (convrot quantize writes one)")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if _need(raw, "format", str, path) != FORMAT:
        raise CheckpointError(f"{path}: format {raw['format']!r} is not {FORMAT!r}")
    version = _need(raw, "format_version", int, path)
    readable = (FORMAT_VERSION, PCA_GROUP_PACKED_VERSION, PCA_FORMAT_VERSION)
    if version not in readable:
        raise CheckpointError(f"{path}: format version {version} is not one this convrot-compiler reads "
                              f"({', '.join(map(str, readable))}); quantize the model again, or use the "
                              "version that wrote it")
    pca = version in (PCA_GROUP_PACKED_VERSION, PCA_FORMAT_VERSION)
    model = _need(raw, "model", dict, path)
    quant = _need(raw, "quantization", dict, path)
    plan = _need(quant, "plan", dict, f"{path}: quantization")
    rules = _need(plan, "rules", list, f"{path}: quantization.plan")
    if not all(isinstance(r, list) and len(r) == 2 and all(isinstance(x, str) for x in r) for r in rules):
        raise CheckpointError(f"{path}: quantization.plan.rules must be [pattern, precision] pairs")
    tensors = {}
    for key, t in _need(raw, "tensors", dict, path).items():
        where = f"{path}: tensor {key!r}"
        shape = _need(t, "shape", list, where)
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape {shape} is not a list of sizes")
        tensors[key] = TensorEntry(_need(t, "file", str, where), parse_dtype(_need(t, "dtype", str, where), where),
                                   tuple(shape))
    layers = []
    for i, d in enumerate(_need(raw, "layers", list, path)):
        where = f"{path}: layers[{i}]"
        name = _need(d, "name", str, where)
        where = f"{path}: layer {name!r}"
        entry = LayerEntry(name, _need(d, "precision", str, where), _need(d, "reason", str, where),
                           _need(d, "in_features", int, where), _need(d, "out_features", int, where),
                           parse_dtype(_need(d, "weight_dtype", str, where), where))
        if entry.precision != "bf16":
            keys = _need(d, "tensors", dict, where)
            entry.values, entry.scale = _need(keys, "values", str, where), _need(keys, "scale", str, where)
            if pca and entry.precision == "w4a4":
                entry.basis, entry.w_hi = _need(keys, "basis", str, where), _need(keys, "w_hi", str, where)
                entry.rank = _need(d, "rank", int, where)
            for key in (entry.values, entry.scale, entry.basis, entry.w_hi):
                if key is not None and key not in tensors:
                    raise CheckpointError(f"{where}: its tensor {key!r} is not in the manifest's tensors")
        layers.append(entry)
    manifest = Manifest(_need(model, "class", str, f"{path}: model"), _need(model, "config", dict, f"{path}: model"),
                        _need(plan, "name", str, f"{path}: quantization.plan"), [tuple(r) for r in rules],
                        _need(quant, "group_size", int, f"{path}: quantization"),
                        _need(quant, "rotation", str, f"{path}: quantization"),
                        _need(quant, "channel_order", str, f"{path}: quantization"),
                        _need(quant, "w4a16_layout", str, f"{path}: quantization"), layers, tensors,
                        raw.get("library", {}).get("version", ""), weights=quant.get("weights", "rtn"),
                        high_precision_fraction=(_need(quant, "high_precision_fraction", float,
                                                       f"{path}: quantization") if pca else None),
                        pca_int4_pairs=version != PCA_GROUP_PACKED_VERSION)
    check_shards(folder, manifest)
    return manifest


def check_shards(folder: str, manifest: Manifest) -> None:
    """Every tensor of the manifest is in its file, complete, with the dtype and shape the manifest says."""
    headers: dict[str, dict] = {}
    for key, entry in manifest.tensors.items():
        path = os.path.join(folder, entry.file)
        if os.path.basename(entry.file) != entry.file:
            raise CheckpointError(f"{os.path.join(folder, MANIFEST)}: tensor {key!r} names file {entry.file!r} "
                                  "outside the checkpoint folder")
        if entry.file not in headers:
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: missing (the manifest puts tensor {key!r} there)")
            headers[entry.file] = read_header(path)
        found = headers[entry.file].get(key)
        if found is None:
            raise CheckpointError(f"{path}: tensor {key!r} is missing")
        dtype = SAFETENSORS_DTYPES.get(found[0])
        if dtype != entry.dtype or found[1] != entry.shape:
            raise CheckpointError(f"{path}: tensor {key!r} is {found[0]} {list(found[1])}, the manifest says "
                                  f"{dtype_name(entry.dtype)} {list(entry.shape)}")
