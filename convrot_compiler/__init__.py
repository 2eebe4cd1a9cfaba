"""ConvRot W4A4 quantization for diffusion transformers, as a torch.compile compiler."""
