"""Fixed start-up and shut-down cost of a local run: where the seconds outside the rounds go.

    python benchmarks/startup.py [--runs 2] [--rounds 3] [--floor] [--variant RAY_worker_niceness=0 ...]

Runs the real CLI (`python -m ray_fedat.train`, digits, 2 workers, 3 rounds, a local Ray,
`--final-attack none`: the final attack is work, not start-up) in a child process whose
driver functions are wrapped with timers (parse_config, connect_ray, build_worker_plan, the
fit, ray.shutdown); the workers' own timestamps (their loop start, data ready, round starts
and ends) come from summary.json and metrics.jsonl. Prints one row per phase and the total
outside the rounds, which issue 24 wants at or under 6 s. With --variant, every run is
repeated with those environment variables set (interleaved: as-is, variant, as-is, ...), and
the last line compares the two (`--variant STARTUP_ALL_TRAIN_ACTORS=1` runs the plain
TorchTrainer, with the DatasetManager and placement-group cleaner actors and the autoscaler
request that launch.lean_trainer leaves out). With --floor, it also times Ray's own floor on the same
machine (ray.init, a TorchTrainer whose loop only reports once, shutdown, exit) and prints
ours over it last.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, sys, time
t_exec = time.time()
import ray
import ray_fedat.launch as L
import ray_fedat.train as T

marks = {"exec": t_exec, "imported": time.time()}

def timed(name, fn):
    def wrapper(*args, **kwargs):
        marks[name + "_start"] = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            marks[name + "_end"] = time.time()
    return wrapper

T.parse_config = timed("parse", T.parse_config)
L.prepare_data = timed("data", L.prepare_data)  # launch.describe_data calls it
T.connect_ray = timed("ray_start", T.connect_ray)
T.build_worker_plan = timed("payload", T.build_worker_plan)
T.fit_with_progress = timed("fit", T.fit_with_progress)
ray.shutdown = timed("shutdown", ray.shutdown)
if os.environ.get("STARTUP_ALL_TRAIN_ACTORS"):  # --variant STARTUP_ALL_TRAIN_ACTORS=1: Ray Train's every actor
    from ray.train.v2._internal.execution.scaling_policy import create_scaling_policy

    L.unused_callbacks = lambda *args: set()
    L.local_scaling_policy = create_scaling_policy  # Ray Train's own, with its autoscaler request
try:
    T.main(sys.argv[2:])
finally:
    marks["main_end"] = time.time()
    with open(sys.argv[1], "w") as f:
        json.dump(marks, f)
"""


