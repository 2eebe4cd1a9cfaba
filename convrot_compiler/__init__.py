"""ConvRot W4A4 quantization for diffusion transformers, as a torch.compile compiler; DiRotQ (calibrated PCA
rotation) and GPTQ weights as second methods of the same compiler."""

from .calibration import Calibration, CalibrationError, Calibrator, calibrate
from .checkpoint import CheckpointError, load, quantize
from .compiler.backend import CompileReport, convrot_backend
from .compiler.compile_model import compile, is_compiled
from .compiler.inductor_pass import ConvRotInductorPass
from .config import ConvRotConfig
from .nn import ConvLinear4bit, DiRotQLinear, Int4WeightOnlyLinear, Int8WeightOnlyLinear, quantize_model
from .plans import load_plan, save_plan
from .sensitivity import budget_plan, sensitivity
from .tools.inspection import InspectReport, inspect

__all__ = ["compile", "is_compiled", "ConvRotConfig", "convrot_backend", "CompileReport", "ConvRotInductorPass",
           "inspect", "InspectReport", "quantize", "load", "CheckpointError", "sensitivity", "budget_plan", "save_plan",
           "load_plan", "ConvLinear4bit", "Int4WeightOnlyLinear", "Int8WeightOnlyLinear", "quantize_model",
           "calibrate", "Calibration", "Calibrator", "CalibrationError", "DiRotQLinear"]
