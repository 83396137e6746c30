"""Train a GAN: ``accelerate launch bigan/train.py [--config FILE] [--section.key=value ...]``.

Also ``python -m bigan.train``. With no arguments it trains a DCGAN on the built-in landscape
paintings at 64 px. ``--dry-run`` prints the resolved configuration and exits.
"""
import os
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, not the files beside this one
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bigan.cli import Parser  # noqa: E402
from bigan.config import ConfigError, check_files, load_config, peek  # noqa: E402


def make_accelerator(config):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    run_dir = Path(config.run.dir)
    cpu = not torch.cuda.is_available()
    handlers = []
    if cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Two CPU traps: without cpu=True Accelerate never wraps models in DDP (no gradient
        # all-reduce at all), and without gloo named explicitly ranks may each think they are rank 0.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs"))
    return Accelerator(cpu=cpu, log_with="tensorboard", project_config=project, kwargs_handlers=handlers)


def main(argv=None):
    parser = Parser(prog="bigan.train", description=__doc__.splitlines()[0],
                                     epilog="Any --section.key=value overrides the config (see --dry-run).")
    parser.add_argument("--config", help="YAML preset, e.g. launch_configs/experiments/demo.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    args, overrides = parser.parse_known_args(argv)
    try:
        run_dir, resume = peek(args.config, overrides, "run.dir", "run.resume")
        run_config = Path(str(run_dir)) / "config.yaml"
        if resume and run_config.exists():  # the run's own settings, the command line on top (not the preset's:
            # resumed as it ran), and where it is and what to resume from as the preset or the command line say
            config = load_config(run_config, [f"--run.dir={run_dir}", f"--run.resume={resume}", *overrides])
        else:
            config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"bigan: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(config.to_yaml(), end="")
        return 0
    from bigan.data.stream import DataError, resolve_shards
    from bigan.training.data import DEMO_SETS

    from bigan import families

    try:  # before anything is built or written into the run folder
        check_files(config)
        family = families.build(config)
        names = {}  # the class names each names, to compare
        for key, shards in (("data.shards", config.data.shards), ("eval.data", config.eval.data)):
            if shards and shards not in DEMO_SETS:  # (the built-in sets are rendered on first use)
                try:
                    shard_set = resolve_shards(shards)
                except DataError as exc:
                    raise ConfigError(f"{key}: {exc}") from None
                why = family.check_data(shard_set, key, shards)
                if why:
                    raise ConfigError(why)
                names[key] = shard_set.labels
        if config.model.num_classes and None not in (names.get("eval.data"), names.get("data.shards")) \
                and names["eval.data"] != names["data.shards"]:
            raise ConfigError(f"eval.data: its classes {names['eval.data'][:5]} are not data.shards' "
                              f"{names['data.shards'][:5]} (the same names in the same order)")
    except ConfigError as exc:
        print(f"bigan: error: {exc}", file=sys.stderr)
        return 2
    from bigan.backends.deepspeed import DeepSpeedConfigError
    from bigan.checkpoint import CheckpointError
    from bigan.metrics.features import ExtractorError
    from bigan.trainer import DivergedError, Trainer
    from bigan.training.ranks import RankFailure

    accelerator = make_accelerator(config)
    try:  # (RUN/config.yaml is written once resume checks, models and the stream stand: Trainer._start)
        Trainer(config, accelerator, family).fit()
        for sig in (signal.SIGINT, signal.SIGTERM):  # done and checkpointed: a late signal must not turn
            signal.signal(sig, signal.SIG_IGN)        # the clean exit that follows into a kill
    except (DataError, CheckpointError, ExtractorError, DeepSpeedConfigError, DivergedError, RankFailure) as exc:
        print(f"bigan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once (the first one stops with a checkpoint)
        print("bigan: interrupted; the last checkpoint is the one to resume from", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
