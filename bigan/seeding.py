"""Randomness per rank: the same initial weights everywhere, then each rank its own draws.

Every rank builds the models from ``train.seed`` (so DDP and ZeRO start from one set of weights),
then reseeds torch's generators (CPU and every CUDA device), Python's and numpy's from
(train.seed, rank): latents, random classes, WGAN-GP's mixing weights, dropout masks and any
other draw a model makes differ from rank to rank, as W GPUs' worth of samples should. Accelerate
saves these generators per rank in every checkpoint (``random_states_R.pkl``) and restores them
on resume, so a resumed run continues bit for bit. A run that cannot continue its draws exactly
(a roll-back after a divergence, a resume on another number of processes) reseeds with a salt
that names why, so it never repeats the draws it already made.
"""
import random

import numpy as np
import torch

FRESH, ROLLBACK, ELASTIC = 0, 1, 2  # salts: why a run (re)seeds


def rank_seed(seed: int, rank: int, *salt: int) -> int:
    """A 63-bit seed for (seed, rank, salt...), well mixed (numpy's SeedSequence)."""
    state = np.random.SeedSequence([seed, rank, *salt]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def seed_rank(seed: int, rank: int, *salt: int):
    """Seed torch (CPU and CUDA), numpy and Python for this rank's draws."""
    value = rank_seed(seed, rank, *salt)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


def isolated():
    """A context in which torch's generators (CPU and this process's CUDA device) may be reseeded and drawn
    from, restored after: a model trained on the side (an evaluation network, a pre-trained encoder) leaves
    the run's own draws, and so its exact resume, as they were."""
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=cuda)
