"""On a CPU machine, make DeepSpeed switch autocast off inside its engines as it does on a GPU.

DeepSpeed's ``engine.forward`` runs the module inside ``autocast_if_enabled``, which asks
``torch.is_autocast_enabled()`` (no device: CUDA's autocast) and, when that is on and the
engine's own ``torch_autocast`` section is not, enters ``torch.autocast(<accelerator>,
enabled=False)``. On a CPU machine the question is about CUDA, so it never fires and CPU
runs never meet the rule that crashed every mixed-precision DeepSpeed run on GPUs. Here the
device-less question answers for the CPU, as it answers for CUDA on a GPU, so the same code
path runs and DeepSpeed disables the CPU autocast inside ``engine.forward``.

Put this folder on PYTHONPATH (tests/test_deepspeed.py does, for every process it starts).
"""
try:
    import torch
except ImportError:  # an interpreter without torch (not one of bigan's)
    torch = None

if torch is not None:
    _is_autocast_enabled = torch.is_autocast_enabled

    def is_autocast_enabled(device_type=None):
        return _is_autocast_enabled("cpu" if device_type is None else device_type)

    torch.is_autocast_enabled = is_autocast_enabled
