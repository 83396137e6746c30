"""Every command in the README, as a user pastes it into a fresh shell, at small sizes.

The commands are read from the README's code blocks and run in order in an empty folder that
holds only what a checkout after `make` holds (`.venv`, `bigan/`, `launch_configs/`, `bench/`,
`slurm/`), with HOME pointing at a folder of a few paintings and a saved `datasets` set. Each
command runs as written, with small-size flags appended (the last value of a flag wins), so a
README line that no longer works fails here. A command that needs GPUs or a cluster must be
listed in NOT_HERE with the reason; a README command that is neither run nor listed fails the
test, so a new one cannot go unchecked.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, kill_group, run

README = ROOT / "README.md"
STARTS = (".venv/bin/", "make ", "sbatch ", "bigan-", "accelerate ", "python ", "tensorboard ", "source ")
NOT_HERE = {  # command prefix -> why it does not run here
    "make test": "what runs this test",
    ".venv/bin/bigan-shards ~/paintings /shared/shards": "the Slurm example: /shared is the cluster's shared storage "
                                                          "(the same command into shards/ runs here)",
    "sbatch": "needs a Slurm cluster with GPUs; slurm/train.sh is tested against a real Slurm in test_slurm.py",
    ".venv/bin/accelerate launch --config_file launch_configs/accelerate/multi_gpu.yaml": "8 GPUs",
    ".venv/bin/accelerate launch --config_file launch_configs/accelerate/deepspeed_zero":
        "8 GPUs (test_deepspeed.py runs these launch configs with --num_processes 2)",
    ".venv/bin/accelerate launch bigan/train.py --config launch_configs/experiments/text2image-demo.yaml "
    "--dfgan.text_encoder=/models": "needs a Hugging Face text encoder's folder (a download); test_text_encoders.py "
                                   "trains with a tiny one",
    ".venv/bin/bigan-eval --checkpoint runs/text2image --metrics clip": "needs a real CLIP model's folder (a download); "
                                                                         "test_text2image_metrics.py runs it with a tiny one",
}
TINY_TRAIN = ["--train.kimg=0.016", "--data.demo_images=32", "--model.g_channels=4", "--model.d_channels=4",
              "--model.z_dim=8", "--train.batch_size=4", "--data.workers=1", "--data.shuffle_buffer=8",
              "--run.progress=false", "--run.image_every_kimg=0.008", "--run.grid_size=4", "--eval.n=16"]
TINY_STYLEGAN2 = ["--stylegan2.w_dim=8", "--stylegan2.mapping_layers=1", "--stylegan2.channel_base=1024",
                  "--stylegan2.channel_max=4"]  # (its presets' 16384 base channels at 256 px are ~30 M weights)
TINY_DFGAN = ["--dfgan.pretrain_images=16", "--dfgan.pretrain_steps=4"]  # (the text encoder's pre-training)


def readme_commands() -> list[str]:
    """The command lines of the README's indented code blocks, continuations joined, comments dropped."""
    commands, current, previous_blank, in_block = [], "", True, False
    for line in README.read_text().splitlines():
        in_block = line.startswith("    ") and (in_block or previous_blank)
        previous_blank = not line.strip()
        if not in_block:
            continue
        text = re.sub(r"\s+#\s.*$", "", line.strip())
        if current:
            current += " " + text.rstrip("\\").strip()
        elif text.startswith(STARTS):
            current = text.rstrip("\\").strip()
        if current and not text.endswith("\\"):
            commands.append(current)
            current = ""
    return commands


def _not_here(command: str):
    if re.search(r"\[--|\.\.\.", command):
        return "a synopsis ([--flag ...]), not a command"
    return next((why for prefix, why in NOT_HERE.items() if command.startswith(prefix)), None)


def _small(command: str, extractor: Path) -> list[str]:
    """Flags that make the command small, to append to it as written (the last value of a flag wins)."""
    argv = shlex.split(command)
    if "bigan/train.py" in argv or argv[1:3] == ["-m", "bigan.train"]:
        return TINY_TRAIN + ([f"--eval.extractor={extractor}", "--eval.metrics=fid", "--eval.every_kimg=0.008"]
                             if any(a.startswith("--eval.every_kimg") for a in argv) else []) + \
            (TINY_STYLEGAN2 if "stylegan2" in command else []) + (TINY_DFGAN if "text2image" in command else [])
    if "bigan.metrics.evaluate" in argv or argv[0].endswith("bigan-eval"):
        return ["--n", "16", "--batch", "8"] + (["--extractor", str(extractor), "--metrics", "fid"]
                                                if "--data" in argv else [])
    if argv[0].endswith("bigan-sample") and "--n" in argv:  # (with --interpolate: one row of its steps)
        return ["--n", argv[argv.index("--interpolate") + 1] if "--interpolate" in argv else "4"]
    if argv[0].endswith("bigan-shards") and "--workers" in argv:
        return ["--workers", "2"]  # this machine's cores: 8 processes for 8 images only start up
    if argv[0].endswith("bigan-demo-data") and "--folders" in argv:
        return ["--n", "16"]
    if argv[1:2] == ["bench/modes.py"]:
        return ["--kimg", "0.016", "--n", "256", "--samples", "64", "--glyphs", "256", "--channels", "4"]
    return []


