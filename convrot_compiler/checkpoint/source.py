"""A diffusers model as files: its config, its safetensors shards, and its module structure on the meta
device (shapes and names, no memory), which is all the quantizer and the loader need before reading weights."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .tensor_file import TensorFile

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = WEIGHTS + ".index.json"


@dataclass
class SourceModel:
    folder: str                  # the model's own folder (a pipeline's transformer/)
    config: dict
    files: dict[str, list[str]]  # shard path -> its tensor keys, in the order of their data in the file


def model_class(name: str) -> type:
    import diffusers

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{name!r} is not a diffusers model class (diffusers {diffusers.__version__})")
    return cls


def meta_model(class_name: str, config: dict) -> nn.Module:
    """The model built from its config on the meta device: its modules, names and shapes, no weights."""
    cls = model_class(class_name)
    with torch.device("meta"):
        return cls.from_config(config).eval()


def open_source(path: str) -> SourceModel:
    """A diffusers model folder (``config.json`` and safetensors weights), or a pipeline root holding one in
    ``transformer/``. Shards are listed from their index; nothing is read but headers."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a folder; pass a diffusers model folder or a pipeline root")
    folder = path
    if not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isdir(os.path.join(path, "transformer")):
        folder = os.path.join(path, "transformer")
        second = os.path.join(path, "transformer_2")
        if os.path.isdir(second):
            warnings.warn(f"{path} also holds transformer_2 (a second expert, as Wan 2.2's, denoising the low-noise "
                          f"steps): this takes transformer/ only; quantize {second} into a checkpoint of its own",
                          stacklevel=2)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path}: no config.json (nor transformer/config.json): not a diffusers model folder")
    with open(config_path) as f:
        config = json.load(f)
    if "_class_name" not in config:
        raise ValueError(f"{config_path}: no _class_name: not a diffusers model config")
    index = os.path.join(folder, WEIGHTS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(folder, WEIGHTS)):
        shards = [WEIGHTS]
    else:
        found = sorted(n for n in os.listdir(folder) if n.startswith("diffusion_pytorch_model"))
        raise FileNotFoundError(f"{folder}: no {WEIGHTS} (found {found or 'nothing'}); only safetensors weights are "
                                "read (save the model with save_pretrained(safe_serialization=True))")
    files = {}
    for shard in shards:
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise FileNotFoundError(f"{shard_path}: missing (listed in {WEIGHTS_INDEX})")
        tensors = TensorFile(shard_path).tensors
        files[shard_path] = sorted(tensors, key=lambda key: tensors[key].begin)
    return SourceModel(folder, config, files)
