"""cuDNN's fp8 flash attention, through NVIDIA's cudnn-frontend."""
