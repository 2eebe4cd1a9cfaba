"""ConvRot W4A4 quantization for diffusion transformers, as a torch.compile compiler."""

from .backend import CompileReport, convrot_backend
from .compile_model import compile, is_compiled
from .config import ConvRotConfig
from .modules import ConvLinear4bit, Int4WeightOnlyLinear, quantize_model

__all__ = ["compile", "is_compiled", "ConvRotConfig", "convrot_backend", "CompileReport", "ConvLinear4bit",
           "Int4WeightOnlyLinear", "quantize_model"]
