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


FLAGS_16 = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}  # (/proc/cpuinfo's names)


def cpu_flags() -> set[str] | None:
    """This CPU's instruction flags (Linux's /proc/cpuinfo), None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if line is None else set(line.partition(":")[2].split())


def cpu_note(device: torch.device, precision: str) -> str | None:
    """A warning where 16-bit autocast runs on a CPU without 16-bit instructions (AVX512-BF16 or AMX-BF16;
    AVX512-FP16 or AMX-FP16): its convolutions are then emulated, several times slower than fp32 (StyleGAN2 at
    256 px on 2 cores of an AMD EPYC without them: 5.4x, bench/RESULTS.md). None where the flags are unknown."""
    if device.type != "cpu" or precision == "no":
        return None
    flags = cpu_flags()
    if flags is None or flags & set(FLAGS_16[precision]):
        return None
    names = " or ".join(f.upper().replace("_", "-") for f in FLAGS_16[precision])
    return (f"warning: train.precision={precision} on this CPU, which has no {precision} instructions ({names}): "
            f"its convolutions are emulated, several times slower than train.precision=no")
