"""Checkpoint benchmark: quantize a FLUX.1-dev-size transformer from its safetensors shards, load the
checkpoint, and make a first image, each phase in a fresh process so that its peaks are its own.

1. source: the FLUX.1-dev config with seeded random weights, saved by ``save_pretrained`` (not timed);
2. quantize: ``convrot_compiler.quantize`` onto the GPU, one layer at a time: time, peak GPU memory against
   the largest layer, peak resident CPU memory against the largest source shard;
3. load and first image: ``convrot_compiler.load`` (warm page cache), then diffusers' FluxPipeline with that
   transformer and FLUX's VAE (random weights, prompt embeddings passed in: text encoders offloaded),
   compiled, one 1024² image: load time, GPU memory after load, peak GPU memory from an empty process to the
   decoded image, whole and in tiles. Correctness in the same run: a sample of the loaded prepared weights
   against preparing the source weights in memory, bit for bit;
4. capped: the same first image in a process whose GPU memory is capped at ``--cap`` GiB (default 8), as on a GPU
   of that size, the VAE decode tiling only if the whole image runs out of memory.

    python benchmarks/checkpoint.py [--config flux-dev] [--plan w4a4] [--steps 8] [--work DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from convrot_compiler.tools.cli_options import doc_summary


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


class _ResidentPeaks:
    """Peak anonymous and file-backed resident memory, sampled every 50 ms on a thread (Linux): which of the
    two the peak resident memory is tells a reader that holds its tensors from one that maps its files."""

    def __init__(self):
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.05):
            for k in self.peak:
                self.peak[k] = max(self.peak[k], _status_bytes(k))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _peak_gpu(args) -> int:
    return torch.cuda.max_memory_allocated() if args.device == "cuda" else 0


def _reset_peak(args) -> None:
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _sync(args) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


def source(args) -> dict:
    from convrot_compiler.tools.models import build_flux

    model = build_flux(args.config, seed=0, device=args.device)
    model.save_pretrained(args.src)
    shards = [f for f in os.listdir(args.src) if f.endswith(".safetensors")]
    return {"source_bytes": sum(os.path.getsize(os.path.join(args.src, f)) for f in shards),
            "largest_shard_bytes": max(os.path.getsize(os.path.join(args.src, f)) for f in shards)}


def quantize(args) -> dict:
    import convrot_compiler as cc

    if args.device == "cuda":
        torch.zeros(1, device="cuda")
    rss_before = _status_bytes("VmRSS")
    start = time.perf_counter()
    with _ResidentPeaks() as resident:
        manifest = cc.quantize(args.src, args.ckpt, plan=args.plan, device=args.device, progress=False, overwrite=True)
    seconds = time.perf_counter() - start
    largest = max(layer.in_features * layer.out_features * layer.weight_dtype.itemsize for layer in manifest.layers
                  if layer.precision != "bf16")
    return {"quantize_s": seconds, "quantize_peak_gpu_bytes": _peak_gpu(args),
            "largest_layer_bytes": largest, "quantize_peak_rss_bytes": _peak_rss(),
            "rss_bytes_before_quantize": rss_before, "quantize_peak_rss_anon_bytes": resident.peak["RssAnon"],
            "quantize_peak_rss_file_bytes": resident.peak["RssFile"],
            "checkpoint_bytes": sum(os.path.getsize(os.path.join(args.ckpt, f)) for f in os.listdir(args.ckpt))}


def _load_and_denoise(args) -> dict:
    """Load the checkpoint, compile the pipeline and denoise one image; its state and measurements so far."""
    import diffusers  # noqa: F401  (imported before the clock starts, as in a pipeline's process)

    import convrot_compiler as cc
    from convrot_compiler.tools.pipelines import random_pipeline, random_prompt_embeds

    start = time.perf_counter()
    model = cc.load(args.ckpt, device=args.device)
    _sync(args)
    load_s = time.perf_counter() - start
    after_load = torch.cuda.memory_allocated() if args.device == "cuda" else 0
    peaks = {"load": _peak_gpu(args)}
    pipe = random_pipeline(args.config, args.device, transformer=model)
    embeds = random_prompt_embeds(model, 1, 512, args.device)[0]
    cc.compile(pipe, progress=False)
    latents = pipe(**embeds, height=args.size, width=args.size, num_inference_steps=args.steps, output_type="latent",
                   generator=torch.Generator("cpu").manual_seed(0)).images
    _sync(args)
    peaks["denoise"] = _peak_gpu(args)
    return {"model": model, "pipe": pipe, "latents": latents, "start": start, "load_s": load_s,
            "after_load": after_load, "peaks": peaks,
            "after_denoise": torch.cuda.memory_allocated() if args.device == "cuda" else 0}


def load_and_generate(args) -> dict:
    from safetensors import safe_open

    from convrot_compiler.checkpoint.source import open_source
    from convrot_compiler.compiler.weights import PREPARED, prepare_weight, weight_spec
    from convrot_compiler.tools.pipelines import VAE_TILE, decode_latents

    run = _load_and_denoise(args)
    model, pipe, latents, peaks = run["model"], run["pipe"], run["latents"], run["peaks"]
    _reset_peak(args)
    image = decode_latents(pipe, latents, args.size, args.size)
    _sync(args)
    first_image_s = time.perf_counter() - run["start"]
    peaks["decode"] = _peak_gpu(args)
    del image
    _reset_peak(args)
    tiled = decode_latents(pipe, latents, args.size, args.size, tiling="on")
    _sync(args)
    tiled_peak = _peak_gpu(args)

    src = open_source(args.src)
    where = {k: path for path, keys in src.files.items() for k in keys}
    checked = 0
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for name in linears[:: max(1, len(linears) // 12)]:  # a dozen, across the model
        lin = model.get_submodule(name)
        entries = PREPARED._cache.get(lin.weight)
        if not entries:
            continue  # kept in bf16 by the plan
        spec, (_, loaded) = next(iter(entries.items()))
        with safe_open(where[f"{name}.weight"], framework="pt", device=args.device) as f:
            fresh = prepare_weight(f.get_tensor(f"{name}.weight"), weight_spec(spec.scheme, spec.rotation_kind,
                                                                              spec.group_size, lin.weight))
        assert torch.equal(fresh.values, loaded.values) and torch.equal(fresh.scale, loaded.scale), name
        checked += 1
    return {"load_s": run["load_s"], "gpu_bytes_after_load": run["after_load"], "weights_checked_bit_exact": checked,
            "first_image_s": first_image_s, "first_image_peak_gpu_bytes": max(peaks.values()),
            "peak_gpu_bytes_load": peaks["load"], "peak_gpu_bytes_denoise": peaks["denoise"],
            "gpu_bytes_after_denoise": run["after_denoise"], "peak_gpu_bytes_decode": peaks["decode"],
            "peak_gpu_bytes_tiled_decode": tiled_peak, "vae_tile_px": VAE_TILE,
            "first_image_tiled_peak_gpu_bytes": max(peaks["load"], peaks["denoise"], tiled_peak),
            "image_finite": bool(torch.isfinite(tiled).all())}


def capped(args) -> dict:
    """The first image with the process's GPU memory capped at ``--cap`` GiB, as on a GPU of that size: the
    VAE decode tiles where the whole image does not fit (``decode_latents(tiling="auto")``)."""
    import warnings

    from convrot_compiler.tools.pipelines import decode_latents

    if args.device != "cuda":
        return {}
    cap = int(args.cap * 2**30)
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    run = _load_and_denoise(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = decode_latents(run["pipe"], run["latents"], args.size, args.size, tiling="auto")
    _sync(args)
    return {"cap_bytes": cap, "capped_first_image_s": time.perf_counter() - run["start"],
            "capped_peak_gpu_bytes": _peak_gpu(args), "capped_vae_tiled": bool(run["pipe"].vae.use_tiling),
            "capped_warnings": [str(w.message)[:300] for w in caught],
            "capped_image_finite": bool(torch.isfinite(image).all())}


PHASES = {"source": source, "quantize": quantize, "load": load_and_generate, "capped": capped}


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=doc_summary(__doc__))
    p.add_argument("--config", default="flux-dev")
    p.add_argument("--plan", default="w4a4")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=1024, help="image height and width")
    p.add_argument("--device", default="cuda")
    p.add_argument("--cap", type=float, default=8.0, help="GiB of GPU memory for the capped first image")
    p.add_argument("--work", default=os.path.join("convrot-out", "checkpoint-bench"),
                   help="folder for the source model and the checkpoint (about 28 GiB for flux-dev)")
    p.add_argument("--out", help="result folder (default $OUT if set, else ./convrot-out/bench)")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.src, args.ckpt = os.path.join(args.work, "source"), os.path.join(args.work, "checkpoint")
    if args.phase:
        print("RESULT " + json.dumps(PHASES[args.phase](args)), flush=True)
        return
    from tabulate import tabulate

    from convrot_compiler.tools.bench_model import environment, write_results

    result = {"config": args.config, "plan": args.plan, "steps": args.steps}
    for phase in PHASES:
        proc = subprocess.run([sys.executable, __file__, "--phase", phase, "--config", args.config, "--plan", args.plan,
                               "--steps", str(args.steps), "--size", str(args.size), "--device", args.device,
                               "--cap", str(args.cap),
                               "--work", args.work], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"phase {phase} failed:\n{proc.stderr[-4000:]}")
        result.update(json.loads(lines[-1][len("RESULT "):]))
    rows = [[f"quantize (safetensors shards -> checkpoint, on {args.device})", f"{result['quantize_s']:.1f} s"],
            ["  peak GPU memory / largest layer (bf16)",
             f"{_gib(result['quantize_peak_gpu_bytes'])} / {_gib(result['largest_layer_bytes'])}"],
            ["  peak resident CPU memory / largest source shard",
             f"{_gib(result['quantize_peak_rss_bytes'])} / {_gib(result['largest_shard_bytes'])}"],
            ["    of it: before quantizing (libraries, CUDA context) / peak anonymous / peak file-mapped",
             " / ".join(_gib(result[k]) for k in ("rss_bytes_before_quantize", "quantize_peak_rss_anon_bytes",
                                                   "quantize_peak_rss_file_bytes"))],
            ["  source / checkpoint on disk", f"{_gib(result['source_bytes'])} / {_gib(result['checkpoint_bytes'])}"],
            ["load (warm page cache)", f"{result['load_s']:.1f} s"],
            ["  GPU memory after load", _gib(result["gpu_bytes_after_load"])],
            [f"compile + {args.steps} steps + VAE decode at {args.size}²", f"{result['first_image_s']:.1f} s"],
            ["  peak GPU memory, empty process to decoded image", _gib(result["first_image_peak_gpu_bytes"])],
            ["    of it: load / compile + denoise / VAE decode",
             " / ".join(_gib(result[f"peak_gpu_bytes_{k}"]) for k in ("load", "denoise", "decode"))],
            ["    GPU memory held after denoising", _gib(result["gpu_bytes_after_denoise"])],
            [f"  the same with the VAE decoding in tiles of {result['vae_tile_px']} px (--vae-tiling on)",
             f"{_gib(result['first_image_tiled_peak_gpu_bytes'])} "
             f"(decode {_gib(result['peak_gpu_bytes_tiled_decode'])})"],
            *([[f"  the same in a process capped at {args.cap:g} GiB (--vae-tiling auto: tiles if the whole "
                "decode runs out of memory)",
                f"{_gib(result['capped_peak_gpu_bytes'])}, decode "
                f"{'in tiles' if result['capped_vae_tiled'] else 'whole'}, {result['capped_first_image_s']:.1f} s"]]
              if "capped_peak_gpu_bytes" in result else []),
            ["loaded weights bit-exact with preparing the source (sample)", result["weights_checked_bit_exact"]]]
    env = environment()
    md = (f"# Checkpoint: quantize, load, first image ({args.config}, plan {args.plan})\n\n"
          f"{env.get('gpu')}, torch {env['torch']}, triton {env.get('triton')}, diffusers {env.get('diffusers')}, "
          f"{env['date']}. Each phase in a fresh process; random weights.\n\n"
          + tabulate(rows, headers=["", ""], tablefmt="github") + "\n")
    print(md)
    name = f"checkpoint_{args.config.replace('-', '_')}"
    print("written:", *write_results(name, {"env": env, **result}, md, args.out))


if __name__ == "__main__":
    main()
