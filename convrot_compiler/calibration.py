"""Calibration for the methods that need one (DiRotQ's PCA basis, GPTQ's Hessian): the second moment
E[x^T x] of each quantized linear's input, accumulated in float32 on the model's device while the model runs
on real inputs. No activation is stored. Linears that read one tensor (FLUX's Q, K and V) share one matrix.

    cal = convrot_compiler.calibrate(model, batches)           # batches: tuples of args or dicts of kwargs
    with convrot_compiler.Calibrator(pipe.transformer) as cal:  # or around real denoising
        pipe(prompt, num_inference_steps=25)
    cal.save("flux.calibration.safetensors")
    convrot_compiler.compile(model, rotation="pca", calibration=Calibration.load(...))
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .numerics.pca import PCA_BLOCK, block_shape, pca_bases
from .numerics.quant import WEIGHT_ONLY
from .plans import LayerDecision, PlanSpec, decide_linears

FORMAT = "convrot-calibration"
VERSION = 1


class CalibrationError(ValueError):
    """A calibration that does not fit the model or layer it is used for."""


def model_fingerprint(model: nn.Module) -> dict:
    """What a calibration is checked against: the model's class, a hash of its config (diffusers models have
    one), and each linear's (in_features, out_features)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):  # transformers' configs; diffusers' are mappings
        config = config.to_dict()
    # private keys (_name_or_path, _diffusers_version, ...) say where a config was read, not what the model is
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")} if config is not None else None
    config_json = json.dumps(config, sort_keys=True, default=str) if config is not None else ""
    linears = {name: [m.in_features, m.out_features] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return {"class": type(model).__name__, "config_sha256": hashlib.sha256(config_json.encode()).hexdigest()[:16],
            "linears": linears}


@dataclass(eq=False)
class Calibration:
    """Second moments by linear name. ``moments``: float32 sums of x^T x in diagonal blocks [n, b, b]
    (numerics.pca.block_shape: one [1, K, K] block up to 3072 inputs), one per distinct input, under the name of
    the first linear reading it; ``shared``: linear name -> that first linear's name, for every
    calibrated linear (itself for a first one); ``tokens``: rows summed, per first linear."""

    moments: dict[str, torch.Tensor]
    shared: dict[str, str]
    tokens: dict[str, int]
    model: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from torch.utils.weak import WeakIdKeyDictionary

        self._names = WeakIdKeyDictionary()  # weight parameter -> its linear's name in the bound model
        self._bases: dict[tuple, torch.Tensor] = {}
        self._released = False

    def bind(self, model: nn.Module) -> None:
        """Check ``model`` (``check_model``) and learn which linear each weight parameter belongs to, so that a
        weight met in a compiled graph (where names may be relative to a block) finds its second moment."""
        self.check_model(model)
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                self._names[module.weight] = name

    def bind_weight(self, weight: torch.Tensor, name: str) -> None:
        """Learn one weight's linear name (a weight moved to another device, a whole-model graph's linear)."""
        if weight not in self._names:
            self._names[weight] = name

    def shallow_copy(self) -> "Calibration":
        """A calibration sharing this one's moment tensors, with its own names, bases and dicts: what ``compile``
        binds and later lets go of (``release_moments``) without touching the caller's."""
        return Calibration(dict(self.moments), dict(self.shared), dict(self.tokens), dict(self.model))

    def release_moments(self) -> None:
        """Drop the second moments and the cached bases; names and sharing stay. Asking for a moment afterwards is a
        clear error."""
        self.moments = {}
        self._bases.clear()
        self._released = True

    def layer_of(self, weight: torch.Tensor) -> str:
        name = self._names.get(weight)
        if name is None:
            raise CalibrationError("a weight whose linear the calibration does not know: compile the model the "
                                   "calibration was bound to (convrot_compiler.compile binds it)")
        return name

    def basis(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Linear ``name``'s PCA basis (numerics.pca.pca_basis) in ``dtype`` on ``device``, computed once per
        input: linears reading one tensor share one basis tensor."""
        key = (self.shared.get(name, name), dtype, torch.device(device))
        if key not in self._bases:
            self._bases[key] = pca_bases(self.second_moment(name).to(device)).to(dtype)
        return self._bases[key]

    def forget_basis(self, name: str) -> None:
        """Drop the bases cached for linear ``name``'s input (in every dtype and on every device): for a caller that
        has prepared every linear reading it and keeps what it needs (``convrot quantize`` writes each basis once
        and would otherwise hold all of them on the device, about 9 GB for FLUX.1-dev)."""
        lead = self.shared.get(name, name)
        for key in [k for k in self._bases if k[0] == lead]:
            del self._bases[key]

    def cached_basis_bytes(self) -> int:
        """Bytes of the bases ``basis`` holds for reuse."""
        return sum(t.numel() * t.element_size() for t in self._bases.values())

    @property
    def layers(self) -> list[str]:
        return list(self.shared)

    def covers(self, name: str) -> bool:
        return name in self.shared

    def second_moment(self, name: str, in_features: int | None = None) -> torch.Tensor:
        """E[x^T x] of linear ``name``'s input in diagonal blocks, float32 [n, b, b] with n b = K; a clear error for
        a layer the calibration never saw or one of another width."""
        if name not in self.shared:
            raise CalibrationError(f"{name}: the calibration never saw this linear (it covers {len(self.shared)} "
                                   "linears); calibrate with a plan that quantizes it, or keep it out of the plan")
        lead = self.shared[name]
        if self._released:
            raise CalibrationError(f"{name}: this compiled model let its calibration's moments go once every weight "
                                   "was prepared (release_weights=True); a weight prepared later needs them: "
                                   "compile again with the calibration, or with release_weights=False")
        moment = self.moments[lead]
        width = moment.shape[0] * moment.shape[1]
        if in_features is not None and width != in_features:
            raise CalibrationError(f"{name}: calibrated on {width} inputs, the layer has {in_features}: "
                                   "the calibration comes from another model")
        return moment / max(self.tokens[lead], 1)

    def check_covers(self, decisions: Iterable[LayerDecision]) -> None:
        """Refuse, before any weight is prepared, decisions that quantize the activations of a linear this
        calibration has no second moment of its width for (``second_moment``'s errors)."""
        for d in decisions:
            if d.precision not in ("bf16", *WEIGHT_ONLY):
                self.second_moment(d.name, d.in_features)

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model this calibration was not made on (another class, config, or linear shapes)."""
        if not self.model:
            return
        mine = model_fingerprint(model)
        if mine["class"] != self.model["class"] or mine["config_sha256"] != self.model["config_sha256"]:
            raise CalibrationError(f"the calibration was made on a {self.model['class']} with config "
                                   f"{self.model['config_sha256']}, not this {mine['class']} (config "
                                   f"{mine['config_sha256']}): calibrate this model")
        for name in self.shared:
            if mine["linears"].get(name) != self.model["linears"].get(name):
                raise CalibrationError(f"{name}: shape {mine['linears'].get(name)} in this model, "
                                       f"{self.model['linears'].get(name)} in the calibrated one")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.moments.values())

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "version": str(VERSION), "shared": json.dumps(self.shared),
                "tokens": json.dumps(self.tokens), "model": json.dumps(self.model)}
        save_file({k: v.contiguous().cpu() for k, v in self.moments.items()}, path, metadata=meta)

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu") -> "Calibration":
        from safetensors import safe_open

        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CalibrationError(f"{path} is not a convrot calibration file (no {FORMAT!r} metadata)")
            if int(meta.get("version", 0)) > VERSION:
                raise CalibrationError(f"{path}: calibration format version {meta['version']} is newer than this "
                                       f"convrot-compiler reads ({VERSION}); upgrade convrot-compiler")
            moments = {k: f.get_tensor(k) for k in f.keys()}
        return cls(moments, json.loads(meta["shared"]), json.loads(meta["tokens"]), json.loads(meta["model"]))


def check_fits(need: int, linears: int, device: torch.device) -> None:
    """Refuse, before the first forward, second moments that cannot fit in the free memory of the model's GPU."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if need > free:
        raise CalibrationError(f"the second moments of {linears} linears need up to {need / 2**30:.1f} GiB on "
                               f"{device}, {free / 2**30:.1f} GiB is free: calibrate fewer linears (layers=...), or "
                               "keep wide inputs in smaller diagonal blocks (block=..., convrot calibrate --block)")


class Calibrator:
    """Hooks on a model's linears that accumulate their inputs' second moments while it runs; a context
    manager whose value is the growing ``Calibration``. ``plan``: the linears of 16-bit-or-more activations
    that it quantizes are calibrated (weight-only and bf16 linears need none); ``layers``: these names instead."""

    def __init__(self, model: nn.Module, plan: PlanSpec = "w4a4", layers: Iterable[str] | None = None,
                 block: int | None = None):
        if layers is None:
            layers = [d.name for d in decide_linears(model, plan) if d.precision not in ("bf16", *WEIGHT_ONLY)]
        self.names = list(layers)
        if not self.names:
            raise CalibrationError(f"nothing to calibrate: no linear of {type(model).__name__} is quantized with "
                                   "quantized activations under this plan")
        self.model = model
        self.block = block or PCA_BLOCK
        modules = dict(model.named_modules())
        missing = [n for n in self.names if not isinstance(modules.get(n), nn.Linear)]
        if missing:
            raise CalibrationError(f"{missing[0]} is not a linear of {type(model).__name__}")
        self.calibration = Calibration({}, {}, {}, model_fingerprint(model))
        self._check_memory(modules)
        self._seen: dict[int, tuple[weakref.ref, str]] = {}  # this forward's inputs: id -> (tensor, first reader)
        self._handles: list = []

    def estimated_bytes(self, modules: dict | None = None) -> int:
        """The second moments' size if no two calibrated linears shared an input (an upper bound)."""
        modules = modules or dict(self.model.named_modules())
        total = 0
        for name in self.names:
            n, b = block_shape(modules[name].in_features, block=self.block)
            total += 4 * n * b * b
        return total

    def _check_memory(self, modules: dict) -> None:
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        check_fits(self.estimated_bytes(modules), len(self.names), device)

    def __enter__(self) -> Calibration:
        modules = dict(self.model.named_modules())
        self._handles = [modules[n].register_forward_pre_hook(self._hook(n)) for n in self.names]
        self._handles.append(self.model.register_forward_pre_hook(lambda *a: self._seen.clear()))
        return self.calibration

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._seen.clear()

    def _hook(self, name: str):
        cal = self.calibration

        def hook(module, args):
            x = args[0]
            entry = self._seen.get(id(x))
            lead = entry[1] if entry is not None and entry[0]() is x else None
            known = cal.shared.get(name)
            if known is None:
                cal.shared[name] = lead or name
            elif lead != (known if known != name else None):
                raise CalibrationError(f"{name}: its input was shared with other linears in one calibration batch "
                                       "and not in another: the model's data flow changed between batches")
            if lead is not None:
                return
            self._seen[id(x)] = (weakref.ref(x), name)
            k = x.shape[-1]
            n, b = block_shape(k, block=self.block)
            blocks = x.detach().reshape(-1, n, b).float().transpose(0, 1)  # [n, M, b]
            if name not in cal.moments:
                cal.moments[name] = torch.zeros(n, b, b, dtype=torch.float32, device=x.device)
                cal.tokens[name] = 0
            cal.moments[name].baddbmm_(blocks.transpose(1, 2), blocks)
            cal.tokens[name] += blocks.shape[1]

        return hook


def calibrate(model: nn.Module, batches: Iterable, plan: PlanSpec = "w4a4", layers: Iterable[str] | None = None,
              progress: bool = True, block: int | None = None) -> Calibration:
    """Run ``model`` on each batch (a tuple of positional arguments, or a dict of keyword arguments) under a
    ``Calibrator`` and return the calibration. The model is left as it was. ``block``: the widest input whose
    second moment is one matrix (numerics.pca.PCA_BLOCK, 3072); wider ones are kept in diagonal blocks."""
    from tqdm.auto import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None
    with Calibrator(model, plan, layers, block) as cal, torch.no_grad():
        for batch in tqdm(batches, total=total, desc="calibration", unit="batch", disable=not progress):
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                raise TypeError(f"a calibration batch is a tuple of arguments or a dict of keyword arguments, "
                                f"got {type(batch).__name__}")
    if not cal.moments:
        raise CalibrationError("the model ran none of the calibrated linears: no batches, or they never ran")
    return cal
