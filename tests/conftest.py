import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).parent / "helpers"


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """Environment for subprocesses: a private cache, one thread per process, quiet."""
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "BIGAN_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    from bigan.data.demo import ensure_demo_shards

    return ensure_demo_shards(n=96, resolution=32, root=tmp_path_factory.mktemp("shards"), workers=1, progress=False)


def tiny_args(shards, run_dir, **overrides):
    """A few-second CPU run: 32 px, narrow models, batch 8."""
    args = {"data.shards": shards, "data.resolution": 32, "data.workers": 2, "data.shuffle_buffer": 16,
            "model.g_channels": 8, "model.d_channels": 8, "model.z_dim": 16, "train.batch_size": 8,
            "run.dir": run_dir, "run.progress": "false", "run.log_every": 2, "run.image_every_kimg": 0.016,
            "run.ckpt_every_kimg": 1000, "run.grid_size": 4}
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


def run(cmd, env, timeout=300, check=True):
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def train(args, env, check=True):
    return run([sys.executable, "-m", "bigan.train", *args], env, check=check)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
