"""Keep a long sweep's finished runs in the repository, so that a table of many hours can be
built over several machines.

Our own benchmark machines start empty: `runs/` (git-ignored) does not outlive them. A finished
run's table entry needs only its summary.json, so `save` copies, for each run that ended
(finished or failed), its summary.json and metrics.jsonl into benchmarks/results/<sweep>/<run>/,
with the CPU it ran on, plus the sweep's table. `restore` puts them back into a new machine's
sweep directory before the same sweep command resumes: the sweep then counts them as finished
(sweep.run_state reads summary.json) and runs only the rest. Checkpoints are not kept: a
restored run has its numbers, not its models.

    python benchmarks/keep_results.py restore runs/mnist-methods-dirichlet   # before the sweep
    python -m ray_fedat.sweep grids/mnist-methods-dirichlet.yaml
    python benchmarks/keep_results.py save runs/mnist-methods-dirichlet      # as runs finish
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_fedat.precision import CPU_NATIVE_BF16_FLAGS, cpu_flags, cpu_model_name, read_cpuinfo  # noqa: E402
from ray_fedat.sweep import run_state  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RUN_FILES = ("summary.json", "metrics.jsonl")
TABLE_FILES = ("table.md", "table.csv")
MACHINE_FILE = "machine.json"


def this_machine() -> dict:
    """The CPU a run is saved from: its model name and the flags that decide its arithmetic."""
    text = read_cpuinfo() or ""
    flags = cpu_flags(text) or set()
    wanted = ("avx2", "avx512f", *CPU_NATIVE_BF16_FLAGS)
    return {"cpu": cpu_model_name(text), "flags": [f for f in wanted if f in flags], "cores": os.cpu_count()}


def ended(run_dir: str) -> bool:
    return run_state(run_dir)[0] in ("finished", "failed")


def save(sweep_dir: str, results_root: str = RESULTS) -> list:
    """Copy the sweep's ended runs that are not kept yet; returns their names."""
    target = os.path.join(results_root, os.path.basename(os.path.normpath(sweep_dir)))
    os.makedirs(target, exist_ok=True)
    for name in ("sweep.json", *TABLE_FILES):
        if os.path.isfile(os.path.join(sweep_dir, name)):
            shutil.copy2(os.path.join(sweep_dir, name), os.path.join(target, name))
    saved = []
    for run in sorted(os.listdir(sweep_dir)):
        run_dir, kept = os.path.join(sweep_dir, run), os.path.join(target, run)
        if not ended(run_dir) or os.path.isfile(os.path.join(kept, "summary.json")):
            continue  # running, or kept already (a restored run keeps the machine it ran on)
        os.makedirs(kept, exist_ok=True)
        for name in RUN_FILES:
            if os.path.isfile(os.path.join(run_dir, name)):
                shutil.copy2(os.path.join(run_dir, name), os.path.join(kept, name))
        with open(os.path.join(kept, MACHINE_FILE), "w") as f:
            json.dump(this_machine(), f, indent=1)
        saved.append(run)
    return saved


def restore(sweep_dir: str, results_root: str = RESULTS) -> list:
    """Put kept runs back where the sweep directory has nothing of them; returns their names."""
    source = os.path.join(results_root, os.path.basename(os.path.normpath(sweep_dir)))
    if not os.path.isdir(source):
        raise SystemExit(f"keep_results: nothing kept for {sweep_dir} (no {source})")
    restored = []
    for run in sorted(os.listdir(source)):
        kept, run_dir = os.path.join(source, run), os.path.join(sweep_dir, run)
        if not os.path.isfile(os.path.join(kept, "summary.json")) or os.path.exists(run_dir):
            continue  # a table file, or a run this machine has (finished or in progress): never overwritten
        shutil.copytree(kept, run_dir)
        restored.append(run)
    return restored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("save", "restore"))
    parser.add_argument("sweep_dir", help="the sweep's directory, e.g. runs/mnist-methods-dirichlet")
    args = parser.parse_args()
    if args.action == "save":
        if not os.path.isdir(args.sweep_dir):
            raise SystemExit(f"keep_results: {args.sweep_dir} is not a directory")
        names = save(args.sweep_dir)
        print(f"kept {len(names)} new run(s): {', '.join(names) or '-'}")
    else:
        names = restore(args.sweep_dir)
        print(f"restored {len(names)} run(s): {', '.join(names) or '-'}")


if __name__ == "__main__":
    main()
