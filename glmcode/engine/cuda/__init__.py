"""The CUDA path: the runner (static buffers, CUDA graphs), the Triton kernels and their references."""
