"""slurm/train.sh against a real Slurm (Debian's 22.05, started by tests/slurm_cluster.sh).

Two node entries on one host ("node1", "node2", both 127.0.0.1) make the multi-node path real:
two machine ranks, two accelerate launches, one rendezvous. Jobs run on CPU with
launch_configs/accelerate/cpu_multi.yaml. Skipped without root or Slurm, unless
BIGAN_REQUIRE_SLURM is set (as .ci/run does), in which case that is a failure.
"""
import os
import shutil
import subprocess
import sys
import time

import pytest

from bigan import checkpoint
from conftest import ROOT, free_port, tiny_args

pytestmark = pytest.mark.xdist_group("slurm")  # one throwaway cluster, on one pytest worker


@pytest.fixture(scope="session")  # not module: pytest-xdist may run other modules' tests between these, and a
def slurm(tmp_path_factory, env):  # module fixture would then stop and start the cluster again on the same ports
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        message = "needs root and Debian's slurmctld, slurmd, slurm-client and munge (.ci/run installs them)"
        if os.environ.get("BIGAN_REQUIRE_SLURM"):
            pytest.fail(message)
        pytest.skip(message)
    state = tmp_path_factory.mktemp("slurm")
    # ports of this pytest worker's own: should xdist ever start a second cluster (seen once in a clean-clone
    # run: one Slurm test on another worker, "Address already in use"), the two must not collide
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    ports = {**os.environ, "SLURM_TEST_PORT": str(16817 + 10 * int(worker or 0))}
    start = subprocess.run(["bash", "tests/slurm_cluster.sh", "start", str(state)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120, env=ports)
    assert start.returncode == 0, start.stdout + start.stderr
    yield {**env, "SLURM_CONF": str(state / "slurm.conf")}
    subprocess.run(["bash", "tests/slurm_cluster.sh", "stop", str(state)], cwd=ROOT, timeout=60, env=ports)


SUBMITTED: list = []  # job ids, cancelled after each test whatever its outcome


@pytest.fixture(autouse=True)
def cancel_jobs(request):
    yield
    if not SUBMITTED:
        return
    slurm_env = request.getfixturevalue("slurm")
    subprocess.run(["scancel", *SUBMITTED], env=slurm_env, capture_output=True)
    deadline = time.time() + 60
    while any(state(slurm_env, job) for job in SUBMITTED) and time.time() < deadline:
        time.sleep(1)
    SUBMITTED.clear()


def sbatch(slurm_env, run_dir, nodes, procs_per_node, train_args, accelerate_config="cpu_multi"):
    knobs = {"ACCELERATE_CONFIG": f"launch_configs/accelerate/{accelerate_config}.yaml", "PROCS_PER_NODE": procs_per_node,
             "RUN_DIR": run_dir, "MAIN_PORT": free_port(), "BIGAN_ENV": f"{sys.prefix}/bin/activate"}
    export = "ALL," + ",".join(f"{k}={v}" for k, v in knobs.items())
    run_dir.mkdir(parents=True)  # Slurm does not create the --output file's folder
    cmd = ["sbatch", "--parsable", f"--nodes={nodes}", "--gres=none", f"--cpus-per-task={max(1, 2 // nodes)}",
           f"--output={run_dir}/job-%j.out", f"--export={export}", "slurm/train.sh", *train_args]
    submitted = subprocess.run(cmd, cwd=ROOT, env=slurm_env, capture_output=True, text=True, check=True)
    SUBMITTED.append(submitted.stdout.strip())
    return SUBMITTED[-1]


def state(slurm_env, job):
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=slurm_env, capture_output=True, text=True)
    return out.stdout.strip()


def wait(slurm_env, job, run_dir, timeout=300):
    """Until the job leaves the queue; fails after `timeout` seconds in which nothing in run_dir changed
    (logs, checkpoints), so a slow machine takes longer instead of failing."""
    last, progress_at = None, time.time()
    while state(slurm_env, job):
        files = list(run_dir.rglob("*"))
        now = (len(files), sum(p.stat().st_size for p in files if p.is_file()))
        if now != last:
            last, progress_at = now, time.time()
        assert time.time() - progress_at < timeout, f"job {job} still {state(slurm_env, job)}, no progress for {timeout} s"
        time.sleep(1)


