"""Helpers shared by the Triton kernel wrappers (imports triton)."""

from __future__ import annotations

import torch
import triton.language as tl

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def dot_dtype(device: torch.device, dtype: torch.dtype):
    """The dtype tl.dot operands are cast to.

    On a GPU: the activation dtype (tensor cores). On CPU tensors the kernel runs in Triton's
    interpreter, whose bf16 dot is wrong (bf16 is stored as raw uint16 there), so use fp32.
    """
    if device.type == "cpu":
        return tl.float32
    return _TL_DTYPES[dtype]


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def multiprocessor_count(device: torch.device) -> int:
    """SMs on a CUDA device; a nominal 1 elsewhere (interpreter runs)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
