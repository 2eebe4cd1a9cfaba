"""``convrot quantize``: a diffusers model's safetensors shards in, a quantized checkpoint out, one tensor at a
time.

The source is read tensor by tensor from its shards, each into memory of its own (tensor_file.py); each weight
the plan quantizes goes to the device alone, is rotated, quantized and packed there, and comes back; every
other tensor is copied as it is.
So the device holds the largest layer and its working copies, never the model, and the process holds one
source tensor and one output shard at a time. The checkpoint is written to a temporary folder and renamed
when complete: an interrupted run never leaves a folder that looks like a checkpoint. With ``resume`` the
temporary folder (``OUT.partial``) outlives an interruption, and the next run with ``resume`` keeps the shards
it finished and quantizes the rest (GPTQ on a large model takes minutes).
"""

from __future__ import annotations

import collections
import os
import shutil
from dataclasses import dataclass

import torch

from ..compiler.compile_model import check_calibrated_plan
from ..compiler.roles import decide_model
from ..compiler.weights import PrepSpec, prepare_weight
from ..config import ConvRotConfig
from ..numerics.pca import PCA_ROTATIONS, PCAWeight, pca_rank
from ..numerics.quant import WEIGHT_ONLY
from .manifest import MANIFEST, LayerEntry, Manifest, TensorEntry
from .source import meta_model, open_source
from .tensor_file import SAFETENSORS_DTYPES, CheckpointError, TensorFile, read_header

CHANNEL_ORDER, W4A16_LAYOUT = "natural", "groups"  # the layout a checkpoint stores (the loader converts)


def library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("convrot-compiler")
    except PackageNotFoundError:
        return ""


