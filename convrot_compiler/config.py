"""``ConvRotConfig``: every option of the convrot compiler, in one dataclass validated when it is made.

``convrot_compiler.compile(model, config, **overrides)`` reads all of it; the ``convrot`` torch.compile
backend reads the fields that act on one graph (``options={...}`` with those names, or
``options={"config": ConvRotConfig(...)}``); the CLI and the inspection tool build one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .calibration import Calibration
from .numerics.hadamard import ROTATION_KINDS
from .numerics.pca import PCA_ROTATIONS, WEIGHT_METHODS, default_group_size, needs_calibration
from .numerics.rotations import GroupHadamardRotation
from .plans import PlanSpec, make_plan

ATTENTION_MODES = ("keep", "fp8")
ATTENTION_SCALES = ("bound", "qk-bound", "absmax")


def check_attention_mode(mode: str) -> None:
    if mode not in ATTENTION_MODES:
        raise ValueError(f"option 'attention' must be one of {ATTENTION_MODES}, got {mode!r}")


def check_attention_scales(scales: str) -> None:
    if scales not in ATTENTION_SCALES:
        raise ValueError(f"option 'attention_scales' must be one of {ATTENTION_SCALES}, got {scales!r}")


@dataclass(frozen=True)
class ConvRotConfig:
    """What the compiler does. The first group of fields acts on each traced graph (the backend's options);
    the second on how ``convrot_compiler.compile`` applies it to a model."""

    plan: PlanSpec = "w4a4"              # preset name, (fnmatch pattern, precision) rules, or a Plan
    group_size: int | None = None        # ConvRot's rotation group, a power of 4 (256); DiRotQ's int4 group (64)
    rotation: str = "regular"            # ConvRot: "regular", "sylvester", "none"; DiRotQ: "pca", "pca-hadamard"
    weights: str = "rtn"                 # weight quantizer: "rtn", or "gptq" (needs a calibration)
    calibration: Any = None              # calibration.Calibration: for rotation "pca*" and weights "gptq"
    high_precision_fraction: float = 0.125  # DiRotQ: the share of each input's channels kept in 16 bits
    inductor: bool | None = None         # compile the rewritten graph with Inductor; None: on CUDA
    persistent_rows: bool = True         # Inductor keeps rows of up to 4096 values (LayerNorms) in registers
    report: Callable | None = None       # receives each graph's CompileReport
    linear_names: Callable | None = None  # weight -> the linear's name in the model, for graphs that start
                                          # inside a submodule (a whole-model trace with graph breaks)
    fuse_gemms: bool = True              # linears reading one input at one precision run as one GEMM
    fuse_producers: bool = True          # rotate+quantize reads a concatenation in place
    fuse_norms: bool = False             # rotate+quantize computes the adaLN LayerNorm + modulation before it
    gelu_epilogue: bool = True           # a GELU after a quantized linear runs in its GEMM's epilogue
    attention: str = "keep"              # "keep", or "fp8": per-tensor e4m3 Q, K, V
    attention_scales: str = "bound"      # fp8 Q, K (RMSNorm) and V (its GEMM's operands) scaled by proven bounds;
                                         # "qk-bound": V by its absmax; "absmax": all three
    fuse_attention_prologue: bool = True  # Q, K's RMSNorm and RoPE (fp8 by bound: and cast) as one kernel
    fuse_attention_output: bool = True   # fp8 attention's e4m3 output read as it is by the next rotate+quantize
    dry_run: bool = False                # plan and rewrite for inspection only; the graph runs unchanged

    release_weights: bool = True         # free the float storage of quantized weights
    fullgraph: bool = True               # passed to torch.compile
    dynamic: bool | None = False         # passed to torch.compile
    progress: bool = True                # a progress bar while weights are prepared
    cuda_graphs: bool | None = None      # replay each input signature as a CUDA graph; None: on CUDA
    max_graphs: int = 8                  # CUDA graphs kept, least recently used dropped first
    regional: bool | tuple[str, ...] | None = None  # one graph per block class; None: where blocks repeat
    device: str | None = None            # prepare each weight on this device, one layer at a time, then move there
    prepared: bool = False               # its quantized weights come prepared (convrot_compiler.load): no calibration

    def __post_init__(self) -> None:
        set_ = object.__setattr__.__get__(self)
        set_("plan", make_plan(self.plan))
        pca = self.rotation in PCA_ROTATIONS
        if self.rotation not in ROTATION_KINDS and not pca:
            raise ValueError(f"option 'rotation' must be one of {ROTATION_KINDS + tuple(PCA_ROTATIONS)}, got "
                             f"{self.rotation!r}")
        if self.group_size is None:
            set_("group_size", default_group_size(self.rotation))
        if pca:
            if self.group_size not in (64, 128, 256):
                raise ValueError(f"DiRotQ (rotation {self.rotation!r}) quantizes in groups of 64, 128 or 256, not "
                                 f"{self.group_size}")
            if not 0 <= self.high_precision_fraction < 1:
                raise ValueError(f"option 'high_precision_fraction' must be in [0, 1), got "
                                 f"{self.high_precision_fraction!r}")
        else:
            GroupHadamardRotation(self.rotation, self.group_size)  # validates group_size for the kind
        if self.weights not in WEIGHT_METHODS:
            raise ValueError(f"option 'weights' must be one of {WEIGHT_METHODS}, got {self.weights!r}")
        if self.needs_calibration and self.calibration is None and not self.prepared:
            raise ValueError(f"rotation={self.rotation!r} with weights={self.weights!r} needs a calibration of the "
                             "model: cal = convrot_compiler.calibrate(model, batches), then calibration=cal (on the "
                             "command line: convrot calibrate --out FILE, then --calibration FILE)")
        if self.calibration is not None and not isinstance(self.calibration, Calibration):
            raise TypeError(f"option 'calibration' must be a convrot_compiler.Calibration, got "
                            f"{type(self.calibration).__name__}")
        for key in ("inductor", "cuda_graphs", "dynamic"):
            if getattr(self, key) not in (None, True, False):
                raise ValueError(f"option {key!r} must be None, True or False, got {getattr(self, key)!r}")
        for key in ("dry_run", "fuse_gemms", "fuse_producers", "fuse_norms", "gelu_epilogue",
                    "fuse_attention_prologue", "fuse_attention_output",
                    "persistent_rows", "release_weights", "fullgraph", "progress", "prepared"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"option {key!r} must be a bool, got {getattr(self, key)!r}")
        check_attention_mode(self.attention)
        check_attention_scales(self.attention_scales)
        if self.report is not None and not callable(self.report):
            raise TypeError("option 'report' must be a callable taking a CompileReport")
        if not isinstance(self.max_graphs, int) or self.max_graphs < 1:
            raise ValueError(f"option 'max_graphs' must be a positive int, got {self.max_graphs!r}")
        if isinstance(self.regional, list):
            set_("regional", tuple(self.regional))
        if self.device is not None:
            set_("device", str(torch.device(self.device)))  # a bad name raises here
            if not self.release_weights:
                raise ValueError("option 'device' prepares each weight on the device and keeps no float copy of it: "
                                 "it needs release_weights=True")

    @property
    def needs_calibration(self) -> bool:
        return needs_calibration(self.rotation, self.weights)

    def spec_for(self, precision: str, weight: torch.Tensor):
        """How a weight this config quantizes at ``precision`` is prepared (compiler.weights.weight_spec)."""
        from .compiler.weights import weight_spec

        return weight_spec(precision, self.rotation, self.group_size, weight, self.weights, self.calibration,
                           self.high_precision_fraction)

    def replace(self, **overrides: Any) -> "ConvRotConfig":
        """A copy with ``overrides``, validated again; an unknown name is a TypeError. A rotation of the other
        method (ConvRot's, DiRotQ's) without a group size takes that method's default group size."""
        unknown = sorted(set(overrides) - set(FIELDS))
        if unknown:
            raise TypeError(f"unknown convrot option(s) {unknown}; valid options: {sorted(FIELDS)}")
        if "rotation" in overrides and "group_size" not in overrides and \
                (overrides["rotation"] in PCA_ROTATIONS) != (self.rotation in PCA_ROTATIONS):
            overrides = {**overrides, "group_size": None}
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_backend_options(cls, options: "dict | None") -> "ConvRotConfig":
        """The config of ``torch.compile(..., backend="convrot", options=options)``."""
        options = {} if options is None else options  # torch.compile passes none for {} or none given
        if not isinstance(options, dict):
            raise TypeError(f"convrot options must be a dict, got {type(options).__name__}")
        if "config" in options:
            config = options["config"]
            if len(options) > 1 or not isinstance(config, cls):
                raise TypeError("options={'config': ...} takes one ConvRotConfig and nothing beside it")
            return config
        model_level = sorted(set(options) & set(MODEL_FIELDS))
        if model_level:
            raise TypeError(f"option(s) {model_level} apply to convrot_compiler.compile, not to the torch.compile "
                            f"backend; the backend takes {sorted(GRAPH_FIELDS)}")
        return cls().replace(**options)


FIELDS = tuple(f.name for f in dataclasses.fields(ConvRotConfig))
MODEL_FIELDS = ("release_weights", "fullgraph", "dynamic", "progress", "cuda_graphs", "max_graphs", "regional",
                "device", "prepared")
GRAPH_FIELDS = tuple(f for f in FIELDS if f not in MODEL_FIELDS)
