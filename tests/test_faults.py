"""Fault injection through the real entry point, each run in its own process group as Slurm runs it.

Preemption, `scancel`, time limits and supervisors signal every process of a job step
(DataLoader workers too); Ctrl-C signals the terminal's process group. These runs use
`data.workers=2`, so the workers get the signal as well.
"""
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run, tiny_args


def start(args, env, log: Path):
    """python -m bigan.train in a new session (its own process group), output to a file; with Python's
    fault handler on, so that a stalled run can be asked where it stands (stacks())."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    if soft != 0:  # (no core files from stacks()' SIGABRT: the children inherit the limit)
        resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    out = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "bigan.train", *args], cwd=ROOT,
                            env={**env, "PYTHONFAULTHANDLER": "1"}, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def exited(process) -> bool:
    """Whether the process has ended, without reaping it: while it is not reaped its pid, and so its process
    group's id, cannot be given to another process, and the group can be signalled safely."""
    return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def kill_group(process, first=signal.SIGKILL):
    """`first` to the process's group, SIGKILL to what is left of it a second after the leader ends (at most
    10 s), then reap the leader. Only for a process not yet reaped (returncode None)."""
    assert process.returncode is None
    os.killpg(process.pid, first)
    deadline = time.time() + 10
    while not exited(process) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1)  # (the workers' stacks, after SIGABRT)
    os.killpg(process.pid, signal.SIGKILL)  # (the unreaped leader keeps the group's id ours)
    process.wait()


def stacks(process, log: Path) -> str:
    """A stalled run's last output with every thread's stack, of the trainer and its DataLoader workers (they
    inherit the fault handler and the log): SIGABRT to the group makes the handler print them and end each
    process; what is left of the group is then killed."""
    if process.returncode is None:
        kill_group(process, signal.SIGABRT)
    return log.read_text()[-12000:]


def wait_for(log: Path, text: str, process, stall_s=120):
    """Until `text` is in the log; fails only after stall_s seconds in which the log did not grow."""
    size, progress_at = -1, time.time()
    while text not in log.read_text():
        assert process.poll() is None, f"exited {process.returncode} before {text!r}:\n{log.read_text()[-3000:]}"
        if log.stat().st_size != size:
            size, progress_at = log.stat().st_size, time.time()
        if time.time() - progress_at > stall_s:
            raise AssertionError(f"no {text!r}, and no output for {stall_s} s:\n{stacks(process, log)}")
        time.sleep(0.2)


def exit_code(process, log: Path, stall_s=120) -> int:
    """The process's exit status; fails only after stall_s seconds in which its log did not grow."""
    size, progress_at = -1, time.time()
    while process.poll() is None:
        if log.stat().st_size != size:
            size, progress_at = log.stat().st_size, time.time()
        if time.time() - progress_at > stall_s:
            raise AssertionError(f"no exit and no output for {stall_s} s:\n{stacks(process, log)}")
        time.sleep(0.2)
    return process.returncode


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture
def long_run(tiny_shards, tmp_path, env):
    run_dir = tmp_path / "run"
    args = tiny_args(tiny_shards, run_dir, **{"train.kimg": 1000, "data.workers": 2, "run.log_every": 5})
    log = tmp_path / "train.log"
    process = start(args, env, log)
    yield process, run_dir, log, args
    if process.returncode is None:
        kill_group(process)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_group_signal_checkpoints_exits_zero_and_resume_continues(signum, long_run, tmp_path, env):
    process, run_dir, log, args = long_run
    wait_for(log, "starting fresh", process)
    time.sleep(3)  # some steps
    os.killpg(process.pid, signum)  # the whole group: trainer and its DataLoader workers
    assert exit_code(process, log) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "stopped on request" in text and "Traceback" not in text, text[-3000:]
    checkpoints = sorted((run_dir / "checkpoints").glob("ckpt-*"))
    assert checkpoints, "no checkpoint written"
    stopped_at = int(checkpoints[-1].name.split("-")[1])
    resumed_log = tmp_path / "resumed.log"
    resumed = start([*args, "--run.resume=latest"], env, resumed_log)
    try:
        wait_for(resumed_log, f"resuming from {checkpoints[-1]}", resumed)
        time.sleep(2)
        os.killpg(resumed.pid, signal.SIGTERM)
        assert exit_code(resumed, resumed_log) == 0, resumed_log.read_text()[-3000:]
    finally:
        if resumed.returncode is None:  # (whatever a failure left of its group)
            kill_group(resumed)
    assert int(sorted((run_dir / "checkpoints").glob("ckpt-*"))[-1].name.split("-")[1]) > stopped_at