@dataclass
class _ShardWriter:
    """Output tensors buffered up to ``max_bytes``, then written as one safetensors shard."""

    folder: str
    max_bytes: int
    peak_bytes: int = 0

    def __post_init__(self):
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.tensors: dict[str, TensorEntry] = {}
        self.shards = 0
        self._resume_shards()

    def _resume_shards(self) -> None:
        """Take in the shards an interrupted run of ``resume`` left in the folder."""
        for name in sorted(n for n in os.listdir(self.folder) if n.startswith("model-") and n.endswith(".safetensors")):
            try:
                header = read_header(os.path.join(self.folder, name))
                for key, (dtype, shape) in header.items():
                    self.tensors[key] = TensorEntry(name, SAFETENSORS_DTYPES[dtype], shape)
            except CheckpointError:  # a shard cut short by the interruption: written again
                os.remove(os.path.join(self.folder, name))
                continue
            self.shards = max(self.shards, int(name[len("model-"):-len(".safetensors")]))

    def add(self, key: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.buffer and self.buffered + nbytes > self.max_bytes:
            self.flush()
        self.buffer[key] = t.contiguous()
        self.buffered += nbytes
        self.peak_bytes = max(self.peak_bytes, self.buffered)

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        self.shards += 1
        name = f"model-{self.shards:05d}.safetensors"
        save_file(self.buffer, os.path.join(self.folder, name), metadata={"format": "pt"})
        for key, t in self.buffer.items():
            self.tensors[key] = TensorEntry(name, t.dtype, tuple(t.shape))
        self.buffer, self.buffered = {}, 0



def _out_folder(out: str, overwrite: bool, resume: bool) -> str:
    out = os.path.normpath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    if resume:
        tmp = f"{out}.partial"
        os.makedirs(tmp, exist_ok=True)
        return tmp
    tmp = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def quantize(model: str, out: str, plan="w4a4", group_size: int | None = None, rotation: str = "regular",
             device: str | torch.device | None = None, overwrite: bool = False, progress: bool = True,
             shard_bytes: int = 1 << 30, weights: str = "rtn", calibration=None, resume: bool = False,
             high_precision_fraction: float = 0.125) -> Manifest:
    """Quantize the diffusers model in folder ``model`` (or a pipeline root's ``transformer/``) into a
    checkpoint in folder ``out``, preparing each weight on ``device`` (default: CUDA when there is one).
    ``weights="gptq"`` takes the GPTQ weights of a ``calibration`` of this model; ``rotation="pca"`` or
    ``"pca-hadamard"`` (DiRotQ, with a calibration) stores each input's basis once and each linear's 16-bit
    columns beside its int4 ones. ``resume`` keeps the work of an interrupted run (see the module docstring).
    Returns its manifest; ``convrot_compiler.load(out)`` gives the model back."""
    from tqdm.auto import tqdm

    config = ConvRotConfig(plan=plan, group_size=group_size, rotation=rotation, weights=weights,
                           calibration=calibration, high_precision_fraction=high_precision_fraction)
    pca = rotation in PCA_ROTATIONS
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    src = open_source(model)
    structure = meta_model(src.config["_class_name"], src.config)
    if calibration is not None:
        calibration.check_model(structure)
    decisions, plan, _ = decide_model(structure, config.plan, config.group_size)
    keys = {k for ks in src.files.values() for k in ks}
    missing = [d.name for d in decisions if f"{d.name}.weight" not in keys]
    if missing:
        raise ValueError(f"{src.folder}: the weights of {missing[:5]}{' ...' if len(missing) > 5 else ''} are not in "
                         "its safetensors files: not the model its config describes")
    quantized = {f"{d.name}.weight": d for d in decisions if d.precision != "bf16"}
    weight_dtypes: dict[str, torch.dtype] = {}
    check_calibrated_plan(list(quantized.values()), config)  # before anything is written

    def input_of(name: str) -> str:  # DiRotQ: the first linear reading the input this one reads
        return calibration.shared.get(name, name)

    def basis_key(name: str) -> str:  # one basis per input, named after that linear
        return f"{input_of(name)}.pca_basis"
    tmp = _out_folder(out, overwrite, resume)
    writer = None
    try:
        writer = _ShardWriter(tmp, shard_bytes)
        done = set(writer.tensors)
        # DiRotQ: linears still to prepare per input, so that its cached basis is dropped after the last of them
        readers = collections.Counter(input_of(d.name) for d in quantized.values()
                                      if pca and d.precision == "w4a4" and f"{d.name}.qweight" not in done)
        bar = tqdm(total=len(quantized), desc="quantizing", unit="layer", disable=not progress,
                   initial=sum(f"{d.name}.qweight" in done for d in quantized.values()))
        for path, shard_keys in src.files.items():
            with TensorFile(path) as f:
                for key in shard_keys:
                    if key.endswith(".weight"):
                        weight_dtypes[key[:-len(".weight")]] = f.dtype(key)
                    d = quantized.get(key)
                    if key in done or (d is not None and f"{d.name}.qweight" in done):
                        continue
                    t = f.read(key)
                    if d is None:
                        writer.add(key, t)
                        continue
                    calibrated = config.needs_calibration and d.precision not in WEIGHT_ONLY
                    spec = PrepSpec(d.precision, "none" if d.precision in WEIGHT_ONLY else config.rotation,
                                    config.group_size, W4A16_LAYOUT, CHANNEL_ORDER,
                                    weights=config.weights if calibrated else "rtn",
                                    calibration=calibration if calibrated else None,
                                    high_precision_fraction=config.high_precision_fraction)
                    qw = prepare_weight(t.to(device), spec, **({"layer": d.name} if calibrated else {}))
                    del t
                    if isinstance(qw, PCAWeight):
                        basis = basis_key(d.name)
                        if basis not in writer.tensors and basis not in writer.buffer:
                            writer.add(basis, qw.basis.cpu())
                        writer.add(f"{d.name}.w_hi", qw.w_hi.cpu())
                        readers[input_of(d.name)] -= 1
                        if readers[input_of(d.name)] == 0:
                            calibration.forget_basis(d.name)
                    writer.add(f"{d.name}.qweight", qw.values.cpu())
                    writer.add(f"{d.name}.weight_scale", qw.scale.cpu())
                    bar.update()
        writer.flush()
        bar.close()
        layers = [LayerEntry(d.name, d.precision, d.reason, d.in_features, d.out_features, weight_dtypes[d.name],
                             *((f"{d.name}.qweight", f"{d.name}.weight_scale") if d.precision != "bf16" else ()))
                  for d in decisions]
        for layer in layers:  # from the calibration and the config, so that layers a resumed run kept have them too
            if layer.precision == "w4a4" and pca:
                layer.basis, layer.w_hi = basis_key(layer.name), f"{layer.name}.w_hi"
                layer.rank = pca_rank(layer.in_features, config.high_precision_fraction, config.group_size)
        manifest = Manifest(src.config["_class_name"], src.config, plan.name, list(plan.rules),
                            config.group_size, config.rotation, CHANNEL_ORDER, W4A16_LAYOUT, layers,
                            writer.tensors, library_version(), {"peak_buffer_bytes": writer.peak_bytes},
                            weights=config.weights,
                            high_precision_fraction=config.high_precision_fraction if pca else None)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            f.write(manifest.to_json())
        final = os.path.normpath(out)
        if os.path.exists(final):
            shutil.rmtree(final) if os.path.isdir(final) else os.remove(final)
        os.replace(tmp, final)
    except BaseException:
        if resume:
            if writer is not None:
                writer.flush()  # what is quantized stays for the next run with resume
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
