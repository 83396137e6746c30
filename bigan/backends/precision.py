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


def cpu_note(device: torch.device, precision: str) -> str | None:
    """A warning where 16-bit autocast runs on a CPU without 16-bit instructions (AVX512-BF16, AMX): its
    convolutions are then emulated, several times slower than fp32 (StyleGAN2 at 256 px, 2 cores of an AMD
    EPYC without them: 5.5x, bench/RESULTS.md)."""
    if device.type != "cpu" or precision == "no":
        return None
    has = {"bf16": ("_is_avx512_bf16_supported", "_is_amx_tile_supported"), "fp16": ("_is_amx_fp16_supported",)}
    if any(getattr(torch.cpu, name, lambda: False)() for name in has[precision]):
        return None
    return (f"warning: train.precision={precision} on this CPU, which has no {precision} instructions "
            f"({'AVX512-BF16 or AMX' if precision == 'bf16' else 'AMX-FP16'}): its convolutions are emulated, "
            f"several times slower than train.precision=no")