def node_logs(run_dir):
    return {p.name: p.read_text() for p in sorted((run_dir / "slurm-logs").glob("*.log"))}


def test_sbatch_runs_two_process_training_to_completion(slurm, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    job = sbatch(slurm, run_dir, nodes=1, procs_per_node=2,
                 train_args=tiny_args(tiny_shards, run_dir, **{"train.kimg": 0.064, "data.workers": 1}))
    wait(slurm, job, run_dir)
    batch_log = (run_dir / f"job-{job}.out").read_text()
    assert "on 1 node(s) x 2 process(es)" in batch_log and "training exited with status 0" in batch_log
    (log,) = node_logs(run_dir).values()
    assert "rank 0/2" in log and "rank 1/2" in log and "done at" in log
    final = checkpoint.checkpoints(run_dir)[-1]
    assert final.name == "ckpt-000000004" and (final / "data_rank_1.json").exists()
    assert list((run_dir / "logs" / "tensorboard").glob("events.out.tfevents.*"))


def test_preempted_job_checkpoints_requeues_and_resumes_without_repeating_steps(slurm, tiny_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    # long enough (300 steps) that the stop, agreed every ~2 s, lands before the end
    args = tiny_args(tiny_shards, run_dir, **{"train.kimg": 4.8, "data.workers": 1, "run.log_every": 1,
                                               "run.image_every_kimg": 1})
    job = sbatch(slurm, run_dir, nodes=1, procs_per_node=2, train_args=args)
    deadline = time.time() + 300
    while not list((run_dir / "samples").glob("*.png")):  # training has started
        assert time.time() < deadline and state(slurm, job), "training did not start"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    wait(slurm, job, run_dir, timeout=400)

    batch_log = (run_dir / f"job-{job}.out").read_text()
    assert "USR1 received" in batch_log and f"requeueing job {job}" in batch_log
    assert "(restart 1)" in batch_log and "(restart 2)" not in batch_log, "requeued once, and not after finishing"
    (log,) = node_logs(run_dir).values()
    assert "stopped on request" in log and "resuming from" in log and "done at 4.8 kimg" in log
    stopped_at = int(log.split("resuming from")[1].split("ckpt-")[1][:9])
    assert 1 <= stopped_at < 300
    assert checkpoint.checkpoints(run_dir)[-1].name == "ckpt-000000300", "ends at the planned length"

    events = EventAccumulator(str(run_dir / "logs" / "tensorboard"), purge_orphaned_data=False)
    events.Reload()
    logged = [e.step for e in events.Scalars("Progress/kimg")]
    assert sorted(logged) == [16 * k for k in range(1, 301)], "every step logged once: none done twice, none lost"


@pytest.mark.parametrize("accelerate_config", ["cpu_multi", "deepspeed_zero2"])
def test_two_nodes_rendezvous_through_slurm(accelerate_config, slurm, tiny_shards, tmp_path):
    """Two machine ranks, plain DDP or DeepSpeed (Accelerate's 'standard' multi-node launcher)."""
    run_dir = tmp_path / "run"
    job = sbatch(slurm, run_dir, nodes=2, procs_per_node=1, accelerate_config=accelerate_config,
                 train_args=tiny_args(tiny_shards, run_dir, **{"train.kimg": 0.064, "data.workers": 1}))
    wait(slurm, job, run_dir)
    assert "on 2 node(s) x 1 process(es)" in (run_dir / f"job-{job}.out").read_text()
    logs = node_logs(run_dir)
    assert len(logs) == 2, logs.keys()
    node0, node1 = logs.values()
    assert "rank 0/2" in node0 and "rank 1/2" in node1 and "done at" in node0
    backend = "DeepSpeed engines: G ZeRO-2, D ZeRO-2" if accelerate_config.startswith("deepspeed") else "DDP over 2"
    assert backend in node0, node0
    final = checkpoint.checkpoints(run_dir)[-1]
    assert final.name == "ckpt-000000004"
    assert (final / "data_rank_0.json").exists() and (final / "data_rank_1.json").exists()
