"""One rank of bigan.train that reports its own peak memory (what bench/text2image_scale.py launches):

    accelerate launch ... bench/rank_memory.py --report DIR [--cap-gib N] [bigan.train arguments]

Writes DIR/rank<RANK>.json: the exit code, the peak resident memory (ru_maxrss) when the run's first
checkpoint save began (with run.ckpt_every_kimg past train.kimg: the training steps' peak) and at the
end (checkpoint and export included), and the error if the run raised one. --cap-gib caps this
process's data segment (RLIMIT_DATA: heap and private mappings, where tensors live) before torch is
imported, so an allocation past it fails as it would on a machine with that much memory. --trace prints,
at each of the trainer's stages (built, every iteration, grids, checkpoint, export), this rank's resident
memory now and its peak so far ("bigan-memory: rank R STAGE: now N GiB, peak P GiB").
"""
import argparse
import json
import os
import resource
import sys
import traceback
from pathlib import Path

GIB = 2**30


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


def watch_first_save(marks: dict):
    """Note the peak when the trainer's first checkpoint save begins (the peak of the steps before it)."""
    from bigan.training.persistence import Persistence

    save = Persistence.save

    def noted_save(self, *args, **kwargs):
        marks.setdefault("train_peak_gib", round(peak_gib(), 3))
        return save(self, *args, **kwargs)

    Persistence.save = noted_save


def now_gib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def trace_stages(rank: int):
    """Print the resident memory after each of the trainer's stages (see --trace)."""
    from bigan import trainer
    from bigan.training import logs, persistence, steps

    def after(owner, method, stage):
        original = getattr(owner, method)

        def traced(*args, **kwargs):
            result = original(*args, **kwargs)
            print(f"bigan-memory: rank {rank} {stage}: now {now_gib():.3f} GiB, peak {peak_gib():.3f} GiB", flush=True)
            return result

        setattr(owner, method, traced)

    for owner, method, stage in ((trainer.Trainer, "__init__", "built"), (steps.Steps, "iteration", "iteration"),
                                 (logs.Logs, "images", "grids"), (persistence.Persistence, "save", "checkpoint"),
                                 (persistence.Persistence, "export", "export")):
        after(owner, method, stage)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, required=True, help="folder for rank<RANK>.json")
    parser.add_argument("--cap-gib", type=float, default=0.0, help="RLIMIT_DATA of this process (0 = none)")
    parser.add_argument("--trace", action="store_true", help="print the memory after each stage of the trainer")
    args, train_args = parser.parse_known_args()
    if args.cap_gib:
        cap = int(args.cap_gib * GIB)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bigan.train import main as train

    rank = int(os.environ.get("RANK", "0"))
    marks = {"rank": rank, "cap_gib": args.cap_gib}
    try:
        watch_first_save(marks)
        if args.trace:
            trace_stages(rank)
        marks["exit"] = train(train_args)
    except BaseException as exc:  # an allocation past the cap: a RuntimeError or MemoryError
        marks.update(exit=1, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        traceback.print_exc()
    marks["peak_gib"] = round(peak_gib(), 3)
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / f"rank{rank}.json").write_text(json.dumps(marks))
    return marks["exit"]


if __name__ == "__main__":
    sys.exit(main())
