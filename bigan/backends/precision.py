"""Precision shared by both backends: autocast over fp32 weights, named by train.precision."""
import contextlib

import torch

DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}


def autocast(device: torch.device, dtype):
    """torch.autocast for dtype, or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