def one_run(args, out: str, name: str, extra_env: dict) -> dict:
    marks_file = os.path.join(out, f"{name}.marks.json")
    argv = ["--dataset", "digits", "--workers", str(args.workers), "--rounds", str(args.rounds),
            "--final-attack", "none", "--storage-path", out, "--name", name]
    env = dict(os.environ, **extra_env, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    launched = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, marks_file, *argv], capture_output=True, text=True, env=env)
    exited = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"the CLI failed: {proc.stderr.strip().splitlines()[-3:]}")
    with open(marks_file) as f:
        m = json.load(f)
    with open(os.path.join(out, name, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, name, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    rank0 = summary["workers"][0]  # the metrics' round times are rank 0's too
    loop_start, data_ready = rank0["loop_started_at"], rank0["data_ready_at"]
    first_round, last_round_end = records[0]["started_at"], records[-1]["ended_at"]
    phases = [
        ("python + imports (torch, ray, ray_fedat)", m["imported"] - launched),
        ("parse_config (flags, defaults, validation)", m["parse_end"] - m["parse_start"]),
        ("driver checks before Ray (store, run directory)", m["ray_start_start"] - m["parse_end"]),
        ("Ray start (ray.init, local)", m["ray_start_end"] - m["ray_start_start"]),
        ("placement plan, node checks", m["data_start"] - m["ray_start_end"]),
        ("load + partition the data", m["data_end"] - m["data_start"]),
        ("storage plan, header lines", m["payload_start"] - m["data_end"]),
        ("ship data to the object store (ray.put)", m["payload_end"] - m["payload_start"]),
        ("trainer set-up before fit", m["fit_start"] - m["payload_end"]),
        ("worker group: controller, actors, torch import, gloo", loop_start - m["fit_start"]),
        ("workers fetch their shards (ray.get) + to device", data_ready - loop_start),
        ("model build, restore, until round 1 starts", first_round - data_ready),
        ("ROUNDS (not start-up)", last_round_end - first_round),
        ("after the last round until fit returns", m["fit_end"] - last_round_end),
        ("curves, final model, summary", m["shutdown_start"] - m["fit_end"]),
        ("ray.shutdown", m["shutdown_end"] - m["shutdown_start"]),
        ("process exit", exited - m["shutdown_end"]),
    ]
    return {"phases": phases, "total": exited - launched, "rounds": last_round_end - first_round}


FLOOR = r"""
import sys, time, tempfile
t0 = time.time()
import ray, ray.train, torch
from ray.train.torch import TorchTrainer
t1 = time.time()
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
t2 = time.time()
def loop(config):
    ray.train.report({"started": time.time()})
TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=int(sys.argv[1])),
             run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp())).fit()
t3 = time.time()
ray.shutdown()
t4 = time.time()
print(t0, t1, t2, t3, t4)
"""


def ray_floor(workers: int) -> list:
    """Ray's own floor on this machine: ray.init, a TorchTrainer whose loop only reports once
    (the same worker group: controller, worker actors, torch, gloo), ray.shutdown, exit."""
    env = dict(os.environ, RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0")  # as the CLI sets it for a local Ray
    launched = time.time()
    proc = subprocess.run([sys.executable, "-c", FLOOR, str(workers)], capture_output=True, text=True, env=env)
    exited = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"the bare TorchTrainer failed: {proc.stderr.strip().splitlines()[-3:]}")
    t0, t1, t2, t3, t4 = map(float, proc.stdout.split()[-5:])
    return [("python + imports (torch, ray.train)", t1 - launched), ("ray.init (local)", t2 - t1),
            ("TorchTrainer.fit of an empty loop", t3 - t2), ("ray.shutdown", t4 - t3), ("process exit", exited - t4),
            ("whole command", exited - launched)]


def print_table(title: str, results: list) -> float:
    print(title)
    for i, (label, _) in enumerate(results[0]["phases"]):
        values = "  ".join(f"{r['phases'][i][1]:6.2f}" for r in results)
        print(f"  {label:<55} {values}")
    for r in results:
        outside = r["total"] - r["rounds"]
        print(f"whole command {r['total']:.2f} s, rounds {r['rounds']:.2f} s, outside the rounds {outside:.2f} s")
    return min(r["total"] - r["rounds"] for r in results)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--variant", nargs="*", default=[], metavar="NAME=VALUE",
                        help="environment variables for a second set of runs, e.g. RAY_worker_niceness=0")
    parser.add_argument("--floor", action="store_true",
                        help="also time Ray's floor: ray.init + a TorchTrainer whose loop only reports + shutdown")
    args = parser.parse_args()
    variant = dict(v.split("=", 1) for v in args.variant)
    out = tempfile.mkdtemp(prefix="startup_")
    results, varied = [], []
    for i in range(args.runs):
        results.append(one_run(args, out, f"run{i}", {}))
        if variant:
            varied.append(one_run(args, out, f"variant{i}", variant))
    title = f"digits, {args.workers} workers, {args.rounds} rounds, local Ray; seconds per phase, runs 1..{args.runs}"
    best = print_table(title + " (as is)" if variant else title, results)
    if variant:
        best_variant = print_table(f"the same with {' '.join(args.variant)}", varied)
        print(f"fixed cost outside the rounds (best of {args.runs}): as is {best:.2f} s, with "
              f"{' '.join(args.variant)} {best_variant:.2f} s (goal <= 8 s, issue 32)")
    else:
        print(f"fixed cost outside the rounds (best of {args.runs}): {best:.2f} s (goal <= 8 s, issue 32)")
    if args.floor:
        floors = [ray_floor(args.workers) for _ in range(args.runs)]
        print(f"Ray's floor: a bare TorchTrainer with {args.workers} workers whose loop only reports, same machine")
        for i, (label, _) in enumerate(floors[0]):
            print(f"  {label:<55} " + "  ".join(f"{f[i][1]:6.2f}" for f in floors))
        floor = min(f[-1][1] for f in floors)
        print(f"ours outside the rounds / Ray's floor (best of {args.runs} each): {best:.2f} s / {floor:.2f} s "
              f"= {best / floor:.2f}x")


if __name__ == "__main__":
    main()