def test_second_ctrl_c_stops_at_once(tiny_shards, tmp_path, env):
    """Steps of about a second, stops agreed every 5 steps: the second Ctrl-C must not wait for that.
    (If the first one landed while the run waited for data, it stopped at once and already exited
    cleanly by the second: then exit 0 with its checkpoint.)"""
    log = tmp_path / "train.log"
    args = tiny_args(tiny_shards, tmp_path / "run", **{"train.kimg": 1000, "data.workers": 0, "run.log_every": 5,
                                                        "model.g_channels": 96, "model.d_channels": 96,
                                                        "train.batch_size": 64, "run.image_every_kimg": 1000})
    process = start(args, env, log)
    try:
        wait_for(log, "starting fresh", process)
        time.sleep(2)
        os.killpg(process.pid, signal.SIGINT)
        wait_for(log, "Ctrl-C again to stop at once", process)
        os.killpg(process.pid, signal.SIGINT)
        code = exit_code(process, log)
    finally:
        if process.returncode is None:
            kill_group(process)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    if code == 0:  # the first Ctrl-C had already stopped the run, cleanly
        assert "stopped on request" in text and list((tmp_path / "run" / "checkpoints").glob("ckpt-*")), text[-3000:]
    else:
        assert code == 130 and "bigan: interrupted" in text, (code, text[-3000:])


def test_workers_die_with_a_killed_trainer(tiny_shards, tmp_path, env):
    """Workers blocked in a read (a pipe: shard that never delivers) never look at their parent; they
    must die with it all the same when it is SIGKILLed (as the OOM killer does)."""
    log = tmp_path / "train.log"
    process = start(tiny_args("pipe:sleep 1000", tmp_path / "run", **{"data.workers": 2}), env, log)
    try:
        wait_for(log, "starting fresh", process)
        time.sleep(2)
        workers = children(process.pid)
        assert len(workers) >= 2, workers
        process.send_signal(signal.SIGKILL)  # the trainer only
        process.wait()
        deadline = time.time() + 10
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(alive(w) for w in workers), "DataLoader workers outlived their trainer"
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the `sleep`s the pipes started
        except ProcessLookupError:
            pass


@pytest.fixture
def unreadable_shards(tmp_path):
    """Two shards whose every sample is a JPEG that does not decode."""
    import webdataset as wds

    folder = tmp_path / "broken"
    folder.mkdir()
    for shard in range(2):
        with wds.TarWriter(str(folder / f"data-{shard}.tar")) as sink:
            for i in range(20):
                sink.write({"__key__": f"s{shard}-{i}", "jpg": b"\xff\xd8\xff\xe0 not a jpeg " + bytes(i)})
    return folder