@pytest.fixture
def user_dir(tmp_path, small_extractor):
    """A folder with what a checkout holds after `make`, and a HOME with paintings and a saved dataset."""
    from PIL import Image

    work = tmp_path / "checkout"
    work.mkdir()
    for name in ("bigan", "launch_configs", "bench", "slurm", "Makefile", "pyproject.toml"):
        (work / name).symlink_to(ROOT / name)
    (work / ".venv").symlink_to(Path(sys.executable).parent.parent)
    shutil.copy(small_extractor, work / "classifier.pt")  # a classifier file the user has (10 classes)
    home = tmp_path / "home"
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (300, 320, 3), dtype=np.uint8)) for _ in range(8)]
    (home / "paintings").mkdir(parents=True)
    for i, image in enumerate(images):
        image.save(home / "paintings" / f"{i}.png")
    import datasets

    datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(8)]}).save_to_disk(
        str(work / "my_saved_dataset"))
    return work, home


def test_every_readme_command_works_as_written(user_dir, small_extractor, env):
    work, home = user_dir
    commands = readme_commands()
    assert len(commands) >= 15, commands
    bare = [c for c in commands if c.startswith(("bigan-", "accelerate", "python", "tensorboard"))]
    assert not bare, f"README commands that fail in a fresh shell (no .venv/bin/): {bare}"
    user_env = {**env, "HOME": str(home), "BIGAN_CACHE": str(home / ".cache" / "bigan")}
    ran = []
    for command in commands:
        if _not_here(command):
            continue
        if "ckpt-000001234" in command:  # the README's example name: this run's first checkpoint
            first = sorted((work / "runs" / "demo" / "checkpoints").iterdir())[0]
            command = command.replace("runs/demo/checkpoints/ckpt-000001234", str(first.relative_to(work)))
        if command.startswith("make train"):  # the training line of the Makefile's recipe, as make prints it
            command = _make_recipe_line(command, "bigan/train.py", work)
        shell = ["bash", "-c", " ".join([command, *map(shlex.quote, _small(command, small_extractor))])]
        if command.startswith(".venv/bin/tensorboard"):
            _serves(shell, work, user_env)
        else:
            result = run(shell, user_env, cwd=work, check=False)
            assert result.returncode == 0, f"README command failed: {command}\n{result.stderr[-3000:]}"
        ran.append(command)
    assert len(ran) >= 12, ran
    assert (work / "runs" / "demo" / "export" / "generator.safetensors").exists()
    assert len(list((work / "translated").glob("*.png"))) == 16, "the pix2pix section's translation"
    assert json.loads((work / "metrics.json").read_text())["fid"] > 0


def _make_recipe_line(command: str, containing: str, cwd: Path) -> str:
    """The command of `make TARGET [VAR=...]` that contains `containing`, from `make -n` (nothing is run
    or installed)."""
    # without the make variables of a `make test ARGS=...` that runs this test (make hands them down)
    clean = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "ARGS")}
    printed = subprocess.run([*shlex.split(command), "-n"], cwd=cwd, capture_output=True, text=True,
                             check=True, env=clean).stdout
    commands = printed.replace("\\\n", " ").splitlines()
    matches = [c.strip() for c in commands if containing in c]
    assert len(matches) == 1, printed
    return matches[0]


def _serves(argv, cwd, env, timeout=120):
    """A server command: it must print its address; then it is stopped."""
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        deadline, seen = time.time() + timeout, ""
        while time.time() < deadline and "http://" not in seen:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                break
            seen += line
        assert "http://" in seen, f"{argv} did not start serving:\n{seen[-2000:]}"
    finally:
        kill_group(process.pid)
        process.wait()


def test_readme_commands_are_all_run_or_explained():
    """The parser finds the README's commands, and the ones not run here say why."""
    commands = readme_commands()
    assert any(c.startswith("make train") for c in commands) and any("bigan-sample" in c for c in commands)
    for command in commands:
        assert _not_here(command) or command.startswith("make train") or not command.startswith(("make", "sbatch")), \
            command


def test_readme_demo_paragraph_matches_the_preset():
    """The README's demo figures and its real-image grid are for what `make train` trains: the grid
    command draws at the preset's resolution, and the paragraph names its resolution, batch and length."""
    from bigan.config import load_config

    preset = load_config(ROOT / "launch_configs" / "experiments" / "demo.yaml")
    grid = [c for c in readme_commands() if c.startswith(".venv/bin/bigan-demo-data --grid docs/demo_real.png")]
    assert grid, "the README no longer shows how docs/demo_real.png is made"
    for command in grid:
        argv = shlex.split(command)
        resolution = int(argv[argv.index("--resolution") + 1]) if "--resolution" in argv else 64
        assert resolution == preset.data.resolution, command
    text = README.read_text()
    paragraph = text[text.index("`make train` runs `launch_configs/experiments/demo.yaml`"):].split("\n\n")[0]
    for figure in (f"{preset.data.resolution} px", f"batch {preset.train.batch_size}", f"{preset.train.kimg:g} kimg"):
        assert figure in paragraph, f"README's demo paragraph does not say {figure!r} (demo.yaml)"
