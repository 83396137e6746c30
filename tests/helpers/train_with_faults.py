"""bigan.train's main with a fault injected, for tests that need a crash or a NaN at a known point.

    python train_with_faults.py kill-on-save N [train args]   # SIGKILL right after the Nth save_state writes,
                                                              # before the checkpoint is renamed complete
    python train_with_faults.py nan-d-loss A,B,C [train args] # D loss is NaN on these calls (1-based)
    python train_with_faults.py nan-d-loss-from A [train args]  # ... on every call from the A-th on
    python train_with_faults.py nan-on-batches A-B [train args] # ... while the D step holds the stream's
                                                              # batches A..B of this rank (1-based): a
                                                              # divergence an exact replay repeats
    python train_with_faults.py slow-data SECONDS [train args]  # every batch takes this long to arrive
    python train_with_faults.py disk-full N[:R] [train args]   # the Nth save_state fails (of rank R alone): no space left
    python train_with_faults.py lagging-listing R [train args]  # rank R's listing of checkpoints is empty
                                                              # (a shared file system that lags on one node)
"""
import os
import signal
import sys

import torch
from accelerate import Accelerator

import bigan.losses
from bigan.train import main

fault, arg, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
calls = {"n": 0}
if fault == "kill-on-save":
    original = Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        result = original(self, output_dir, **kwargs)
        calls["n"] += 1
        if calls["n"] == int(arg):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    Accelerator.save_state = save_state
elif fault == "nan-d-loss":
    bad_calls = {int(x) for x in arg.split(",")}
    original_loss = bigan.losses.d_loss

    def d_loss(*args, **kwargs):
        calls["n"] += 1
        loss, stats = original_loss(*args, **kwargs)
        return (loss * torch.nan if calls["n"] in bad_calls else loss), stats

    bigan.losses.d_loss = d_loss
elif fault == "nan-d-loss-from":
    original_loss = bigan.losses.d_loss

    def d_loss(*args, **kwargs):
        calls["n"] += 1
        loss, stats = original_loss(*args, **kwargs)
        return (loss * torch.nan if calls["n"] >= int(arg) else loss), stats

    bigan.losses.d_loss = d_loss
elif fault == "nan-on-batches":
    from bigan.data.stream import Loader

    first, last = (int(x) for x in arg.split("-"))
    original_to_batch, original_loss = Loader._to_batch, bigan.losses.d_loss

    def to_batch(self, item):
        batch = original_to_batch(self, item)
        calls["batch"] = self.batches
        return batch

    def d_loss(*args, **kwargs):
        loss, stats = original_loss(*args, **kwargs)
        return (loss * torch.nan if first <= calls["batch"] <= last else loss), stats

    Loader._to_batch, bigan.losses.d_loss = to_batch, d_loss
elif fault == "lagging-listing":
    import bigan.checkpoint

    if os.environ.get("RANK", "0") == arg:
        bigan.checkpoint.checkpoints = lambda run_dir: []
elif fault == "disk-full":
    import errno

    original = Accelerator.save_state

    nth, _, rank = arg.partition(":")  # "N": the N-th save of every rank fails; "N:R": of rank R alone

    def save_state(self, output_dir=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == int(nth) and rank in ("", os.environ.get("RANK", "0")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir, **kwargs)

    Accelerator.save_state = save_state
elif fault == "slow-data":
    import time

    from bigan.data.stream import Loader

    original_iter = Loader.__iter__

    def slow_iter(self):
        for batch in original_iter(self):
            time.sleep(float(arg))
            yield batch

    Loader.__iter__ = slow_iter
sys.exit(main(argv))
