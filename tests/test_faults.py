"""Fault injection through the real entry point, each run in its own process group as Slurm runs it.

Preemption, `scancel`, time limits and supervisors signal every process of a job step
(DataLoader workers too); Ctrl-C signals the terminal's process group. These runs use
`data.workers=2`, so the workers get the signal as well.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run, tiny_args


def start(args, env, log: Path):
    """python -m bigan.train in a new session (its own process group), output to a file."""
    out = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "bigan.train", *args], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(log: Path, text: str, process, stall_s=120):
    """Until `text` is in the log; fails only after stall_s seconds in which the log did not grow."""
    size, progress_at = -1, time.time()
    while text not in log.read_text():
        assert process.poll() is None, f"exited {process.returncode} before {text!r}:\n{log.read_text()[-3000:]}"
        if log.stat().st_size != size:
            size, progress_at = log.stat().st_size, time.time()
        if time.time() - progress_at > stall_s:
            process.kill()
            raise AssertionError(f"no {text!r}, and no output for {stall_s} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def exit_code(process, log: Path, stall_s=120) -> int:
    """The process's exit status; fails only after stall_s seconds in which its log did not grow."""
    size, progress_at = -1, time.time()
    while process.poll() is None:
        if log.stat().st_size != size:
            size, progress_at = log.stat().st_size, time.time()
        assert time.time() - progress_at < stall_s, f"no exit and no output for {stall_s} s:\n{log.read_text()[-3000:]}"
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
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


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
    wait_for(resumed_log, f"resuming from {checkpoints[-1]}", resumed)
    time.sleep(2)
    os.killpg(resumed.pid, signal.SIGTERM)
    assert exit_code(resumed, resumed_log) == 0
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
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
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
    "train.grad_clip": "-1", "train.compile": "yes please", "train.channels_last": "1.5",
    "train.deepspeed": "/nowhere/zero2.json", "train.deepspeed_g": "/nowhere/zero3.json", "train.deepspeed_d": "/nowhere/zero1.json", "train.max_bad_steps": "0", "train.max_rollbacks": "-1",
    "run.dir": "/dev/null/run", "run.resume": "/nowhere/ckpt-000000010", "run.log_every": "0", "run.image_every_kimg": "0",
    "run.ckpt_every_kimg": "-1", "run.ckpt_limit": "0", "run.grid_size": "0", "run.progress": "sometimes",
    "eval.every_kimg": "-1", "eval.n": "0", "eval.extractor": "/nowhere/net.pt", "eval.inception": "/nowhere/inception.pkl",
    "eval.metrics": "fid,lpips", "eval.data": "/nowhere/ref-{0..3}.tar", "eval.modes": "/nowhere/classifier.pt",
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
