"""Quantized checkpoints (CPU): quantize a saved diffusers model layer by layer, load it back with only the
quantized weights, bit-exact with quantizing in memory; the portable layout; every corruption a clear error."""

import json
import os
import subprocess
import sys
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

import convrot_compiler as cc
from convrot_compiler.checkpoint import CheckpointError, read_manifest
from convrot_compiler.checkpoint.tensor_file import TensorFile
from convrot_compiler.compiler import weights
from convrot_compiler.compiler.compile_model import weight_bytes
from convrot_compiler.compiler.weights import PREPARED, model_bytes
from convrot_compiler.numerics.quant import QuantizedWeight, relayout
from convrot_compiler.numerics.rotations import GroupHadamardRotation
from convrot_compiler.tools.models import build_flux, make_flux_inputs

pytestmark = pytest.mark.usefixtures("fresh_dynamo", "no_grad")  # conftest: Dynamo reset, no_grad


def _model():
    return build_flux("flux-tiny", seed=3, gate_bias=0.5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """flux-tiny saved by save_pretrained in small shards, and its inputs."""
    folder = tmp_path_factory.mktemp("src")
    _model().save_pretrained(folder, max_shard_size="2MB")
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").exists()
    return str(folder)


def _compiled_in_memory(kwargs, **options):
    model = _model()
    cc.compile(model, progress=False, **options)
    return model(**kwargs)[0]


def _inputs():
    return make_flux_inputs(_model(), 64, 64, 16).kwargs


@pytest.mark.parametrize("plan", ["w4a4", "mix"])
def test_a_checkpoint_round_trip_is_bit_exact_with_quantizing_in_memory(saved, tmp_path, plan):
    manifest = cc.quantize(saved, str(tmp_path / "ckpt"), plan=plan, progress=False)
    assert {f for f in os.listdir(tmp_path / "ckpt")} == {"convrot.json", *{t.file for t in manifest.tensors.values()}}
    layers = {layer.name: layer for layer in manifest.layers}
    assert len(layers) == 50 and layers["x_embedder"].precision == "bf16" and "x_embedder" in layers["x_embedder"].reason
    assert layers["transformer_blocks.0.norm1.linear"].precision == ("w8a16" if plan == "mix" else "w4a16")
    model = cc.load(str(tmp_path / "ckpt"), device="cpu")
    assert model.convrot_checkpoint.plan.name == plan
    kwargs = _inputs()
    with pytest.raises(RuntimeError, match="never loaded from a quantized checkpoint"):
        model(**kwargs)  # not compiled yet: its quantized linears hold placeholders, never zeros
    cc.compile(model, progress=False)
    assert torch.equal(model(**kwargs)[0], _compiled_in_memory(kwargs, plan=plan))


def test_load_prepares_nothing_and_holds_only_the_quantized_weights(saved, tmp_path):
    cc.quantize(saved, str(tmp_path / "ckpt"), progress=False)
    before = PREPARED.prepared_count
    model = cc.load(str(tmp_path / "ckpt"), device="cpu")
    stored = sum(os.path.getsize(tmp_path / "ckpt" / f) for f in os.listdir(tmp_path / "ckpt") if f.endswith(".safetensors"))
    cc.compile(model, progress=False)
    model(**_inputs())
    assert PREPARED.prepared_count == before  # every weight came prepared from the checkpoint
    assert weight_bytes(model) <= stored and weight_bytes(model) < 0.35 * model_bytes(_model())


def test_the_cli_writes_what_the_api_loads(saved, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "convrot_compiler", "quantize", saved, str(out), "--plan", "w4a4",
                           "--device", "cpu", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "34 w4a4, 12 w4a16" in proc.stdout and "plan w4a4" in proc.stdout
    again = subprocess.run([sys.executable, "-m", "convrot_compiler", "quantize", saved, str(out), "--device", "cpu"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "not empty; pass --overwrite" in again.stderr and "Traceback" not in again.stderr
    model = cc.compile(cc.load(str(out), device="cpu"), progress=False)
    kwargs = _inputs()
    assert torch.equal(model(**kwargs)[0], _compiled_in_memory(kwargs))
    with pytest.raises(ValueError, match="quantized with plan 'w4a4'.*without \\['plan'\\]"):
        cc.compile(cc.load(str(out), device="cpu"), plan="mix", progress=False)


def test_quantizing_a_pipeline_root_with_a_second_expert_says_it_takes_the_first_only(saved, tmp_path):
    """Wan 2.2's pipelines hold transformer/ and transformer_2/: quantize takes transformer/ and says so."""
    import shutil

    for name in ("transformer", "transformer_2"):
        shutil.copytree(saved, tmp_path / "pipe" / name)
    with pytest.warns(UserWarning, match="also holds transformer_2.*quantize .*transformer_2 into a checkpoint"):
        manifest = cc.quantize(str(tmp_path / "pipe"), str(tmp_path / "ckpt"), progress=False)
    assert manifest.layers and os.path.isfile(tmp_path / "ckpt" / "convrot.json")


def test_a_pipeline_takes_the_loaded_transformer(tmp_path):
    """FluxPipeline.from_pretrained(base, transformer=convrot_compiler.load(OUT)): the base's own transformer
    weights are never read, and the pipeline's latents are those of the in-memory compile."""
    from diffusers import FluxPipeline

    from convrot_compiler.tools.pipelines import random_pipeline, random_prompt_embeds

    pipe = random_pipeline("flux-tiny", "cpu", seed=1, transformer=_model())
    pipe.save_pretrained(tmp_path / "pipe")
    cc.quantize(str(tmp_path / "pipe"), str(tmp_path / "ckpt"), progress=False)  # the root: its transformer/
    embeds = random_prompt_embeds(pipe.transformer, 1, 16, "cpu")[0]
    args = dict(height=64, width=64, num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(0))
    cc.compile(pipe, progress=False)
    ref = pipe(**embeds, **args).images
    os.remove(tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors")
    loaded = FluxPipeline.from_pretrained(str(tmp_path / "pipe"), transformer=cc.load(str(tmp_path / "ckpt"), device="cpu"),
                                          text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                          torch_dtype=torch.bfloat16, local_files_only=True)
    cc.compile(loaded, progress=False)
    args["generator"] = torch.Generator().manual_seed(0)
    assert torch.equal(loaded(**embeds, **args).images, ref)


def _stored(folder) -> tuple[dict, dict[str, dict]]:
    manifest = json.loads((folder / "convrot.json").read_text())
    files = {name: load_file(folder / name) for name in {t["file"] for t in manifest["tensors"].values()}}
    return manifest, files


def _rewrite(folder, manifest, files) -> None:
    (folder / "convrot.json").write_text(json.dumps(manifest))
    for name, tensors in files.items():
        save_file(tensors, folder / name)


def test_the_checkpoint_layout_converts_to_the_devices_both_ways(saved, tmp_path, monkeypatch):
    """Stored natural/groups and loaded where the kernels take mma/tiles (as on sm_90: forced here), and stored
    mma/tiles (named in the manifest) and loaded on CPU: the same outputs, bit for bit."""
    folder = tmp_path / "ckpt"
    cc.quantize(saved, str(folder), progress=False)
    kwargs = _inputs()
    expected = _compiled_in_memory(kwargs)
    torch._dynamo.reset()
    with monkeypatch.context() as m:
        m.setattr(weights, "act_order_for", lambda *args: "mma")
        m.setattr(weights, "weight_only_layout", lambda *args: "tiles")
        model = cc.load(str(folder), device="cpu")
        lin = model.transformer_blocks[0].attn.to_q
        mod = model.transformer_blocks[0].norm1.linear
        assert next(iter(PREPARED._cache[lin.weight])).act_order == "mma"
        assert next(iter(PREPARED._cache[mod.weight])).layout == "tiles"
        cc.compile(model, progress=False)
        assert torch.equal(model(**kwargs)[0], expected)
    torch._dynamo.reset()
    manifest, files = _stored(folder)
    manifest["quantization"].update(channel_order="mma", w4a16_layout="tiles")
    for layer in manifest["layers"]:
        if layer["precision"] == "bf16":
            continue
        keys = layer["tensors"]
        rotation = None if layer["precision"] == "w4a16" else GroupHadamardRotation("regular", 256)
        shard = files[manifest["tensors"][keys["values"]]["file"]]
        qw = QuantizedWeight(layer["precision"], shard[keys["values"]], files[manifest["tensors"][keys["scale"]]["file"]][
            keys["scale"]], layer["in_features"], layer["out_features"], 256, 256, rotation)
        moved = relayout(qw, "natural" if rotation is None else "mma", "tiles" if rotation is None else "groups")
        shard[keys["values"]] = moved.values
        manifest["tensors"][keys["values"]].update(dtype=str(moved.values.dtype)[6:], shape=list(moved.values.shape))
    _rewrite(folder, manifest, files)
    model = cc.compile(cc.load(str(folder), device="cpu"), progress=False)
    assert next(iter(PREPARED._cache[model.transformer_blocks[0].attn.to_q.weight])).act_order == "natural"
    assert torch.equal(model(**kwargs)[0], expected)


def _corrupt(folder, how):
    manifest, files = _stored(folder)
    name = sorted(files)[0]
    if how == "version":
        manifest["format_version"] = 99
    elif how == "missing tensor":
        key = next(iter(files[name]))
        del files[name][key]
    elif how == "shape":
        key = next(k for k, t in manifest["tensors"].items() if k.endswith(".qweight"))
        manifest["tensors"][key]["shape"][0] += 1
    elif how == "dtype":
        key = next(k for k, t in manifest["tensors"].items() if k.endswith(".weight_scale"))
        manifest["tensors"][key]["dtype"] = "float16"
    elif how == "layer the model lacks":
        layer = next(x for x in manifest["layers"] if x["precision"] == "w4a4")
        layer["name"] = "transformer_blocks.7.attn.to_q"
    elif how == "another config":
        manifest["model"]["config"]["num_layers"] = 3
    _rewrite(folder, manifest, files)
    if how == "truncated":
        path = folder / name
        path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize("how,message", [
    ("version", r"convrot.json: format version 99 is not one this convrot-compiler reads"),
    ("missing tensor", r"model-00001.safetensors: tensor '.*' is missing"),
    ("shape", r"model-\d+.safetensors: tensor '.*qweight' is I8 \[\d+, \d+\], the manifest says int8"),
    ("dtype", r"model-\d+.safetensors: tensor '.*weight_scale' is F32 .*, the manifest says float16"),
    ("truncated", r"model-00001.safetensors: truncated: tensor '.*' ends at byte"),
    ("layer the model lacks", r"convrot.json: its plan names layers the model .* lacks: \['transformer_blocks.7"),
    ("another config", r"convrot.json: the model's linears \['transformer_blocks.2"),
])
def test_a_broken_checkpoint_is_one_clear_error_before_anything_is_read(saved, tmp_path, monkeypatch, how, message):
    folder = tmp_path / "ckpt"
    cc.quantize(saved, str(folder), progress=False)
    _corrupt(folder, how)
    opened = []
    real = TensorFile.read
    monkeypatch.setattr(TensorFile, "read", lambda self, key: opened.append(key) or real(self, key))
    with pytest.raises(CheckpointError, match=message):
        cc.load(str(folder), device="cpu")
    assert not opened  # nothing was read, so nothing is half loaded


def test_a_checkpoint_for_another_model_is_refused(saved, tmp_path):
    cc.quantize(saved, str(tmp_path / "ckpt"), progress=False)
    config = dict(_model().config)
    config["joint_attention_dim"] = 512
    with pytest.raises(CheckpointError, match=r"for another model \(FluxTransformer2DModel with joint_attention_dim: "
                                              r"256 vs 512\)"):
        cc.load(str(tmp_path / "ckpt"), device="cpu", expect_config=config)
    with pytest.raises(CheckpointError, match="no manifest"):
        cc.load(saved, device="cpu")
    with pytest.raises(ValueError, match="--quantized takes the transformer from a checkpoint: pass --model"):
        from convrot_compiler.tools.generate import run_generate

        run_generate(quantized=str(tmp_path / "ckpt"), device="cpu")


def test_no_pickle_anywhere_and_an_interrupted_run_leaves_no_checkpoint(saved, tmp_path, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    cc.quantize(saved, str(tmp_path / "ckpt"), progress=False)
    cc.compile(cc.load(str(tmp_path / "ckpt"), device="cpu"), progress=False)(**_inputs())

    from convrot_compiler.checkpoint import writer as quantize_module

    calls = []

    def failing(weight, spec):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return weights.prepare_weight(weight, spec)

    monkeypatch.setattr(quantize_module, "prepare_weight", failing)
    with pytest.raises(KeyboardInterrupt):
        cc.quantize(saved, str(tmp_path / "broken"), progress=False)
    assert not os.path.exists(tmp_path / "broken") and not any("partial" in n for n in os.listdir(tmp_path))
    with pytest.raises(FileExistsError, match="not empty; pass --overwrite"):
        cc.quantize(saved, str(tmp_path / "ckpt"), progress=False)
    monkeypatch.setattr(quantize_module, "prepare_weight", weights.prepare_weight)
    cc.quantize(saved, str(tmp_path / "ckpt"), plan="w8a8", overwrite=True, progress=False)
    assert read_manifest(str(tmp_path / "ckpt")).plan_name == "w8a8"


def test_quantizing_holds_one_source_tensor_and_one_output_shard_at_a_time(saved, tmp_path, monkeypatch):
    """The memory bounds, relative to the model: the source tensors alive at once are the one being read and
    those buffered for the output shard being filled, so they never exceed a shard plus the largest tensor."""
    live, peak = [0], [0]
    real = TensorFile.read

    def tracked(self, key):
        t = real(self, key)
        nbytes = t.numel() * t.element_size()
        live[0] += nbytes
        peak[0] = max(peak[0], live[0])
        weakref.finalize(t, lambda: live.__setitem__(0, live[0] - nbytes))
        return t

    monkeypatch.setattr(TensorFile, "read", tracked)
    shard = 1 << 20
    manifest = cc.quantize(saved, str(tmp_path / "ckpt"), progress=False, shard_bytes=shard)
    state = _model().state_dict()
    largest = max(t.numel() * t.element_size() for t in state.values())
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert 0 < peak[0] <= shard + largest < total / 4
    assert manifest.extra["peak_buffer_bytes"] <= shard + largest and len({t.file for t in manifest.tensors.values()}) > 1


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc")
def test_reading_a_source_file_keeps_only_the_tensors_still_held(tmp_path):
    """Reading a file tensor by tensor holds the tensors still referenced, not the file: 256 MiB read and
    dropped one 32 MiB tensor at a time grow resident memory by less than two tensors."""
    tensors = {f"t{i}": torch.full((8 << 20,), float(i), dtype=torch.float32) for i in range(8)}  # 8 x 32 MiB
    save_file(tensors, str(tmp_path / "big.safetensors"))
    del tensors
    before = _resident_bytes()
    with TensorFile(str(tmp_path / "big.safetensors")) as f:
        for i, key in enumerate(f.keys()):
            t = f.read(key)
            assert t.dtype == torch.float32 and t.shape == (8 << 20,) and t.sum().item() == float(key[1:]) * (8 << 20)
            del t
        grown = _resident_bytes() - before
    assert grown < 64 << 20, f"resident memory grew by {grown >> 20} MiB reading 256 MiB one tensor at a time"


def _interrupt_at(n: int, monkeypatch) -> list:
    """Make the writer's n-th weight preparation raise KeyboardInterrupt; returns the list of calls so far."""
    from convrot_compiler.checkpoint import writer as quantize_module

    calls = []

    def failing(weight, spec, **kw):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return weights.prepare_weight(weight, spec, **kw)

    monkeypatch.setattr(quantize_module, "prepare_weight", failing)
    return calls


def test_an_interrupted_run_with_resume_keeps_its_shards_and_finishes_bit_exact(saved, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from convrot_compiler.checkpoint import writer as quantize_module

    cc.quantize(saved, str(tmp_path / "fresh"), progress=False, shard_bytes=1 << 16)
    calls = _interrupt_at(20, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        cc.quantize(saved, str(tmp_path / "ckpt"), progress=False, shard_bytes=1 << 16, resume=True)
    assert os.path.isdir(tmp_path / "ckpt.partial") and not os.path.exists(tmp_path / "ckpt")
    calls.clear()
    monkeypatch.setattr(quantize_module, "prepare_weight", lambda w, s, **kw: (calls.append(1),
                                                                               weights.prepare_weight(w, s, **kw))[1])
    manifest = cc.quantize(saved, str(tmp_path / "ckpt"), progress=False, shard_bytes=1 << 16, resume=True)
    total = sum(layer.precision != "bf16" for layer in manifest.layers)
    assert 0 < len(calls) <= total - 19 and not os.path.exists(tmp_path / "ckpt.partial")
    fresh = {k: v for f in os.listdir(tmp_path / "fresh") if f.endswith(".safetensors")
             for k, v in load_file(str(tmp_path / "fresh" / f)).items()}
    resumed = {k: v for f in os.listdir(tmp_path / "ckpt") if f.endswith(".safetensors")
               for k, v in load_file(str(tmp_path / "ckpt" / f)).items()}
    assert fresh.keys() == resumed.keys() and all(torch.equal(fresh[k], resumed[k]) for k in fresh)


def test_a_gptq_checkpoint_loads_to_what_compiling_with_gptq_gives(saved, tmp_path):
    model = _model()
    cal = cc.calibrate(model, [_inputs()], progress=False)
    expected = cc.compile(_model(), weights="gptq", calibration=cal, progress=False)(**_inputs())[0]
    torch._dynamo.reset()
    manifest = cc.quantize(saved, str(tmp_path / "ckpt"), weights="gptq", calibration=cal, progress=False)
    assert manifest.weights == "gptq" and read_manifest(str(tmp_path / "ckpt")).weights == "gptq"
    loaded = cc.compile(cc.load(str(tmp_path / "ckpt"), device="cpu"), progress=False)
    assert torch.equal(loaded(**_inputs())[0], expected)
    with pytest.raises(ValueError, match="needs a calibration"):
        cc.quantize(saved, str(tmp_path / "x"), weights="gptq", progress=False)


@pytest.mark.parametrize("rotation", ["pca", "pca-hadamard"])
def test_a_dirotq_checkpoint_loads_to_what_compiling_with_dirotq_gives(saved, tmp_path, rotation):
    """DiRotQ's checkpoint holds each input's basis once (the linears reading one input share it), each linear's
    16-bit columns and int4 groups; loaded, it compiles with no calibration to the in-memory DiRotQ model's output
    bit for bit."""
    cal = cc.calibrate(_model(), [_inputs()], progress=False)
    expected = cc.compile(_model(), rotation=rotation, weights="gptq", calibration=cal, progress=False)(**_inputs())[0]
    torch._dynamo.reset()
    manifest = cc.quantize(saved, str(tmp_path / "ckpt"), rotation=rotation, weights="gptq", calibration=cal,
                           progress=False)
    pca = [layer for layer in manifest.layers if layer.basis is not None]
    assert pca and all(layer.precision == "w4a4" and layer.rank > 0 for layer in pca)
    bases = {layer.basis for layer in pca}
    assert len(bases) < len(pca) and bases == {k for k in manifest.tensors if k.endswith(".pca_basis")}
    with open(tmp_path / "ckpt" / "convrot.json") as f:
        assert json.load(f)["format_version"] == 3
    model = cc.load(str(tmp_path / "ckpt"), device="cpu")
    q = model.transformer_blocks[0].attn
    assert PREPARED.get(q.to_q.weight, cc.ConvRotConfig(rotation=rotation, prepared=True).spec_for(
        "w4a4", q.to_q.weight)).basis is PREPARED.get(q.to_k.weight, cc.ConvRotConfig(
            rotation=rotation, prepared=True).spec_for("w4a4", q.to_k.weight)).basis  # one tensor, not a copy
    cc.compile(model, progress=False)
    assert torch.equal(model(**_inputs())[0], expected)


def test_quantizing_with_dirotq_drops_each_basis_after_the_last_linear_reading_its_input(saved, tmp_path):
    """The calibration caches a basis per input for the linears sharing it; quantize writes each once and must not
    keep them all (about 9 GB on the GPU at FLUX.1-dev size): it drops each after its input's last linear."""
    cal = cc.calibrate(_model(), [_inputs()], progress=False)
    held, basis = [], cal.basis

    def counted(*args, **kwargs):
        out = basis(*args, **kwargs)
        held.append(len(cal._bases))
        return out

    cal.basis = counted
    manifest = cc.quantize(saved, str(tmp_path / "ckpt"), rotation="pca", calibration=cal, progress=False)
    inputs = {layer.basis for layer in manifest.layers if layer.basis is not None}
    assert len(inputs) > 3 and held and max(held) <= 3 < len(inputs)
    assert cal.cached_basis_bytes() == 0


def test_a_dirotq_checkpoint_with_a_wrong_rank_is_refused(saved, tmp_path):
    cal = cc.calibrate(_model(), [_inputs()], progress=False)
    cc.quantize(saved, str(tmp_path / "ckpt"), rotation="pca", calibration=cal, progress=False)
    path = tmp_path / "ckpt" / "convrot.json"
    raw = json.loads(path.read_text())
    layer = next(d for d in raw["layers"] if "rank" in d)
    layer["rank"] += 64
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=f"layer '{layer['name']}' has rank"):
        cc.load(str(tmp_path / "ckpt"), device="cpu")
    raw["format_version"] = 1
    layer["rank"] -= 64
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="DiRotQ.s rotations take version 3"):
        cc.load(str(tmp_path / "ckpt"), device="cpu")


def test_an_interrupted_dirotq_run_with_resume_finishes_a_checkpoint_that_loads(saved, tmp_path, monkeypatch):
    """The layers a resumed run kept still get their basis, 16-bit columns and rank in the manifest."""
    from convrot_compiler.checkpoint import writer as quantize_module

    cal = cc.calibrate(_model(), [_inputs()], progress=False)
    expected = cc.compile(_model(), rotation="pca", calibration=cal, progress=False)(**_inputs())[0]
    torch._dynamo.reset()
    _interrupt_at(10, monkeypatch)
    options = dict(rotation="pca", calibration=cal, progress=False, shard_bytes=1 << 16, resume=True)
    with pytest.raises(KeyboardInterrupt):
        cc.quantize(saved, str(tmp_path / "ckpt"), **options)
    monkeypatch.setattr(quantize_module, "prepare_weight", weights.prepare_weight)
    manifest = cc.quantize(saved, str(tmp_path / "ckpt"), **options)
    assert all(layer.basis and layer.rank for layer in manifest.layers if layer.precision == "w4a4")
    model = cc.compile(cc.load(str(tmp_path / "ckpt"), device="cpu"), progress=False)
    assert torch.equal(model(**_inputs())[0], expected)


def test_an_older_dirotq_checkpoint_packed_per_group_loads_to_the_same_model(saved, tmp_path):
    """Format version 2 packed DiRotQ's int4 per group; such a checkpoint is repacked per pair as it loads."""
    from safetensors.torch import load_file, save_file

    from convrot_compiler.numerics.pca import int4_pack
    from convrot_compiler.numerics.quant import pack_int4, unpack_int4

    cal = cc.calibrate(_model(), [_inputs()], progress=False)
    expected = cc.compile(_model(), rotation="pca", calibration=cal, progress=False)(**_inputs())[0]
    torch._dynamo.reset()
    manifest = cc.quantize(saved, str(tmp_path / "ckpt"), rotation="pca", calibration=cal, progress=False)
    keys = {layer.values for layer in manifest.layers if layer.basis is not None}
    paired = 0
    for file in {manifest.tensors[k].file for k in keys}:
        tensors = load_file(str(tmp_path / "ckpt" / file))
        for k in keys & tensors.keys():
            pack = int4_pack(2 * tensors[k].shape[1], manifest.group_size)
            paired += pack != manifest.group_size
            tensors[k] = pack_int4(unpack_int4(tensors[k], pack), manifest.group_size)
        save_file(tensors, str(tmp_path / "ckpt" / file))
    assert paired  # some layers' groups pair up: their bytes differ between the layouts
    path = tmp_path / "ckpt" / "convrot.json"
    raw = json.loads(path.read_text())
    raw["format_version"] = 2
    path.write_text(json.dumps(raw))
    model = cc.load(str(tmp_path / "ckpt"), device="cpu")
    cc.compile(model, progress=False)
    assert torch.equal(model(**_inputs())[0], expected)
