"""Helpers shared by the benchmark scripts: real MNIST from the project's shared data, and
running the training CLI as a user would."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ../shared next to the checkout; a git worktree one level deeper (e.g. /work/wt/NAME) finds it two up.
MNIST_DIR = next((d for d in (os.path.join(REPO, "..", "shared", "data", "mnist-t10k"),
                              os.path.join(REPO, "..", "..", "shared", "data", "mnist-t10k")) if os.path.isdir(d)),
                 os.path.join(REPO, "..", "shared", "data", "mnist-t10k"))


def mnist_8k_2k_npz(path: str, mnist_dir: str = MNIST_DIR) -> str:
    """An .npz with an 8k-train / 2k-test split (seed 0) of the real MNIST test set."""
    from ray_fedat.data import read_idx_gz

    images = read_idx_gz(os.path.join(mnist_dir, "t10k-images-idx3-ubyte.gz"))
    labels = read_idx_gz(os.path.join(mnist_dir, "t10k-labels-idx1-ubyte.gz")).astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    train, test = order[:8000], order[8000:]
    np.savez(path, x_train=images[train], y_train=labels[train], x_test=images[test], y_test=labels[test])
    return path


def run_cli(args, storage: str, name: str, log=None) -> dict:
    """Run `python -m ray_fedat.train ARGS` and return its summary.json (plus `cli_s`)."""
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "ray_fedat.train", *args, "--storage-path", storage,
                           "--name", name], capture_output=True, text=True)
    if log:
        log.write(proc.stdout + proc.stderr)
        log.flush()
    if proc.returncode != 0:
        raise SystemExit(f"{name}: the CLI failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    with open(os.path.join(storage, name, "summary.json")) as f:
        summary = json.load(f)
    summary["cli_s"] = time.time() - started
    return summary


def mnist_subset_npz(path: str, train: int, test: int) -> str:
    """A smaller split of real MNIST (first `train` + next `test` of a seeded order), for
    benchmarks that must finish in minutes; falls back to digits where MNIST is absent."""
    images_path = os.path.join(MNIST_DIR, "t10k-images-idx3-ubyte.gz")
    if os.path.exists(images_path):
        from ray_fedat.data import read_idx_gz

        images = read_idx_gz(images_path)
        labels = read_idx_gz(os.path.join(MNIST_DIR, "t10k-labels-idx1-ubyte.gz")).astype(np.int64)
    else:
        from ray_fedat.data import load_digits

        d = load_digits()
        images, labels = d.x_train[:, 0].numpy(), d.y_train.numpy()
    order = np.random.default_rng(0).permutation(len(labels))
    tr, te = order[:train], order[train:train + test]
    np.savez(path, x_train=images[tr], y_train=labels[tr], x_test=images[te], y_test=labels[te])
    return path


def read_metrics(run_dir: str) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def round_cycles(records: list) -> list:
    """Wall time from the start of each round to the start of the next (the last round has none)."""
    return [b["started_at"] - a["started_at"] for a, b in zip(records, records[1:])]


if __name__ == "__main__":  # python benchmarks/common.py PATH.npz: the 8k/2k split, for a sweep's grid file
    target = sys.argv[1] if len(sys.argv) > 1 else "runs/mnist8k.npz"
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    print(mnist_8k_2k_npz(target))
