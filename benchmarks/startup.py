"""Fixed start-up and shut-down cost of a local run: where the seconds outside the rounds go.

    python benchmarks/startup.py [--runs 2] [--rounds 3]

Runs the real CLI (`python -m ray_fedat.train`, digits, 2 workers, 3 rounds, a local Ray)
in a child process whose driver functions are wrapped with timers (connect_ray,
build_payload, the fit, ray.shutdown); the workers' own timestamps (their loop start, data
ready, round starts and ends) come from summary.json and metrics.jsonl. Prints one row per
phase and the total outside the rounds, which the issue wants at or under 8 s.
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
import json, sys, time
t_exec = time.time()
import ray
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

T.prepare_data = timed("data", T.prepare_data)
T.connect_ray = timed("ray_start", T.connect_ray)
T.build_payload = timed("payload", T.build_payload)
T.fit_with_progress = timed("fit", T.fit_with_progress)
ray.shutdown = timed("shutdown", ray.shutdown)
try:
    T.main(sys.argv[2:])
finally:
    marks["main_end"] = time.time()
    with open(sys.argv[1], "w") as f:
        json.dump(marks, f)
"""


def one_run(args, out: str, name: str) -> dict:
    marks_file = os.path.join(out, f"{name}.marks.json")
    argv = ["--dataset", "digits", "--workers", str(args.workers), "--rounds", str(args.rounds),
            "--storage-path", out, "--name", name]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
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
        ("python + imports (torch, ray, ray_fedat)", m["exec"] - launched + m["imported"] - m["exec"]),
        ("load + partition the data", m["data_end"] - m["data_start"]),
        ("other driver work before Ray", m["ray_start_start"] - m["data_end"]),
        ("Ray start (ray.init, local)", m["ray_start_end"] - m["ray_start_start"]),
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="startup_")
    results = [one_run(args, out, f"run{i}") for i in range(args.runs)]
    print(f"digits, {args.workers} workers, {args.rounds} rounds, local Ray; seconds per phase, runs 1..{args.runs}")
    for i, (label, _) in enumerate(results[0]["phases"]):
        values = "  ".join(f"{r['phases'][i][1]:6.2f}" for r in results)
        print(f"  {label:<55} {values}")
    for r in results:
        outside = r["total"] - r["rounds"]
        print(f"whole command {r['total']:.2f} s, rounds {r['rounds']:.2f} s, outside the rounds {outside:.2f} s")
    best = min(r["total"] - r["rounds"] for r in results)
    print(f"fixed cost outside the rounds (best of {args.runs}): {best:.2f} s (goal <= 8 s)")


if __name__ == "__main__":
    main()
