"""Command-line options shared by the commands that compile a model."""

from __future__ import annotations

import argparse

from ..config import ATTENTION_MODES
from ..numerics.hadamard import ROTATION_KINDS
from ..numerics.pca import PCA_ROTATIONS, WEIGHT_METHODS
from ..plans import PRESETS


def add_quant_args(p: argparse.ArgumentParser, rotation: bool = True, plan_default: str | None = "w4a4",
                   attention: bool = True, calibrated: bool = False) -> None:
    """--plan, --plan-file; with ``rotation`` --rotation and --group-size; with ``calibrated`` also DiRotQ's
    rotations and --weights, --calibration, --high-precision-fraction (read back by ``quant_overrides``)."""
    p.add_argument("--plan", default=plan_default, choices=sorted(PRESETS),
                   help=f"precision plan (default: {plan_default or 'w4a4; with --quantized, the checkpoint one'})")
    p.add_argument("--plan-file", dest="plan", metavar="JSON", help="a plan file instead of a preset (convrot "
                   "sensitivity --budget ... --plan-out writes one)")
    if rotation:
        kinds = ROTATION_KINDS + (tuple(PCA_ROTATIONS) if calibrated else ())
        p.add_argument("--rotation", default="regular", choices=kinds, help="rotation kind (default: regular, ConvRot)"
                       + ("; pca, pca-hadamard: DiRotQ, with --calibration" if calibrated else ""))
        p.add_argument("--group-size", type=int, default=None if calibrated else 256,
                       help="ConvRot's rotation group, a power of 4 (default: 256)"
                       + ("; DiRotQ's int4 group (default: 64)" if calibrated else ""))
    if calibrated:
        p.add_argument("--weights", default="rtn", choices=WEIGHT_METHODS,
                       help="weight quantizer: rtn (default), or gptq with --calibration")
        p.add_argument("--calibration", metavar="FILE", help="a calibration of the model (convrot calibrate), for "
                       "--rotation pca* and --weights gptq")
        p.add_argument("--high-precision-fraction", type=float, default=0.125,
                       help="DiRotQ: the share of each input's channels kept in 16 bits (default 0.125)")
    if not attention:
        return
    p.add_argument("--attention", default="keep", choices=ATTENTION_MODES,
                   help="keep: attention as the model runs it (default); fp8: per-tensor e4m3 Q, K, V "
                        "(cuDNN on Hopper, pip install 'convrot-compiler[fp8-attention]'; not part of ConvRot)")


def quant_overrides(args: argparse.Namespace) -> dict:
    """The ``compile`` options that ``add_quant_args`` read and the user set (the calibration file loaded), without
    the plan: options left at their defaults are not passed, so a checkpoint's own stay in force."""
    defaults = {"rotation": "regular", "group_size": None, "weights": "rtn", "high_precision_fraction": 0.125}
    out = {}
    for key, default in defaults.items():
        if getattr(args, key, default) != default:
            out[key] = getattr(args, key)
    if getattr(args, "calibration", None):
        from ..calibration import Calibration

        out["calibration"] = Calibration.load(args.calibration)
    return out


def add_model_args(p: argparse.ArgumentParser, default_size: str = "1024; 256 for flux-tiny",
                   default_tokens: str = "512; 64 for flux-tiny", families: bool = False) -> None:
    """--model, --config, --device, --height, --width, --text-tokens, --seed: a local FLUX checkpoint or a built-in
    random one (with ``families``, another family's too, and --frames), and the inputs of one forward."""
    from ..families import CONFIGS

    p.add_argument("--model", metavar="PATH", help="local diffusers FLUX checkpoint (default: built-in random config)")
    p.add_argument("--config", default="auto",
                   choices=["auto", "flux-tiny", "flux-dev", *(CONFIGS if families else ())],
                   help="built-in config: auto = flux-dev on CUDA, flux-tiny on CPU"
                        + (f"; or another family's ({', '.join(CONFIGS)}; 128 px and 16 text tokens for a "
                           "*-tiny one)" if families else ""))
    if families:
        p.add_argument("--frames", type=int, default=1, help="video frames, for a video model")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--height", type=int, help=f"image height in pixels (default {default_size})")
    p.add_argument("--width", type=int, help=f"image width in pixels (default {default_size})")
    p.add_argument("--text-tokens", type=int, help=f"text tokens (default {default_tokens})")
    p.add_argument("--seed", type=int, default=0)


def write_json(path: str, text: str) -> None:
    """Write a report's JSON and say where."""
    with open(path, "w") as f:
        f.write(text)
    print(f"JSON written to {path}")


def doc_summary(doc: str) -> str:
    """A module docstring's first paragraph on one line: an argparse description that does not stop mid-sentence."""
    return " ".join(doc.split("\n\n")[0].split())
