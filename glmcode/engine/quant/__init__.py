"""Weight-only int8 / int4 quantization: formats, linears, experts, the int8 latent cache, checkpoints."""
