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

import os
import shutil
from dataclasses import dataclass

import torch

from ..compiler.weights import PrepSpec, prepare_weight
from ..config import ConvRotConfig
from ..numerics.pca import PCA_ROTATIONS
from ..numerics.quant import WEIGHT_ONLY
from ..plans import decide_linears
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


def quantize(model: str, out: str, plan="w4a4", group_size: int = 256, rotation: str = "regular",
             device: str | torch.device | None = None, overwrite: bool = False, progress: bool = True,
             shard_bytes: int = 1 << 30, weights: str = "rtn", calibration=None, resume: bool = False) -> Manifest:
    """Quantize the diffusers model in folder ``model`` (or a pipeline root's ``transformer/``) into a
    checkpoint in folder ``out``, preparing each weight on ``device`` (default: CUDA when there is one).
    ``weights="gptq"`` takes the GPTQ weights of a ``calibration`` of this model (the checkpoint format is the
    same); ``resume`` keeps the work of an interrupted run (see the module docstring). Returns its manifest;
    ``convrot_compiler.load(out)`` gives the model back."""
    from tqdm.auto import tqdm

    if rotation in PCA_ROTATIONS:
        raise ValueError(f"checkpoints hold ConvRot's weights (rotation regular, sylvester or none), not DiRotQ's "
                         f"({rotation!r}: a basis per input and 16-bit columns): compile the bf16 model with "
                         "rotation='pca' and its calibration instead")
    config = ConvRotConfig(plan=plan, group_size=group_size, rotation=rotation, weights=weights,
                           calibration=calibration)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    src = open_source(model)
    structure = meta_model(src.config["_class_name"], src.config)
    if calibration is not None:
        calibration.check_model(structure)
    decisions = decide_linears(structure, config.plan, config.group_size)
    keys = {k for ks in src.files.values() for k in ks}
    missing = [d.name for d in decisions if f"{d.name}.weight" not in keys]
    if missing:
        raise ValueError(f"{src.folder}: the weights of {missing[:5]}{' ...' if len(missing) > 5 else ''} are not in "
                         "its safetensors files: not the model its config describes")
    quantized = {f"{d.name}.weight": d for d in decisions if d.precision != "bf16"}
    weight_dtypes: dict[str, torch.dtype] = {}
    if config.needs_calibration:
        calibration.check_covers(quantized.values())  # every missing second moment fails before anything is written
    tmp = _out_folder(out, overwrite, resume)
    writer = None
    try:
        writer = _ShardWriter(tmp, shard_bytes)
        done = set(writer.tensors)
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
                    gptq = config.weights == "gptq" and d.precision not in WEIGHT_ONLY
                    spec = PrepSpec(d.precision, "none" if d.precision in WEIGHT_ONLY else config.rotation,
                                    config.group_size, W4A16_LAYOUT, CHANNEL_ORDER,
                                    weights="gptq" if gptq else "rtn", calibration=calibration if gptq else None)
                    qw = prepare_weight(t.to(device), spec, **({"layer": d.name} if gptq else {}))
                    del t
                    writer.add(f"{d.name}.qweight", qw.values.cpu())
                    writer.add(f"{d.name}.weight_scale", qw.scale.cpu())
                    bar.update()
        writer.flush()
        bar.close()
        layers = [LayerEntry(d.name, d.precision, d.reason, d.in_features, d.out_features, weight_dtypes[d.name],
                             *((f"{d.name}.qweight", f"{d.name}.weight_scale") if d.precision != "bf16" else ()))
                  for d in decisions]
        manifest = Manifest(src.config["_class_name"], src.config, config.plan.name, list(config.plan.rules),
                            config.group_size, config.rotation, CHANNEL_ORDER, W4A16_LAYOUT, layers,
                            writer.tensors, library_version(),
                            {"peak_buffer_bytes": writer.peak_bytes, "weights": config.weights})
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