@pytest.mark.parametrize("mode", ["infinite", "epoch"])
def test_all_unreadable_shards_end_in_one_line(mode, unreadable_shards, tmp_path, env):
    args = tiny_args(unreadable_shards, tmp_path / "run", **{"data.mode": mode, "data.workers": 2})
    result = run([sys.executable, "-m", "bigan.train", *args], env, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("bigan: error:") and str(unreadable_shards) in last, last


def test_sources_joined_with_double_colon_combine(tiny_shards, tmp_path, env):
    """Two shard folders, and a manifest with a folder, joined by '::' (each alone is a valid source)."""
    import shutil

    manifest = Path(tiny_shards)
    folder_a, folder_b = tmp_path / "a", tmp_path / "b"
    for folder in (folder_a, folder_b):  # the same samples twice: what counts is that both are read
        folder.mkdir()
        for shard in manifest.parent.glob("*.tar"):
            shutil.copy(shard, folder / f"{folder.name}-{shard.name}")
    for i, source in enumerate([f"{folder_a}::{folder_b}", f"{manifest}::{folder_b}"]):
        args = tiny_args(source, tmp_path / f"run{i}", **{"train.kimg": 0.032, "data.workers": 1})
        result = run([sys.executable, "-m", "bigan.train", *args], env, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "done at" in result.stdout


BAD_VALUES = {  # every config key, with a value it must refuse (the key is named in the message)
    "data.shards": "/nowhere/data-{0..3}.tar", "data.resolution": "48", "data.mode": "forever", "data.workers": "-1", "data.shuffle_buffer": "0", "data.shard_mix": "0",
    "data.flip": "maybe", "data.crop_scale_min": "1.5", "data.demo_images": "0",
    "model.arch": "stylegan", "model.z_dim": "0", "model.g_channels": "0", "model.d_channels": "-8",
    "model.num_classes": "-1", "model.d_norm": "layer", "model.sync_batchnorm": "2", "model.norm": "group",
    "model.dropout": "1.0", "model.g_upsample": "bilinear",
    "loss.name": "l1", "loss.r": "1.5", "loss.gp": "-1", "loss.r1": "-0.5", "loss.r1_interval": "0",
    "loss.d_steps": "0", "loss.pack": "3", "loss.l1": "-1",
    "train.batch_size": "0", "train.grad_accum": "0", "train.kimg": ".inf", "train.precision": "fp8",
    "train.seed": "1.5", "train.g_lr": "-1", "train.d_lr": "0", "train.g_betas": "[2,2]",
    "train.d_betas": "[0.5]", "train.adam_eps": "0", "train.ema_kimg": "-1", "train.ema_rampup": "-0.1",
    "train.grad_clip": "-1", "train.compile": "yes please", "train.channels_last": "1.5", "train.zero3_shadow": "maybe",
    "train.deepspeed": "/nowhere/zero2.json", "train.deepspeed_g": "/nowhere/zero3.json", "train.deepspeed_d": "/nowhere/zero1.json", "train.max_bad_steps": "0", "train.max_rollbacks": "-1",
    "run.dir": "/dev/null/run", "run.resume": "/nowhere/ckpt-000000010", "run.log_every": "0", "run.image_every_kimg": "0",
    "run.ckpt_every_kimg": "-1", "run.ckpt_limit": "0", "run.grid_size": "0", "run.progress": "sometimes",
    "eval.every_kimg": "-1", "eval.n": "0", "eval.extractor": "/nowhere/net.pt", "eval.inception": "/nowhere/inception.pkl",
    "eval.metrics": "fid,lpips", "eval.data": "/nowhere/ref-{0..3}.tar", "eval.modes": "/nowhere/classifier.pt",
    "augment.kind": "mixup", "augment.policy": "color,blur", "augment.p": "1.5", "augment.target": "-0.1",
    "augment.kimg": "0", "augment.interval": "0",
}


def test_every_config_key_refuses_a_bad_value_in_one_line(tmp_path, capsys):
    """Refused before anything is built or written (no run folder appears)."""
    import dataclasses

    from bigan.config import Config
    from bigan.train import main

    keys = {f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(getattr(Config(), s.name))}
    assert keys == set(BAD_VALUES), f"keys without a bad-value case: {keys - set(BAD_VALUES)}"
    for key, value in BAD_VALUES.items():
        assert main([f"--run.dir={tmp_path / 'run'}", f"--{key}={value}"]) == 2, key
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and key in err and "Traceback" not in err, (key, err)
    assert not (tmp_path / "run").exists()


def test_yaml_floats_without_a_dot_and_yaml_errors(tmp_path, capsys):
    from bigan.config import load_config
    from bigan.train import main

    preset = tmp_path / "preset.yaml"
    preset.write_text("train:\n  g_lr: 1e-4\n")
    assert load_config(preset, ["--train.d_lr=3e-4"]).train.g_lr == 1e-4
    preset.write_text("train:\n  g_lr: [1e-4\n")
    assert main(["--config", str(preset), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(preset) in err and "not valid YAML" in err, err


@pytest.mark.parametrize("argv, flag", [
    (["--truncation", "0"], "--truncation"), (["--n", "0"], "--n"), (["--n", "-3"], "--n"),
])
def test_bigan_sample_refuses_bad_flags(argv, flag, tmp_path, env):
    result = run([sys.executable, "-m", "bigan.sample", "--checkpoint", str(tmp_path), *argv], env, check=False)
    assert result.returncode == 2 and flag in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_full_disk_and_changed_architecture_are_one_line(tiny_shards, tmp_path, env):
    """A checkpoint write that hits a full disk, and a resume whose model settings changed."""
    from conftest import HELPERS

    run_dir = tmp_path / "run"
    args = tiny_args(tiny_shards, run_dir, **{"train.kimg": 0.064, "run.ckpt_every_kimg": 0.016})
    full = run([sys.executable, str(HELPERS / "train_with_faults.py"), "disk-full", "2", *args], env, check=False)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert "could not write checkpoint" in last and "No space left on device" in last and str(run_dir) in last
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["ckpt-000000002"]  # the first one survives
    changed = run([sys.executable, "-m", "bigan.train", *args, "--run.resume=latest",
                              "--model.g_channels=16"], env, check=False)
    assert changed.returncode == 2 and "Traceback" not in changed.stderr, changed.stderr[-3000:]
    assert "was trained with model.g_channels=8 (now 16)" in changed.stderr.strip().splitlines()[-1]
    packed = run([sys.executable, "-m", "bigan.train", *args, "--run.resume=latest", "--loss.pack=2"], env, check=False)
    assert packed.returncode == 2 and "was trained with loss.pack=4 (now 2)" in packed.stderr.strip().splitlines()[-1]


def test_sample_and_eval_refuse_bad_files_and_flags_in_one_line(tiny_shards, small_extractor, tmp_path, env):
    broken = tmp_path / "export"
    broken.mkdir()
    (broken / "generator.json").write_text('{"model": {"arch": "dcgan", "z_dim": 16, "g_channels": 8, '
                                           '"d_channels": 8, "num_classes": 0, "d_norm": "spectral"}, "resolution": 32}')
    (broken / "generator.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{truncated")
    not_a_module = tmp_path / "notes.txt"
    not_a_module.write_text("not a network")
    cases = [
        (["bigan.sample", "--checkpoint", str(broken / "generator.safetensors")], "not a readable safetensors"),
        (["bigan.metrics.evaluate", "--checkpoint", str(broken), "--data", str(tiny_shards), "--n", "0"], "--n"),
        (["bigan.metrics.evaluate", "--checkpoint", str(broken), "--data", str(tiny_shards),
          "--out", str(tmp_path / "missing" / "m.json")], "--out"),
        (["bigan.metrics.evaluate", "--checkpoint", str(broken), "--data", str(tiny_shards),
          "--extractor", str(not_a_module)], "neither TorchScript nor a pickled module"),
    ]
    for argv, message in cases:
        result = run([sys.executable, "-m", *argv], env, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (argv, result.stderr[-2000:])
        assert message in result.stderr.strip().splitlines()[-1], (argv, result.stderr[-2000:])


def test_resume_takes_the_runs_own_settings_and_says_when_nothing_is_there(tiny_shards, tmp_path, env):
    run_dir = tmp_path / "run"
    first = run([sys.executable, "-m", "bigan.train", *tiny_args(tiny_shards, run_dir, **{"train.kimg": 0.032})], env, check=False)
    assert first.returncode == 0, first.stderr[-2000:]
    # only the run dir and what changes: shards, model widths, workers ... come from RUN/config.yaml
    resumed = run([sys.executable, "-m", "bigan.train", f"--run.dir={run_dir}", "--run.resume=latest",
                              "--train.kimg=0.064"], env, check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "done at 0.1 kimg" in resumed.stdout
    # the closing line's rate counts this run's images and time only (32 images, not 64)
    seconds, rate = re.search(r"done at 0\.1 kimg after (\d+) s of training \((\d+) img/s", resumed.stdout).groups()
    assert int(rate) <= 32 / max(int(seconds) - 0.5, 0.01) + 1, resumed.stdout
    empty = run([sys.executable, "-m", "bigan.train", *tiny_args(tiny_shards, tmp_path / "empty",
                                                                             **{"train.kimg": 0.016}),
                            "--run.resume=latest"], env, check=False)
    assert empty.returncode == 0 and "starting fresh (run.resume=latest: no checkpoint in" in empty.stdout
    # a fresh start where a run already is: refused, nothing touched (it would rotate out its own
    # checkpoints, keep the old run's as "latest" and mix the two runs' logs)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    config = (run_dir / "config.yaml").read_text()
    again = run([sys.executable, "-m", "bigan.train", *tiny_args(tiny_shards, run_dir, **{"train.kimg": 0.016})],
                env, check=False)
    assert again.returncode == 2 and "--run.resume=latest" in again.stderr.strip().splitlines()[-1]
    assert f"run.dir: {run_dir} holds another run" in again.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    assert (run_dir / "config.yaml").read_text() == config


def test_divergence_before_the_first_checkpoint_is_one_line(tiny_shards, tmp_path, env):
    from conftest import HELPERS

    args = tiny_args(tiny_shards, tmp_path / "run", **{"train.max_bad_steps": 2, "train.kimg": 0.08})
    result = run([sys.executable, str(HELPERS / "train_with_faults.py"), "nan-d-loss", "1,2,3,4,5,6", *args], env,
                 check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "training diverged" in result.stderr.strip().splitlines()[-1]


CLI_BAD_FLAGS = [  # (module, argv, the flag the one line must name)
    ("bigan.train", ["--config", "/nowhere/preset.yaml"], "/nowhere/preset.yaml"),
    ("bigan.train", ["--learning-rate=1"], "learning-rate"),
    ("bigan.sample", [], "--checkpoint"),
    ("bigan.sample", ["--checkpoint", "/nowhere"], "--checkpoint"),
    ("bigan.sample", ["--checkpoint", "RUN", "--n", "0"], "--n"),
    ("bigan.sample", ["--checkpoint", "RUN", "--n", "x"], "--n"),
    ("bigan.sample", ["--checkpoint", "RUN", "--truncation", "0"], "--truncation"),
    ("bigan.sample", ["--checkpoint", "RUN", "--interpolate", "-1"], "--interpolate"),
    ("bigan.sample", ["--checkpoint", "RUN", "--out", "samples.gif"], "--out"),
    ("bigan.metrics.evaluate", ["--checkpoint", "RUN"], "--data"),
    ("bigan.metrics.evaluate", ["--checkpoint", "RUN", "--data", "D", "--n", "0"], "--n"),
    ("bigan.metrics.evaluate", ["--checkpoint", "RUN", "--data", "D", "--batch", "0"], "--batch"),
    ("bigan.metrics.evaluate", ["--checkpoint", "RUN", "--data", "D", "--metrics", "fid,lpips"], "--metrics"),
    ("bigan.metrics.evaluate", ["--checkpoint", "RUN", "--data", "D", "--out", "/nowhere/m.json"], "--out"),
    ("bigan.data.shards", ["SRC"], "output_dir"),
    ("bigan.data.shards", ["SRC", "OUT", "--resolution", "0"], "--resolution"),
    ("bigan.data.shards", ["SRC", "OUT", "--quality", "101"], "--quality"),
    ("bigan.data.shards", ["SRC", "OUT", "--format", "gif"], "--format"),
    ("bigan.data.shards", ["SRC", "OUT", "--maxcount", "0"], "--maxcount"),
    ("bigan.data.shards", ["SRC", "OUT", "--workers", "0"], "--workers"),
    ("bigan.data.shards", ["/nowhere/images", "OUT"], "/nowhere/images"),
    ("bigan.data.demo", ["--n", "0"], "--n"),
    ("bigan.data.demo", ["--workers", "0"], "--workers"),
    ("bigan.data.shards", ["SRC", "OUT", "--caption-column", "text", "--no-captions"], "--no-captions"),
    ("bigan.data.demo_captions", ["--captions", "--n", "0"], "--n"),
    ("bigan.data.demo_captions", ["--captions", "--resolution", "-1"], "--resolution"),
    ("bigan.data.demo_captions", ["--captions", "--held-out-prompts", "OUT"], "--held-out-prompts"),
]


@pytest.mark.parametrize("module, argv, flag", CLI_BAD_FLAGS, ids=[f"{m}:{' '.join(a)}" for m, a, _ in CLI_BAD_FLAGS])
def test_every_command_refuses_a_bad_flag_in_one_line(module, argv, flag, tiny_shards, tmp_path, capsys):
    """In-process: exit 2 and one line on stderr naming the flag (no usage text, no traceback)."""
    import importlib

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    argv = [str(run_dir) if a == "RUN" else str(tiny_shards) if a in ("D", "SRC") else
            str(tmp_path / "out") if a == "OUT" else a for a in argv]
    main = importlib.import_module(module).main
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and flag in err and "Traceback" not in err, err


# ---------------------------------------------------------------- bad input, by class (issue 24)
#
# Every CLI and every input kind with its bad values, in one table. Each case runs in-process and must
# exit 2 with one line naming the problem, and leave every file of the inputs as it was (nothing
# written, nothing changed). Later families add their rows here.


class _Classifier(torch.nn.Module):
    """A mode classifier that goes wrong in one of the ways users' files do."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, images):
        if self.kind == "float_only":  # forgot that bigan passes uint8 pixels
            return self.conv(images).mean((2, 3))
        x = images.float().mean((1, 2, 3))[:, None].repeat(1, 4)
        if self.kind == "nan":
            return x * float("nan")
        if self.kind == "one_row":
            return x[:1]
        if self.kind == "no_classes":
            return x[:, :0]
        if self.kind == "nan_on_content":  # fine on the blank probe, NaN on real images
            return torch.where(x > 0, torch.full_like(x, float("nan")), x)
        return x


def _snapshot(root: Path) -> dict:
    import hashlib

    return {p.relative_to(root).as_posix(): (p.stat().st_size, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()} | \
        {p.relative_to(root).as_posix() + "/": None for p in root.rglob("*") if p.is_dir()}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_shards, env):
    """What the table's cases read: a trained run, a broken copy of its checkpoint, an image-to-image
    export, image folders, classifier files, npz files, a dataset, pairs and 16-bit images."""
    import shutil

    import numpy as np
    import torch
    from PIL import Image

    from bigan.checkpoint import export_generator
    from bigan.models.pix2pix import UNetGenerator

    root = tmp_path_factory.mktemp("bad_inputs")
    run([sys.executable, "-m", "bigan.train", *tiny_args(tiny_shards, root / "run", **{"train.kimg": 0.016,
                                                                                       "data.workers": 0})], env)
    incomplete = root / "incomplete" / "checkpoints" / "ckpt-000000002"
    shutil.copytree(root / "run" / "checkpoints" / "ckpt-000000002", incomplete)
    (incomplete / "random_states_0.pkl").unlink()
    (incomplete / "optimizer_1.bin").unlink()
    shutil.copy(root / "run" / "config.yaml", root / "incomplete" / "config.yaml")
    export_generator(root / "pix2pix", UNetGenerator(32, 4), None, {"arch": "pix2pix", "z_dim": 8, "g_channels": 4,
                     "d_channels": 4, "num_classes": 0, "norm": "batch", "dropout": 0.5}, {"resolution": 32})
    for folder, names in (("collide", ("a.png", "a.jpg")), ("layouts", ("x.png", "y.png"))):
        (root / folder).mkdir()
        for name in names:
            Image.new("RGB", (40, 40), (200, 40, 40)).save(root / folder / name)
    (root / "out").mkdir()
    Image.new("RGB", (8, 8)).save(root / "out" / "taken.png")
    for kind in ("float_only", "nan", "one_row", "no_classes", "nan_on_content"):
        torch.jit.script(_Classifier(kind)).save(str(root / f"{kind}.pt"))
    torch.save(_Classifier("fine").state_dict(), root / "state_dict.pt")
    np.savez(root / "empty.npz", images=np.zeros((0, 32, 32, 3), np.uint8))
    np.savez(root / "samples.npz", images=np.full((8, 32, 32, 3), 90, np.uint8))
    import datasets

    datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 2}).save_to_disk(str(root / "dataset"))
    for side, size in (("targets", (40, 30)), ("inputs", (30, 30))):
        (root / "wide" / side).mkdir(parents=True)
        Image.new("RGB", size).save(root / "wide" / side / "p.png")
    (root / "broken16").mkdir()
    from test_data import write_png16

    write_png16(root / "broken16" / "deep.png", np.random.default_rng(0).integers(0, 65535, (16, 16), np.uint16))
    data = (root / "broken16" / "deep.png").read_bytes()
    (root / "broken16" / "deep.png").write_bytes(data[:len(data) // 2])  # cut inside its pixels
    return root


TRAIN = ["--run.dir={root}/run", "--run.resume=latest"]
BAD_INPUTS = [  # (id, module, argv with {root}, the one line contains)
    ("train:refused-resume", "bigan.train", [*TRAIN, "--model.g_channels=16"], "was trained with model.g_channels=8"),
    ("train:batch-size-on-resume", "bigan.train", [*TRAIN, "--train.batch_size=4"], "train.batch_size 8 -> 4"),
    ("train:incomplete-checkpoint", "bigan.train",
     ["--run.dir={root}/run", "--run.resume={root}/incomplete/checkpoints/ckpt-000000002"], "is incomplete"),
    ("train:classifier-state-dict", "bigan.train", [*TRAIN, "--eval.every_kimg=1", "--eval.metrics=",
                                                    "--eval.modes={root}/state_dict.pt"], "holds a state_dict"),
    ("train:classifier-float-only", "bigan.train", [*TRAIN, "--eval.every_kimg=1", "--eval.metrics=",
                                                    "--eval.modes={root}/float_only.pt"], "fails on a batch of uint8"),
    ("train:classifier-nan", "bigan.train", [*TRAIN, "--eval.every_kimg=1", "--eval.metrics=",
                                             "--eval.modes={root}/nan.pt"], "non-finite"),
    ("train:extractor-one-row", "bigan.train", [*TRAIN, "--eval.every_kimg=1", "--eval.metrics=fid",
                                                "--eval.extractor={root}/one_row.pt"], "shape (1, 4) for 2 images"),
    ("sample:out-inside-input", "bigan.sample", ["--checkpoint", "{root}/pix2pix/generator.safetensors", "--input",
                                                 "{root}/layouts", "--out", "{root}/layouts/"], "never writes into"),
    ("sample:colliding-names", "bigan.sample", ["--checkpoint", "{root}/pix2pix/generator.safetensors", "--input",
                                                "{root}/collide", "--out", "{root}/fresh/"], "would both be written"),
    ("sample:existing-out", "bigan.sample", ["--checkpoint", "{root}/run", "--out", "{root}/out/taken.png"],
     "exists; pass --overwrite"),
    ("sample:truncation-pix2pix", "bigan.sample", ["--checkpoint", "{root}/pix2pix/generator.safetensors", "--input",
                                                   "{root}/layouts", "--truncation", "1", "--out", "{root}/t/"],
     "--truncation does not apply to model.arch=pix2pix"),
    ("sample:interpolate-pix2pix", "bigan.sample", ["--checkpoint", "{root}/pix2pix/generator.safetensors", "--input",
                                                    "{root}/layouts", "--interpolate", "4", "--out", "{root}/t/"],
     "--interpolate does not apply to model.arch=pix2pix"),
    ("sample:interpolate-1", "bigan.sample", ["--checkpoint", "{root}/run", "--interpolate", "1"], "--interpolate"),
    ("sample:n-not-rows", "bigan.sample", ["--checkpoint", "{root}/run", "--interpolate", "4", "--n", "10"],
     "must be a multiple of --interpolate 4"),
    ("sample:incomplete-run", "bigan.sample", ["--checkpoint", "{root}/incomplete", "--out", "{root}/t.png"],
     "no complete checkpoint"),
    ("eval:classifier-state-dict", "bigan.metrics.evaluate", ["--samples", "{root}/samples.npz", "--modes",
                                                              "{root}/state_dict.pt"], "holds a state_dict"),
    ("eval:classifier-float-only", "bigan.metrics.evaluate", ["--samples", "{root}/samples.npz", "--modes",
                                                              "{root}/float_only.pt"], "x.float()"),
    ("eval:classifier-nan", "bigan.metrics.evaluate", ["--samples", "{root}/samples.npz", "--modes",
                                                       "{root}/nan.pt"], "non-finite"),
    ("eval:classifier-one-row", "bigan.metrics.evaluate", ["--samples", "{root}/samples.npz", "--modes",
                                                           "{root}/one_row.pt"], "shape (1, 4) for 2 images"),
    ("eval:classifier-no-classes", "bigan.metrics.evaluate", ["--samples", "{root}/samples.npz", "--modes",
                                                              "{root}/no_classes.pt"], "at least 2"),
    ("eval:classifier-nan-on-images", "bigan.metrics.evaluate", ["--samples", "{root}/samples.npz", "--modes",
                                                                 "{root}/nan_on_content.pt"], "for 8 of 8 images"),
    ("eval:no-samples", "bigan.metrics.evaluate", ["--samples", "{root}/empty.npz", "--modes",
                                                   "{root}/nan_on_content.pt"], "holds no images"),
    ("eval:seed-with-samples", "bigan.metrics.evaluate", ["--samples", "{root}/samples.npz", "--modes",
                                                          "{root}/nan_on_content.pt", "--seed", "3"], "--seed"),
    ("eval:extractor-without-features", "bigan.metrics.evaluate",
     ["--samples", "{root}/samples.npz", "--modes", "{root}/nan_on_content.pt", "--extractor", "{root}/nan.pt"],
     "--extractor would do nothing"),
    ("eval:inception-with-other-extractor", "bigan.metrics.evaluate",
     ["--samples", "{root}/samples.npz", "--data", "{root}/run", "--extractor", "{root}/nan.pt", "--inception",
      "{root}/nan.pt"], "--inception would do nothing"),
    ("shards:split-with-folder", "bigan.data.shards", ["{root}/layouts", "{root}/new", "--split", "test"], "--split"),
    ("shards:label-column-with-folder", "bigan.data.shards", ["{root}/layouts", "{root}/new", "--label-column", "k"],
     "--labels-from-dirs"),
    ("shards:labels-from-dirs-with-dataset", "bigan.data.shards", ["{root}/dataset", "{root}/new",
                                                                   "--labels-from-dirs"], "--label-column"),
    ("shards:pairs-of-another-aspect", "bigan.data.shards", ["{root}/wide/targets", "{root}/new", "--src-dir",
                                                             "{root}/wide/inputs"], "differ in aspect ratio"),
    ("shards:broken-16-bit", "bigan.data.shards", ["{root}/broken16", "{root}/new"], "deep.png"),
    ("demo:root-with-grid", "bigan.data.demo", ["--grid", "{root}/grid.png", "--root", "{root}/cache"], "--root"),
    ("demo:workers-with-folders", "bigan.data.demo", ["--pairs", "--folders", "{root}/f", "--workers", "2"],
     "--workers"),
    ("shards:caption-column-not-in-dataset", "bigan.data.shards", ["{root}/dataset", "{root}/new", "--caption-column",
                                                                   "text"], "no column 'text'"),
    ("shards:caption-column-without-metadata", "bigan.data.shards", ["{root}/layouts", "{root}/new", "--caption-column",
                                                                     "text"], "without metadata.jsonl"),
    ("shards:no-captions-with-dataset", "bigan.data.shards", ["{root}/dataset", "{root}/new", "--no-captions"],
     "--no-captions is for folders"),
    ("shards:caption-column-with-pairs", "bigan.data.shards", ["{root}/wide/targets", "{root}/new", "--src-dir",
                                                               "{root}/wide/inputs", "--caption-column", "t"],
     "carry no captions"),
    ("demo:captions-root-with-folders", "bigan.data.demo_captions", ["--captions", "--folders", "{root}/f", "--root",
                                                                     "{root}/cache"], "--root"),
    ("demo:prompts-resolution", "bigan.data.demo_captions", ["--held-out-prompts", "{root}/p.txt", "--resolution",
                                                             "32"], "--resolution"),
    ("demo:prompts-into-a-folder", "bigan.data.demo_captions", ["--held-out-prompts", "{root}/layouts"], "is a folder"),
]


@pytest.mark.parametrize("module, argv, message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(module, argv, message, bad_inputs, capsys):
    import importlib

    before = _snapshot(bad_inputs)
    try:
        code = importlib.import_module(module).main([a.format(root=bad_inputs) for a in argv])
    except SystemExit as exc:
        code = exc.code
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "warning" not in line.lower()
           and not line.startswith("[")]  # (DeepSpeed's and torch's own log lines, the warnings bigan itself gives)
    assert code == 2 and len(err) == 1 and message in err[0] and "Traceback" not in err[0], (code, err)
    assert _snapshot(bad_inputs) == before, "a refused command changed its inputs"


def test_after_a_refused_resume_the_run_resumes_and_samples_as_before(bad_inputs, tmp_path, env):
    """The issue's case: a refused resume used to rewrite config.yaml, so that a plain resume was refused
    next and bigan-sample failed with a load_state_dict traceback."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(bad_inputs / "run", run_dir)
    refused = run([sys.executable, "-m", "bigan.train", f"--run.dir={run_dir}", "--run.resume=latest",
                   "--model.g_channels=16"], env, check=False)
    assert refused.returncode == 2
    resumed = run([sys.executable, "-m", "bigan.train", f"--run.dir={run_dir}", "--run.resume=latest",
                   "--train.kimg=0.024"], env)
    assert "resuming from" in resumed.stdout
    run([sys.executable, "-m", "bigan.sample", "--checkpoint", str(run_dir / "checkpoints" / "ckpt-000000003"),
         "--n", "2", "--out", str(tmp_path / "g.png")], env)


def test_latest_passes_over_an_incomplete_checkpoint_and_says_which_it_uses(bad_inputs, tmp_path, env):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(bad_inputs / "run", run_dir)
    newer = run_dir / "checkpoints" / "ckpt-000000009"
    shutil.copytree(run_dir / "checkpoints" / "ckpt-000000002", newer)
    (newer / "data_rank_0.json").unlink()
    resumed = run([sys.executable, "-m", "bigan.train", f"--run.dir={run_dir}", "--run.resume=latest",
                   "--train.kimg=0.024"], env)
    assert f"{newer} is incomplete (data_rank_0.json missing): skipped" in resumed.stdout
    assert f"resuming from {run_dir / 'checkpoints' / 'ckpt-000000002'}" in resumed.stdout


def test_checkpoints_without_a_manifest_are_checked_as_layout_1(bad_inputs, tmp_path):
    """Checkpoints written before checkpoint.json existed are checked against what that layout held."""
    import shutil

    from bigan import checkpoint

    old = tmp_path / "ckpt-000000002"
    shutil.copytree(bad_inputs / "run" / "checkpoints" / "ckpt-000000002", old)
    (old / "checkpoint.json").unlink()
    assert checkpoint.missing_files(old) == []
    for name in ("architecture.json", "random_states_0.pkl", "optimizer_1.bin"):
        (old / name).rename(old / f"{name}.moved")
        assert checkpoint.missing_files(old) == [name]
        (old / f"{name}.moved").rename(old / name)


def test_sample_rebuilds_g_from_the_checkpoint_when_config_yaml_is_broken(bad_inputs, tmp_path, env):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(bad_inputs / "run", run_dir, ignore=shutil.ignore_patterns("export"))
    (run_dir / "config.yaml").write_text("model: [unclosed\n")
    run([sys.executable, "-m", "bigan.sample", "--checkpoint", str(run_dir), "--n", "2", "--out",
         str(tmp_path / "g.png")], env)


def test_a_tiny_truncation_draws_at_once(bad_inputs, tmp_path, env):
    """--truncation 1e-9 used to redraw for ever: the truncated normal is drawn by its inverse CDF."""
    out = tmp_path / "z.npz"
    result = run([sys.executable, "-m", "bigan.sample", "--checkpoint", str(bad_inputs / "run"), "--n", "4",
                  "--truncation", "1e-9", "--out", str(out)], env, timeout=60)
    assert result.returncode == 0 and out.exists()
    from bigan.sample import latents

    z = latents(1000, 16, 0, 0.5)
    assert z.abs().max() <= 0.5 and 0.25 < z.std() < 0.3  # truncated to [-0.5, 0.5]: std 0.28


LAYOUT_1 = ROOT / "tests" / "data" / "layout1_run"  # written by bigan before checkpoint.json and families


def test_checkpoints_and_exports_from_before_the_families_seam_still_load(tmp_path, env):
    """tests/data/layout1_run was written by bigan at cb62f14 (layout 1: no checkpoint.json, G and D by index):
    bigan-sample makes the same images from its checkpoint and its export as that bigan did, and training
    resumes from it (the stream restarts its own way: its interleaving is new)."""
    import shutil

    import numpy as np

    for source, expected in (("checkpoints/ckpt-000000002", "expected_ckpt.npz"), ("", "expected_export.npz")):
        out = tmp_path / f"{expected}"
        run([sys.executable, "-m", "bigan.sample", "--checkpoint", str(LAYOUT_1 / source), "--n", "4", "--out",
             str(out)], env)
        assert np.array_equal(np.load(out)["images"], np.load(LAYOUT_1 / expected)["images"]), source
    run_dir = tmp_path / "run"
    shutil.copytree(LAYOUT_1, run_dir)
    resumed = run([sys.executable, "-m", "bigan.train", f"--run.dir={run_dir}", "--run.resume=latest",
                   "--train.kimg=0.032"], env)
    assert "resuming from" in resumed.stdout and "done at 0.0 kimg" in resumed.stdout
    assert checkpoint_names(run_dir)[-1] == "ckpt-000000004"


def checkpoint_names(run_dir):
    from bigan import checkpoint

    return [p.name for p in checkpoint.checkpoints(run_dir)]
