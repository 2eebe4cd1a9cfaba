"""Quantized checkpoints: ``quantize`` writes one from a diffusers model's safetensors shards, layer by layer;
``load`` builds the model back from it with only the quantized weights materialised. Safetensors and JSON
only: nothing is pickled."""

from .manifest import CheckpointError, Manifest, read_manifest
from .reader import CheckpointInfo, check_model_config, load
from .writer import quantize

__all__ = ["CheckpointError", "CheckpointInfo", "Manifest", "check_model_config", "load", "quantize", "read_manifest"]
