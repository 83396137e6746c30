"""The training loop's parts, one concern each (see bigan/trainer.py for how they are put together)."""
