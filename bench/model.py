"""Model-level benchmark (the code lives in convrot_compiler/benchmark.py; also `convrot bench`).

    python bench/model.py --config flux-dev --resolution 1024 --variants bf16,bf16-compile,fp8,w4a4
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from convrot_compiler.benchmark import main, run, to_markdown  # noqa: E402,F401

if __name__ == "__main__":
    main()
