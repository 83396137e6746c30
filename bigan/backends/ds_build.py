"""DeepSpeed's just-in-time op builds, made safe to wait for.

On the CPU, DeepSpeed JIT-builds its shared-memory communication op on first use, through
torch.utils.cpp_extension, into ``$TORCH_EXTENSIONS_DIR/<python>_cpu/deepspeed_shm_comm/``
guarded by a ``lock`` file. A build that is killed (Ctrl-C, a timeout, a preempted job)
leaves the lock behind, and every later launch then waits on it silently, forever. bigan:

* builds into a folder of this Python environment (``<sys.prefix>/torch_extensions``) unless
  ``TORCH_EXTENSIONS_DIR`` is set, so environments (and users sharing a home folder) do not
  wait on each other's builds;
* builds with this environment's ``ninja`` (DeepSpeed installs one beside Python), whether or
  not the environment is activated: ninja versions hash their commands differently, so a
  launch from an activated shell (a Slurm job) and one without (``.venv/bin/accelerate``)
  would otherwise each rebuild the op the other built, a minute or two every time;
* removes a lock whose build has shown no sign of life (no file in its folder changed) for
  ``STALE_S`` seconds, saying so: at start-up, so the op is built afresh, and while waiting on
  it, so the wait ends (that start then fails to load the op; the next one builds it);
* prints, every minute that start-up waits on a lock, what it waits for.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

OPS = ("deepspeed_shm_comm",)
STALE_S = 600  # a real build of the op takes 1-2 minutes on 2 cores and touches its files throughout


def prepare_builds() -> Path:
    """This environment's ninja first on PATH; the build folder (made this environment's unless set)."""
    tools = Path(sys.executable).parent
    path = os.environ.get("PATH", "").split(os.pathsep)
    if (tools / "ninja").is_file() and path[0] != str(tools):
        os.environ["PATH"] = os.pathsep.join([str(tools), *path])
    return extensions_dir()


def extensions_dir() -> Path:
    return Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")))


def build_dirs() -> list[Path]:
    from torch.utils.cpp_extension import _get_build_directory

    extensions_dir()
    return [Path(_get_build_directory(name, False)) for name in OPS]


def last_activity(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.rglob("*") if p.exists()), default=0.0)


def clear_stale_locks(stale_s: float = STALE_S, now: float | None = None) -> list[Path]:
    """Remove the lock of every op build that has been idle for stale_s seconds; returns those removed."""
    now = time.time() if now is None else now
    removed = []
    for folder in build_dirs():
        lock = folder / "lock"
        if lock.exists() and now - last_activity(folder) > stale_s:
            lock.unlink(missing_ok=True)
            removed.append(lock)
            print(f"bigan: removed a stale DeepSpeed build lock ({lock}; nothing in its folder changed for "
                  f"{stale_s / 60:.0f} min, so its build was killed)", flush=True)
    return removed


class LockWatch:
    """While active, says every `every_s` seconds which build lock start-up is waiting on."""

    def __init__(self, every_s: float = 60.0):
        self.every_s, self.done = every_s, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        waited = 0.0
        while not self.done.wait(self.every_s):
            waited += self.every_s
            if clear_stale_locks():  # this process waits on a dead build: it fails to load the op now,
                print("bigan: the op will be built afresh at the next start", flush=True)  # not never
                continue
            for folder in build_dirs():
                if (folder / "lock").exists():
                    print(f"bigan: start-up has waited {waited / 60:.0f} min on DeepSpeed's build lock "
                          f"{folder / 'lock'} (another process is building the op, or a killed build left it; "
                          f"bigan removes it after {STALE_S / 60:.0f} idle minutes)", flush=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
