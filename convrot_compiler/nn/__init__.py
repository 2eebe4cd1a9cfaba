"""Eager quantized modules, for users who do not use torch.compile, and the reference the compiled path
must match."""

from .linear import ConvLinear4bit, DiRotQLinear, Int4WeightOnlyLinear, Int8WeightOnlyLinear, quantize_model

__all__ = ["ConvLinear4bit", "DiRotQLinear", "Int4WeightOnlyLinear", "Int8WeightOnlyLinear", "quantize_model"]
