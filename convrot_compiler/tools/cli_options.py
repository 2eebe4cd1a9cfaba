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
