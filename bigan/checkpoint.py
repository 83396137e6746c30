"""Complete checkpoints: written by every rank under a temporary name, renamed when whole.

    RUN/checkpoints/ckpt-000001234/   (step number)
        model.safetensors, model_1.safetensors, optimizer*.bin   G, D, both optimizers (Accelerate)
        G/, D/                                                    instead, with DeepSpeed: each engine's ZeRO state
        random_states_R.pkl                                      python/numpy/torch/CUDA RNG per rank
        custom_checkpoint_*.pkl                                  trainer counters, scalers, EMA
        data_rank_R.json                                         stream position per rank

A kill at any moment leaves either the previous complete checkpoints or a ``.tmp-*`` folder
that ``latest`` ignores and the next save removes.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from safetensors.torch import save_file

_NAME = re.compile(r"^ckpt-(\d{9})$")


class CheckpointError(Exception):
    pass


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _NAME.match(p.name) and p.is_dir()), key=lambda p: p.name)


def resolve(run_dir: Path, spec: str) -> Path | None:
    """'' -> None (fresh start), 'latest' -> newest complete checkpoint or None, else the given path."""
    if not spec:
        return None
    if spec == "latest":
        found = checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / "random_states_0.pkl").exists():
        raise CheckpointError(f"run.resume: {path} is not a bigan checkpoint (no random_states_0.pkl)")
    return path


def save(accelerator, run_dir: Path, step: int, limit: int, data_state: dict, backend=None,
         architecture: dict | None = None) -> Path:
    """Every rank calls this (Accelerate has barriers inside save_state). `architecture` (model
    settings and resolution) is kept beside the weights, so a resume can say what changed."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"ckpt-{step:09d}"
    tmp = root / f".tmp-ckpt-{step:09d}"
    from bigan.training.ranks import on_rank_zero

    if on_rank_zero(accelerator, final.exists):  # (saved already: the last step's checkpoint at exit)
        return final
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if backend is not None:
            backend.save(tmp)  # DeepSpeed engines: G/ and D/ (every rank its partition)
        (tmp / f"data_rank_{accelerator.process_index}.json").write_text(json.dumps(data_state))
        if accelerator.is_main_process and architecture is not None:
            (tmp / "architecture.json").write_text(json.dumps(architecture, indent=1))
    except Exception as exc:  # a full disk surfaces as OSError or safetensors' own error
        shutil.rmtree(tmp, ignore_errors=True)
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"could not write checkpoint {final} ({reason}); earlier checkpoints "
                              f"in {root} are intact") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp.rename(final)
        for old in checkpoints(run_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def data_layout(path: Path) -> dict:
    """How the stream was split when `path` was written (rank 0's position: processes, workers, batch
    size, mode), to tell an exact resume from one on another layout."""
    state = json.loads((Path(path) / "data_rank_0.json").read_text())
    return {k: state.get(k) for k in ("world_size", "workers", "batch_size", "mode")}


def load(accelerator, path: Path, backend=None, architecture: dict | None = None, data: bool = True) -> dict | None:
    """Restore everything save() wrote; returns this rank's data stream state (None with data=False:
    a resume on another layout, or a roll-back, which go on with a stream of their own). Refuses,
    naming the settings, a checkpoint whose model was built with other ones than `architecture`."""
    saved_file = Path(path) / "architecture.json"
    if architecture is not None and saved_file.exists():
        saved = json.loads(saved_file.read_text())
        changed = [f"{key}={saved[key]!r} (now {architecture.get(key)!r})" for key in sorted(saved)
                   if saved[key] != architecture.get(key)]
        if changed:
            raise CheckpointError(f"{path} was trained with " + ", ".join(changed)
                                  + "; resume with those settings or start a new run.dir")
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


def export_generator(out_dir: Path, g, g_ema, model_config: dict, meta: dict):
    """The final generator(s) as safetensors plus a JSON config that bigan-sample can rebuild them from."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, model in (("generator", g), ("generator_ema", g_ema)):
        if model is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(out_dir / f"{name}.safetensors"))
    (out_dir / "generator.json").write_text(json.dumps({"model": model_config, **meta}, indent=1))
