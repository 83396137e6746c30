import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).parent / "helpers"


# The longest tests, collected first and in this order, so that the two CI workers finish together: pytest-xdist
# hands out groups first (the Slurm tests), then one test at a time in collection order, and a long one picked up
# last is the suite's tail. DeepSpeed training runs and the rest alternate (those runs go one at a time:
# test_deepspeed.one_at_a_time).
LONGEST_FIRST = ("test_readme.py::test_every_readme_command_works_as_written",
                 "test_deepspeed.py::test_per_model_stages_train_resume_identically_and_export_from_zero3[shadow]",
                 "test_trainer.py::test_a_family_of_ones_own",
                 "test_deepspeed.py::test_per_model_stages_train_resume_identically_and_export_from_zero3[no-shadow]",
                 "test_trainer.py::test_resume_on_another_number_of_processes",
                 "test_deepspeed.py::test_zero2_pix2pix_with_batchnorm",
                 "test_trainer.py::test_compile_trains_with_r1",
                 "test_deepspeed.py::test_zero1_dcgan",
                 "test_deepspeed.py::test_a_family_of_ones_own")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        return next((i for i, name in enumerate(LONGEST_FIRST) if name in item.nodeid), len(LONGEST_FIRST))

    items.sort(key=rank)  # (a stable sort: the rest keep their order)


def _groups(item) -> str:
    return "_".join(sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                            for m in item.iter_markers("xdist_group")}))


@pytest.fixture(scope="session", autouse=True)
def _grouped(request):
    """pytest-xdist's --dist loadgroup keeps an xdist_group on one worker by adding '@group' to its tests' node
    ids; with a pytest it cannot do that with (9.2, whose ids moved to Node._id) the groups are split over the
    workers without a word, and the Slurm tests start two clusters at once. Checked before any other session
    fixture is made (an autouse one is first of its scope), for every test the worker collected."""
    if getattr(request.config.option, "loadgroup", False):
        split = [item.nodeid for item in request.session.items
                 if _groups(item) and not item.nodeid.endswith("@" + _groups(item))]
        if split:
            pytest.fail(f"--dist loadgroup is ignored by this pytest {pytest.__version__} with this pytest-xdist "
                        f"(no group in the id of {split[0]}); pyproject.toml pins pytest<9.2")


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


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory):
    """Layout -> painting pairs of the demo, 32 px."""
    from bigan.data.demo import ensure_demo_shards

    return ensure_demo_shards(n=96, resolution=32, root=tmp_path_factory.mktemp("pairs"), workers=1, progress=False,
                              paired=True)


PIX2PIX = {"model.arch": "pix2pix", "model.norm": "instance", "loss.r1": 0}


def tiny_args(shards, run_dir, **overrides):
    """A few-second CPU run: 32 px, narrow models, batch 8."""
    args = {"data.shards": shards, "data.resolution": 32, "data.workers": 2, "data.shuffle_buffer": 16,
            "model.g_channels": 8, "model.d_channels": 8, "model.z_dim": 16, "train.batch_size": 8,
            "run.dir": run_dir, "run.progress": "false", "run.log_every": 2, "run.image_every_kimg": 0.016,
            "run.ckpt_every_kimg": 1000, "run.grid_size": 4}
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


def run(cmd, env, timeout=300, check=True, cwd=ROOT):
    """cmd in its own process group, failed after `timeout` seconds without progress (no new output),
    so a loaded machine makes it slower, not red; whatever it started (ranks, workers) is killed after."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            stalled = wait_with_progress(process, [out, err], timeout)
        finally:
            kill_group(process.pid)
        out.seek(0), err.seek(0)
        result = subprocess.CompletedProcess(cmd, process.returncode, out.read(), err.read())
    if stalled:
        raise AssertionError(f"{cmd}: no output for {timeout} s, killed\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def wait_with_progress(process, files, stall_s: float, poll_s: float = 0.2) -> bool:
    """Wait for process; True if it was killed after stall_s seconds in which `files` did not grow."""
    sizes, last_progress = None, time.time()
    while process.poll() is None:
        now_sizes = [os.fstat(f.fileno()).st_size for f in files]
        if now_sizes != sizes:
            sizes, last_progress = now_sizes, time.time()
        elif time.time() - last_progress > stall_s:
            kill_group(process.pid)
            process.wait()
            return True
        time.sleep(poll_s)
    return False


def descendants(pid: int) -> list[int]:
    """Every process below pid (children's children too), from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def kill_group(pid: int):
    """SIGKILL pid's process group, and the groups of all its descendants: torchrun starts every rank in a
    session of its own, which a kill of the launcher's group alone would leave running."""
    for member in [pid, *descendants(pid)]:
        for kill in (os.killpg, os.kill):
            try:
                kill(member, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def train(args, env, check=True):
    return run([sys.executable, "-m", "bigan.train", *args], env, check=check)


def straight_and_resumed(launch, tmp_path, kimg):
    """One run trained straight to `kimg` with a checkpoint halfway (tmp_path/straight), and a copy of it cut back to
    that checkpoint (later ones and the export removed: the copy has to write its own) and resumed to `kimg`
    (tmp_path/split): two runs where a stop, a resume and a straight run took three. launch(run_dir, **overrides)
    runs one; returns its results for the straight run and the resume."""
    from bigan import checkpoint

    straight, split = tmp_path / "straight", tmp_path / "split"
    first = launch(straight, **{"train.kimg": kimg, "run.ckpt_every_kimg": kimg / 2})
    shutil.copytree(straight, split)
    kept = checkpoint.checkpoints(split)
    assert len(kept) == 2, kept  # halfway and at the end
    shutil.rmtree(kept[1])
    shutil.rmtree(split / "export")
    resumed = launch(split, **{"train.kimg": kimg, "run.resume": "latest"})
    assert f"resuming from {kept[0]}" in resumed.stdout, resumed.stdout[-2000:]
    return first, resumed


def zero3_partitioned(tmp_path) -> Path:
    """The shipped zero3.json with every weight partitioned and released after use (it keeps weights under 1e5
    elements whole on every rank: all of the tests' tiny networks'); the path of the copy."""
    import json

    config = json.loads((ROOT / "launch_configs/deepspeed/zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "zero3_partitioned.json"
    path.write_text(json.dumps(config))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SmallExtractor(__import__("torch").nn.Module):
    """A fixed random conv net: uint8 NCHW -> (64-d features, 10 logits). Deterministic, CPU-fast."""

    def __init__(self):
        import torch

        super().__init__()
        torch.manual_seed(1234)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, 2, 1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
        self.head = torch.nn.Linear(64, 10)

    def forward(self, images):
        features = self.body(images.float() / 127.5 - 1)
        return features, self.head(features)


@pytest.fixture(scope="session")
def small_extractor(tmp_path_factory):
    import torch

    path = tmp_path_factory.mktemp("extractor") / "small.pt"
    torch.jit.script(SmallExtractor()).save(str(path))
    return path


HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


@pytest.fixture
def count_host_reads(monkeypatch):
    """Counts every read of a tensor's value on the host while `counting[0]` is True."""
    import torch

    counting, reads = [False], []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def read(self, *args, _original=original, _name=name, **kwargs):
            if counting[0]:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    return counting, reads
