"""DF-GAN's peak memory per rank on 2 CPU ranks: DDP against ZeRO-2 and ZeRO-3 (issue 27, item 7).

    .venv/bin/python bench/text2image_scale.py [--config launch_configs/experiments/text2image-demo.yaml]
        [--cases ddp,zero2,zero3] [--ranks 2] [--cap-gib auto|N] [--out bench/text2image_scale.jsonl]
        [--work runs/text2image_scale] [--section.key=value ...]

Each case is a short run launched as users launch them (accelerate launch --config_file
launch_configs/accelerate/{cpu_multi,deepspeed_zero2,deepspeed_zero3}.yaml --num_processes 2), each
rank through bench/rank_memory.py, which reports its peak resident memory. zero3 is G on ZeRO-3 and
D on ZeRO-2 (MA-GP refuses D on ZeRO-3). Each case runs at two sizes that differ in G alone: MEDIUM
(G 52 M parameters at 32 px: ngf 160, depth 2) and BASELINE (ngf 16, G 1.5 M), batch 2 per rank, 10
iterations; the difference of their peaks over that of G's parameter counts is what each further G
parameter costs a rank (bytes per parameter), free of the start-up memory (torch, DeepSpeed, gloo).
Any --section.key=value changes both sizes.

--cap-gib runs zero3 and ddp once more at MEDIUM with every rank's data segment capped (RLIMIT_DATA)
at N GiB; "auto" takes the midpoint of their largest per-rank peaks just measured. Prints one JSON
line per run (appended to --out) and the tables at the end.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEDIUM = {"dfgan.text_encoder": "joint", "data.shards": "demo_captions", "data.demo_images": 200, "data.workers": 1, "data.shuffle_buffer": 16,
          "data.resolution": 32, "model.g_channels": 160, "model.d_channels": 32, "model.z_dim": 128,
          "dfgan.depth": 2, "dfgan.cond_dim": 256, "train.batch_size": 2, "train.kimg": 0.04,
          "run.progress": "false", "run.log_every": 5, "run.image_every_kimg": 1000, "run.ckpt_every_kimg": 1000}
BASELINE = {**MEDIUM, "model.g_channels": 16}
CASES = {  # name: (Accelerate launch config, extra training arguments)
    "ddp": ("cpu_multi.yaml", []),
    "zero2": ("deepspeed_zero2.yaml", []),
    "zero3": ("deepspeed_zero3.yaml", ["--train.deepspeed_d=launch_configs/deepspeed/zero2.json"]),
    "zero3_large": ("deepspeed_zero3.yaml", ["--train.deepspeed_g=launch_configs/deepspeed/zero3_large.json",
                                            "--train.deepspeed_d=launch_configs/deepspeed/zero2.json"]),
    # zero3_large with no whole copy of G on any rank: D's fakes through the partitioned G (the EMA is partitioned
    # on every ZeRO-3 case)
    "zero3_lean": ("deepspeed_zero3.yaml", ["--train.deepspeed_g=launch_configs/deepspeed/zero3_large.json",
                                           "--train.deepspeed_d=launch_configs/deepspeed/zero2.json",
                                           "--train.zero3_shadow=false"]),
}
TIMEOUT_S = 900  # a case that has not finished by then is killed and reported as such


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int):
    """SIGKILL pid and everything below it (torchrun starts each rank in a session of its own)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    for child in children:
        kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def parameter_counts(config_path, overrides: list[str]) -> dict:
    """Trainable parameters of each of the family's networks (G: DF-GAN's G; D: its D and the text encoder),
    built on the meta device from the resolved config."""
    import torch

    from bigan import families
    from bigan.config import load_config

    family = families.build(load_config(config_path, overrides))
    with torch.device("meta"):
        networks = family.networks()
    return {name: sum(p.numel() for p in net.module.parameters()) for name, net in networks.items()}


def launch(case: str, size: str, config_path, overrides: list[str], work: Path, cap_gib: float,
           ranks: int) -> dict:
    """One run of a case on `ranks` processes; its per-rank peaks, images/s and exit code."""
    launch_config, extra = CASES[case]
    tag = f"{case}-{size}" + (f"-cap{cap_gib:g}" if cap_gib else "")
    report, log = work / f"{tag}-report", work / f"{tag}.log"
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", f"launch_configs/accelerate/{launch_config}",
           "--num_processes", str(ranks), "--main_process_port", str(free_port()),
           "bench/rank_memory.py", "--report", str(report), f"--cap-gib={cap_gib}", "--trace",
           *(["--config", str(config_path)] if config_path else []), *overrides, *extra, f"--run.dir={work / tag}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = "timeout"
        finally:
            kill_tree(process.pid)
    reports = [json.loads(p.read_text()) for p in sorted(report.glob("rank*.json"))]
    return {"case": case, "size": size, "processes": ranks, "cap_gib": cap_gib, "exit": code,
            "wall_s": round(time.perf_counter() - start, 1), "training_s": training_seconds(log), "ranks": reports,
            "oom_in_log": out_of_memory(log), "log": str(log)}


