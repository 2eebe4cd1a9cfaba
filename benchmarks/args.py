"""The command line every GPU benchmark script shares: ``--name`` (the result files' stem) and ``--out``."""

from __future__ import annotations

import argparse
import sys


def gpu_benchmark_args(name: str, description: str | None = None) -> argparse.Namespace:
    """Parse ``--name`` (default ``name``) and ``--out``; exit with a message where there is no CUDA GPU."""
    import torch

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--name", default=name)
    p.add_argument("--out", help="result folder (default $OUT if set, else ./convrot-out/bench)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit(f"{sys.argv[0]} needs a CUDA GPU")
    return args
