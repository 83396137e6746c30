"""Complete checkpoints: written by every rank under a temporary name, renamed when whole.

    RUN/checkpoints/ckpt-000001234/   (step number)
        model.safetensors, model_1.safetensors, optimizer*.bin   G, D, both optimizers (Accelerate)
        G/, D/                                                    instead, with DeepSpeed: each engine's ZeRO state
        random_states_R.pkl                                      python/numpy/torch/CUDA RNG per rank
        custom_checkpoint_*.pkl                                  trainer counters, scalers, EMA (named in checkpoint.json)
        data_rank_R.json                                         stream position per rank
        architecture.json                                        the settings the weights' shapes depend on
        checkpoint.json                                          written last: layout, ranks, every file, state names

A kill at any moment leaves either the previous complete checkpoints or a ``.tmp-*`` folder
that ``latest`` ignores and the next save removes. Before a checkpoint is loaded every file its
checkpoint.json lists must be there: ``latest`` skips one that is not (and says so), an explicit
path to one is refused naming the missing file. Checkpoints written before checkpoint.json
existed (layout 1) are checked against the files that layout always held.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from safetensors.torch import save_file

import bigan

_NAME = re.compile(r"^ckpt-(\d{9})$")
LAYOUT = 2
MANIFEST = "checkpoint.json"
LEGACY_STATES = ("train", "backend", "ema")  # layout 1: custom_checkpoint_0/1/2.pkl, in this order


class CheckpointError(Exception):
    pass


def checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run (complete or not), oldest first; in-progress .tmp-* ones are not listed."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _NAME.match(p.name) and p.is_dir()), key=lambda p: p.name)


def missing_files(path: Path) -> list[str]:
    """The files a checkpoint should hold and does not (empty: complete)."""
    path = Path(path)
    manifest = path / MANIFEST
    if manifest.exists():
        try:
            listed = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return [f"{MANIFEST} (unreadable)"]
        return [name for name in listed if not (path / name).exists()]
    return _missing_legacy(path)


def _missing_legacy(path: Path) -> list[str]:
    """Layout 1 (no checkpoint.json): what every such checkpoint held, for the processes that wrote it."""
    try:
        world = json.loads((path / "data_rank_0.json").read_text())["world_size"]
    except (OSError, ValueError, KeyError):
        return ["data_rank_0.json" if not (path / "data_rank_0.json").exists() else "data_rank_0.json (unreadable)"]
    expected = ["architecture.json", "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"]
    expected += [f"{kind}_{r}.{ext}" for r in range(world) for kind, ext in (("random_states", "pkl"), ("data_rank", "json"))]
    if not (path / "G").is_dir():  # plain (Accelerate) weights; DeepSpeed keeps its engines in G/ and D/
        expected += ["model.safetensors", "model_1.safetensors", "optimizer.bin", "optimizer_1.bin"]
    elif not (path / "D").is_dir():
        expected.append("D")
    return [name for name in expected if not (path / name).exists()]


def states(path: Path) -> dict:
    """Name -> file of the custom states (trainer counters, backend, EMA, ...) a checkpoint holds."""
    manifest = Path(path) / MANIFEST
    if manifest.exists():
        return json.loads(manifest.read_text())["states"]
    return {name: f"custom_checkpoint_{i}.pkl" for i, name in enumerate(LEGACY_STATES)}


def resolve(run_dir: Path, spec: str, flag: str = "run.resume") -> tuple[Path | None, list[str]]:
    """('' -> None (fresh start), 'latest' -> the newest complete checkpoint or None, else the given
    path, refused if incomplete), and a note per incomplete checkpoint 'latest' passed over."""
    if not spec:
        return None, []
    if spec == "latest":
        skipped = []
        for path in reversed(checkpoints(run_dir)):
            missing = missing_files(path)
            if not missing:
                return path, skipped
            skipped.append(f"{path} is incomplete ({_listed(missing)} missing): skipped")
        return None, skipped
    path = Path(spec)
    if not (path / MANIFEST).exists() and not (path / "data_rank_0.json").exists():
        raise CheckpointError(f"{flag}: {path} is not a bigan checkpoint (no {MANIFEST})")
    missing = missing_files(path)
    if missing:
        raise CheckpointError(f"{flag}: {path} is incomplete: {_listed(missing)} missing; resume from another "
                              f"checkpoint (run.resume=latest takes the newest complete one)")
    return path, []


def _listed(names: list[str]) -> str:
    return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")


def save(accelerator, run_dir: Path, step: int, limit: int, data_state: dict, backend=None,
         architecture: dict | None = None, states: dict | None = None, current: tuple = ()) -> Path:
    """Every rank calls this (Accelerate has barriers inside save_state). `architecture` (model
    settings and resolution) is kept beside the weights, so a resume can say what changed;
    `states` are the custom states by name, in the order they were registered with Accelerate.
    `current`: checkpoints that hold this very state (resumed from, or written since); another one of
    the same step (a later checkpoint of a history a resume from an earlier one left) is replaced.
    Those with a before_save (a partitioned EMA) gather theirs first, every rank, so that no collective runs
    inside save_state, where one rank's failure would leave the others waiting."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"ckpt-{step:09d}"
    tmp = root / f".tmp-ckpt-{step:09d}"
    from bigan.training.ranks import first_failure, gathered_lists, on_rank_zero

    if Path(final) in {Path(c) for c in current} and on_rank_zero(accelerator, final.exists):
        return final  # (saved already: the last step's checkpoint at exit)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    states = states or {}
    for state in states.values():
        if hasattr(state, "before_save"):
            state.before_save()

    def attempt(write) -> str | None:
        try:
            write()
        except Exception as exc:  # a full disk surfaces as OSError or safetensors' own error
            return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return None

    def rest():
        if backend is not None:
            backend.save(tmp)  # DeepSpeed engines: G/ and D/ (every rank its partition; DeepSpeed's barriers)
        (tmp / f"data_rank_{accelerator.process_index}.json").write_text(json.dumps(data_state))
        if accelerator.is_main_process and architecture is not None:
            (tmp / "architecture.json").write_text(json.dumps(architecture, indent=1))

    # (each first_failure is a collective: the ranks agree, none goes on into the engines' barriers or waits
    # for a rank that failed; save_state itself runs no collective, see `states`)
    failure = first_failure(accelerator, attempt(lambda: accelerator.save_state(str(tmp))))
    if failure is None:
        failure = first_failure(accelerator, attempt(rest))
    if failure is None:  # every rank's own files, by what each of them sees (a shared file system may lag)
        files = gathered_lists(accelerator, [p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()])
        if accelerator.is_main_process:  # last: a checkpoint without it was never finished
            try:
                _write_manifest(tmp, accelerator.num_processes, list(states), files)
            except Exception as exc:
                failure = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        failure = first_failure(accelerator, failure)
    if failure is not None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final} ({failure}); earlier checkpoints "
                              f"in {root} are intact")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # of another history: out of the way first, then gone
            replaced = root / f".old-{final.name}"
            final.rename(replaced)
            tmp.rename(final)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            tmp.rename(final)
        for old in checkpoints(run_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write_manifest(folder: Path, world: int, state_names, seen: list) -> None:
    """checkpoint.json: every file of the checkpoint (what any rank sees, and each rank's own files by
    name, which a lagging shared file system might not list yet) and the custom states' names."""
    per_rank = [f"{kind}_{r}.{ext}" for r in range(world) for kind, ext in (("random_states", "pkl"),
                                                                             ("data_rank", "json"))]
    files = sorted(set(seen) | {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
                   | set(per_rank))
    manifest = {"layout": LAYOUT, "bigan_version": bigan.__version__, "world_size": world, "files": files,
                "states": {name: f"custom_checkpoint_{i}.pkl" for i, name in enumerate(state_names)}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def data_layout(path: Path) -> dict:
    """How the stream was split when `path` was written (rank 0's position: processes, workers, batch
    size, mode), to tell an exact resume from one on another layout."""
    state = json.loads((Path(path) / "data_rank_0.json").read_text())
    return {k: state.get(k) for k in ("world_size", "workers", "batch_size", "mode")}


def load(accelerator, path: Path, backend=None, architecture: dict | None = None, data: bool = True,
         defaults: dict | None = None) -> dict | None:
    """Restore everything save() wrote; returns this rank's data stream state (None with data=False:
    a resume on another layout, or a roll-back, which go on with a stream of their own). Refuses,
    naming the settings, a checkpoint whose model was built with other ones than `architecture`
    (`defaults`: what keys newer than the checkpoint meant when its architecture.json lacks them)."""
    if architecture is not None:  # decided on rank 0 (refused on every rank alike)
        from bigan.training.ranks import on_rank_zero

        on_rank_zero(accelerator, lambda: _check_architecture(Path(path), architecture, defaults or {}))
    accelerator.load_state(str(path))
    if backend is not None:
        backend.load(path)
    if not data:
        return None
    data_file = Path(path) / f"data_rank_{accelerator.process_index}.json"
    if not data_file.exists():
        raise CheckpointError(f"{path} has no data position for rank {accelerator.process_index} "
                              f"(saved with fewer processes?)")
    return json.loads(data_file.read_text())


def _check_architecture(path: Path, architecture: dict, defaults: dict):
    saved_file = path / "architecture.json"
    if not saved_file.exists():
        return
    saved = {**defaults, **json.loads(saved_file.read_text())}
    changed = [f"{key}={saved[key]!r} (now {architecture.get(key)!r})" for key in sorted(saved)
               if saved[key] != architecture.get(key)]
    if changed:
        raise CheckpointError(f"{path} was trained with " + ", ".join(changed)
                              + "; resume with those settings or start a new run.dir")


def export_generator(out_dir: Path, g, g_ema, model_config: dict, meta: dict):
    """The final generator(s) as safetensors plus a JSON config that bigan-sample can rebuild them from."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, model in (("generator", g), ("generator_ema", g_ema)):
        if model is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(out_dir / f"{name}.safetensors"))
    (out_dir / "generator.json").write_text(json.dumps({"model": model_config, **meta}, indent=1))
