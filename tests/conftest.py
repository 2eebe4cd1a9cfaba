import os

import torch

# Without a GPU, Triton kernels run through the interpreter. Must be set before triton.jit runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
