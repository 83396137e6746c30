"""Several training runs in one process, one after the other, each through bigan.train.main (torch and
Accelerate imported once: seconds saved per run on a small CPU):

    python train_runs.py --run.dir=A ... -- --run.dir=B ... -- ...

Exits with the first non-zero exit code, else 0.
"""
import sys

from bigan.train import main

runs, current = [], []
for arg in sys.argv[1:] + ["--"]:
    if arg == "--":
        runs.append(current)
        current = []
    else:
        current.append(arg)
for args in runs:
    print(f"train_runs: {' '.join(args)}", flush=True)
    code = main(args)
    if code:
        sys.exit(code)
