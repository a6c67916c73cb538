"""The CPU fast path: glmcode's C++ kernels, their build, and the fused decode plan."""
