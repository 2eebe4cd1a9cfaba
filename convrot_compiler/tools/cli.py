"""Command line: ``convrot <command>`` or ``python -m convrot_compiler <command>``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..families import CONFIGS as FAMILY_CONFIGS
from .cli_options import add_model_args, add_quant_args, quant_overrides, write_json


def _command(sub, name: str, summary: str) -> argparse.ArgumentParser:
    """A subcommand whose one-line summary in ``convrot -h`` is also the description its own ``-h`` opens with."""
    return sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convrot", description="ConvRot W4A4 compiler for diffusion transformers; "
                                     "--debug anywhere shows the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = _command(sub, "demo", "quantize a FLUX transformer (or another family's) and compare one forward with "
                    "bf16")
    add_model_args(demo, families=True)
    add_quant_args(demo)
    demo.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--whole-model", action="store_true",
                      help="compile the whole forward as one graph (default: one graph per repeated block class)")

    ins = _command(sub, "inspect", "show what the compiler pass does to every linear and attention, and why")
    ins.add_argument("--model", metavar="PATH", help="local diffusers FLUX checkpoint (default: built-in config)")
    ins.add_argument("--config", default="flux-dev", choices=["flux-tiny", "flux-dev", *FAMILY_CONFIGS],
                     help="built-in config, traced on the meta device (no memory, no weights): FLUX.1's, or another "
                     "family's published config (flux2-dev, qwen-image, sd3.5-large, wan2.1-14b, z-image) or a "
                     "tiny one")
    ins.add_argument("--frames", type=int, default=1, help="video frames, for a video model (wan*)")
    ins.add_argument("--height", type=int, default=1024)
    ins.add_argument("--width", type=int, default=1024)
    ins.add_argument("--text-tokens", type=int, default=512)
    add_quant_args(ins, calibrated=True)
    ins.add_argument("--json", metavar="FILE", help="write the report as JSON")
    ins.add_argument("--dump", metavar="DIR", help="write each graph before/after the pass (code, and DOT with pydot)")
    ins.add_argument("--no-fuse-producers", dest="fuse_producers", action="store_false",
                     help="show the pass without reading the concatenation inside rotate+quantize")
    ins.add_argument("--no-gelu-epilogue", dest="gelu_epilogue", action="store_false",
                     help="show the pass with the GELU after the MLP up-projections left to Inductor")
    qz = _command(sub, "quantize", "quantize a diffusers model folder into a checkpoint, one layer at a time "
                  "(convrot_compiler.load reads it)")
    qz.add_argument("model", metavar="MODEL", help="a diffusers transformer folder, or a pipeline root with transformer/")
    qz.add_argument("out", metavar="OUT", help="the checkpoint folder to write")
    add_quant_args(qz, attention=False, calibrated=True)
    qz.add_argument("--resume", action="store_true", help="keep the work of an interrupted run (OUT.partial) and "
                    "finish it; an interrupted run with --resume leaves OUT.partial for the next")
    qz.add_argument("--device", default="auto", help="where each layer is quantized: auto (CUDA when there is one), "
                    "cpu, cuda, cuda:1, ...")
    qz.add_argument("--overwrite", action="store_true", help="replace OUT if it is not empty")
    qz.add_argument("--no-progress", action="store_true")
    sub.add_parser("sensitivity", help="each linear's share of the output error, ranked; with --budget, the plan "
                   "a weight budget buys (see convrot sensitivity -h)", add_help=False)
    sub.add_parser("bench", help="model-level benchmark: bf16, bf16 compile, fp8, convrot plans (see convrot bench "
                   "-h); with --pipeline, ms per denoising step through FluxPipeline (convrot bench --pipeline -h)",
                   add_help=False)
    sub.add_parser("eval", help="FLUX pipeline fidelity: PSNR/SSIM of convrot images vs bf16 (see convrot eval -h)",
                   add_help=False)
    sub.add_parser("calibrate", help="second moments of the quantized linears' inputs from real denoising, for "
                   "DiRotQ and GPTQ (see convrot calibrate -h)", add_help=False)
    sub.add_parser("generate", help="text to image through FluxPipeline with the compiled transformer "
                   "(see convrot generate -h)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; an error a user can act on prints as one ``error: ...`` line (exit 2), with the
    Python traceback only under ``--debug``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return _run(argv)
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        print("(run again with --debug for the traceback)", file=sys.stderr)
        return 2


# commands whose own parser reads the rest of the line: command -> its module in tools/
DELEGATED = {"eval": "evaluate", "sensitivity": "sensitivity_cli", "generate": "generate",
             "calibrate": "calibrate_cli"}


def _run(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:
        module = "bench_pipeline" if "--pipeline" in argv else "bench_model"
        importlib.import_module(f".{module}", __package__).main([a for a in argv[1:] if a != "--pipeline"])
        return 0
    if argv[:1] and argv[0] in DELEGATED:
        importlib.import_module(f".{DELEGATED[argv[0]]}", __package__).main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import demo_json, format_demo, run_demo

        result = run_demo(args.model, args.config, args.device, args.plan, args.rotation, args.group_size,
                          args.height, args.width, args.text_tokens, args.seed, progress=not args.no_progress,
                          whole_model=args.whole_model, attention=args.attention, frames=args.frames)
        if args.json:
            with open(args.json, "w") as f:
                f.write(demo_json(result))
        print(format_demo(result))
    elif args.command == "inspect":
        _inspect(args)
    elif args.command == "quantize":
        _quantize(args)
    return 0


def _quantize(args) -> None:
    import time

    from ..checkpoint import quantize
    from ..plans import PRECISIONS
    from .demo import resolve_device
    from .generate import format_bytes

    start = time.perf_counter()
    manifest = quantize(args.model, args.out, plan=args.plan, device=resolve_device(args.device),
                        overwrite=args.overwrite, progress=not args.no_progress, resume=args.resume,
                        **quant_overrides(args))
    counts = {p: sum(layer.precision == p for layer in manifest.layers) for p in PRECISIONS}
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"{args.out}: {manifest.model_class}, plan {manifest.plan_name}: "
          + ", ".join(f"{n} {p}" for p, n in counts.items() if n)
          + f"; {format_bytes(size)} written in {time.perf_counter() - start:.1f} s")


def _inspect(args) -> None:
    from ..families import CONFIGS, MINIATURES, example_inputs
    from .inspection import inspect
    from .models import build_model, load_flux

    # a tiny config of a family the meta device cannot run is traced with its weights, on the CPU
    device = "cpu" if args.config.endswith("-tiny") and CONFIGS.get(args.config, ("",))[0] in MINIATURES else "meta"
    model = load_flux(args.model, device="meta") if args.model else build_model(args.config, device=device)
    inputs = example_inputs(model, device, height=args.height, width=args.width, text_tokens=args.text_tokens,
                            frames=args.frames)
    report = inspect(model, example_kwargs=inputs, plan=args.plan, fuse_producers=args.fuse_producers,
                     gelu_epilogue=args.gelu_epilogue, attention=args.attention, **quant_overrides(args))
    print(report.table())
    if report.attention:
        print(report.attention_table())
    print(report.summary())
    if args.json:
        write_json(args.json, report.to_json())
    if args.dump:
        for path in report.dump(args.dump):
            print(path)



if __name__ == "__main__":
    sys.exit(main())
