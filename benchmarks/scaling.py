"""Scaling: the same 2-client federated job on 1 worker and on 2 workers (1 CPU each).

    python benchmarks/scaling.py [--rounds 4] [--variant NAME=VALUE ...]

With 1 worker the two clients train one after the other; with 2 workers they train at the
same time and evaluation is sharded. The speed-up is the ratio of the mean round time
(start of one round to the start of the next, so aggregation, evaluation and reporting
count too), skipping round 1 (warm-up). The article reports about 1.7x from 2 nodes. Our
CLI's defaults otherwise (`--precision auto`), without the final attack. With --variant,
the pair runs again with those environment variables set, e.g. Ray's worker niceness or
Ray Train's poll interval, and both speed-ups are printed.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import mnist_subset_npz, read_metrics, round_cycles, run_cli  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--variant", nargs="*", default=[], metavar="NAME=VALUE",
                        help="environment variables for a second pair of runs")
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="scaling_")
    data = mnist_subset_npz(os.path.join(out, "data.npz"), args.train_images, 400)
    job = ["--dataset", "npz", "--data-file", data, "--preset", "mnist", "--clients", "2", "--cpus-per-worker", "1",
           "--rounds", str(args.rounds), "--attack-steps", "10", "--eval-steps", "10", "--eps-warmup-rounds", "0",
           # pinned to the settings behind the numbers in benchmarks/README.md
           "--step-size", "0.01", "--batch-size", "128", "--attack-start", "gaussian", "--final-attack", "none"]
    speedups = {"as is": speedup(job, out, "", {})}
    if args.variant:
        label = " ".join(args.variant)
        speedups[label] = speedup(job, out, "variant-", dict(v.split("=", 1) for v in args.variant))
    print("speed-up from 2 workers (round time, 1 worker / 2 workers): "
          + ", ".join(f"{label} {value:.2f}x" for label, value in speedups.items()))


def speedup(job, out, prefix, env) -> float:
    cycle = {}
    saved = dict(os.environ)
    os.environ.update(env)  # the CLI's child process inherits them
    try:
        for workers in (1, 2):
            name = f"{prefix}w{workers}"
            run_cli(job + ["--workers", str(workers)], out, name)
            records = read_metrics(os.path.join(out, name))
            cycles = round_cycles(records)[1:]  # skip round 1's warm-up
            cycle[workers] = sum(cycles) / len(cycles)
            train = sum(r["train_s"] for r in records[1:]) / len(records[1:])
            print(f"{' '.join(f'{k}={v}' for k, v in env.items()) or 'as is'}: {workers} worker(s): round "
                  f"{cycle[workers]:6.2f} s (train {train:6.2f} s) over rounds 2..{len(records)}", flush=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return cycle[1] / cycle[2]


if __name__ == "__main__":
    main()
