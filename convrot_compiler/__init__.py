"""ConvRot W4A4 quantization for diffusion transformers, as a torch.compile compiler."""

from .backend import CompileReport, compile, convrot_backend  # noqa: E402,F401
from .modules import ConvLinear4bit, Int4WeightOnlyLinear, quantize_model  # noqa: E402,F401

__all__ = ["compile", "convrot_backend", "CompileReport", "ConvLinear4bit", "Int4WeightOnlyLinear", "quantize_model"]
