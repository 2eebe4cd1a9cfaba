"""GPU kernels, each file a kernel and a thin launcher that checks, allocates and launches: ``triton/``
(any CUDA GPU, and the CPU through Triton's interpreter), ``sm90/`` (Gluon, Hopper only), ``cudnn/`` (cuDNN's
fp8 attention). ops/dispatch.py decides which one runs."""
