"""Command-line options shared by the commands that compile a model."""

from __future__ import annotations

import argparse

from ..config import ATTENTION_MODES
from ..numerics.hadamard import ROTATION_KINDS
from ..plans import PRESETS


def add_quant_args(p: argparse.ArgumentParser, rotation: bool = True, plan_default: str | None = "w4a4",
                   attention: bool = True) -> None:
    p.add_argument("--plan", default=plan_default, choices=sorted(PRESETS),
                   help=f"precision plan (default: {plan_default or 'w4a4; with --quantized, the checkpoint one'})")
    p.add_argument("--plan-file", dest="plan", metavar="JSON", help="a plan file instead of a preset (convrot "
                   "sensitivity --budget ... --plan-out writes one)")
    if rotation:
        p.add_argument("--rotation", default="regular", choices=ROTATION_KINDS, help="rotation kind (default: regular)")
        p.add_argument("--group-size", type=int, default=256, help="rotation group size, a power of 4 (default: 256)")
    if not attention:
        return
    p.add_argument("--attention", default="keep", choices=ATTENTION_MODES,
                   help="keep: attention as the model runs it (default); fp8: per-tensor e4m3 Q, K, V "
                        "(cuDNN on Hopper, pip install 'convrot-compiler[fp8-attention]'; not part of ConvRot)")


def add_model_args(p: argparse.ArgumentParser, default_size: str = "1024; 256 for flux-tiny",
                   default_tokens: str = "512; 64 for flux-tiny") -> None:
    """--model, --config, --device, --height, --width, --text-tokens, --seed: a local FLUX checkpoint or a built-in
    random one, and the inputs of one forward."""
    p.add_argument("--model", metavar="PATH", help="local diffusers FLUX checkpoint (default: built-in random config)")
    p.add_argument("--config", default="auto", choices=["auto", "flux-tiny", "flux-dev"],
                   help="built-in config: auto = flux-dev on CUDA, flux-tiny on CPU")
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