def training_seconds(log: Path) -> float | None:
    """The trainer's closing line's "after N s of training" (the loop, its final checkpoint and export)."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("bigan: done at"):
            return float(line.split(" s of training")[0].rsplit(" ", 1)[1])
    return None


def out_of_memory(log: Path) -> str:
    """The log's first line saying an allocation failed, if any."""
    for line in log.read_text(errors="replace").splitlines():
        if any(s in line for s in ("can't allocate memory", "MemoryError", "std::bad_alloc", "Cannot allocate memory")):
            return line.strip()[:300]
    return ""


def largest_peak(row: dict) -> float:
    return max((r["peak_gib"] for r in row["ranks"]), default=float("nan"))


def bytes_per_g_parameter(rows: list[dict], counts: dict) -> dict:
    """{case: [each rank's]} (MEDIUM's steps peak - BASELINE's) / (MEDIUM's G - BASELINE's), in bytes."""
    found = {}
    uncapped = {(row["case"], row["size"]): row for row in rows if not row["cap_gib"]}
    added = counts["medium"]["g"] - counts["baseline"]["g"]
    for case in CASES:
        pair = uncapped.get((case, "medium")), uncapped.get((case, "baseline"))
        if all(row and len(row["ranks"]) == row["processes"] and all("train_peak_gib" in r for r in row["ranks"])
               for row in pair):
            found[case] = [round((m["train_peak_gib"] - b["train_peak_gib"]) * 2**30 / added, 1)
                           for m, b in zip(pair[0]["ranks"], pair[1]["ranks"])]
    return found


def table(rows: list[dict], counts: dict, images: int) -> str:
    sizes = ", ".join(f"{size}: G {c['g'] / 1e6:.1f} M, D {c['d'] / 1e6:.1f} M" for size, c in counts.items())
    lines = [f"Parameters ({sizes}; D with its text encoder)", "",
             "| case | size | ranks | RLIMIT_DATA per rank | exit "
             "| peak RSS per rank, GiB: steps / end (rank 0; 1; ...) | img/s | allocation failure |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        peaks = "; ".join(f"{r.get('train_peak_gib', '-')} / {r['peak_gib']}" for r in row["ranks"]) or "no report"
        cap = f"{row['cap_gib']:.2f} GiB" if row["cap_gib"] else "none"
        rate = f"{images / row['training_s']:.2f}" if row["training_s"] else "-"
        lines.append(f"| {row['case']} | {row['size']} | {row['processes']} | {cap} | {row['exit']} | {peaks} | {rate} "
                     f"| {row['oom_in_log'] or '-'} |")
    lines += ["", "| case | bytes per further G parameter, per rank (rank 0; 1; ...) |", "|---|---|"]
    lines += [f"| {case} | {'; '.join(map(str, per_rank))} |"
              for case, per_rank in bytes_per_g_parameter(rows, counts).items()]
    return "\n".join(lines)


def report(row: dict, counts: dict, out: Path | None) -> dict:
    """Print a run's JSON line (and append it to `out`)."""
    line = json.dumps({"date": time.strftime("%Y-%m-%d"), "parameters": counts, **row})
    print(line, flush=True)
    if out:
        with out.open("a") as f:
            f.write(line + "\n")
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="launch_configs/experiments/text2image-demo.yaml")
    parser.add_argument("--cases", default="ddp,zero2,zero3")
    parser.add_argument("--cap-gib", default="", help="'auto', a number of GiB, or '' for no capped runs")
    parser.add_argument("--ranks", type=int, default=2, help="processes per run")
    parser.add_argument("--sizes", default="medium,baseline", help="which sizes run uncapped (bytes per parameter "
                                                                   "need both)")
    parser.add_argument("--out", type=Path, default=None, help="JSON lines file to append to")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "text2image_scale",
                        help="run folders, per-rank reports and logs (emptied first)")
    args, extra = parser.parse_known_args()
    sizes = {name: [f"--{k}={v}" for k, v in size.items()] + extra
             for name, size in (("medium", MEDIUM), ("baseline", BASELINE))}
    counts = {name: parameter_counts(args.config, overrides) for name, overrides in sizes.items()}
    print(json.dumps({"parameters": counts}), flush=True)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)

    def run(case, size, cap=0.0):
        return report(launch(case, size, args.config, sizes[size], args.work, cap, args.ranks), counts, args.out)

    cases = args.cases.split(",")
    rows = [run(case, size) for case in cases for size in args.sizes.split(",") if size]
    if args.cap_gib:  # the first two cases under one cap (auto: halfway between their medium peaks)
        peaks = {row["case"]: largest_peak(row) for row in rows if row["size"] == "medium"}
        cap = sum(peaks[c] for c in cases[:2]) / 2 if args.cap_gib == "auto" else float(args.cap_gib)
        rows += [run(case, "medium", round(cap, 2)) for case in cases[:2]]
    from bigan.config import load_config

    print(table(rows, counts, round(load_config(args.config, sizes["medium"]).train.kimg * 1000)))


if __name__ == "__main__":
    main()
