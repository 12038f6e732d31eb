"""Scaling: the same 2-client federated job on 1 worker and on 2 workers (1 CPU each).

    python benchmarks/scaling.py [--rounds 4] [--ceiling] [--variant NAME=VALUE ...]

With 1 worker the two clients train one after the other; with 2 workers they train at the
same time and evaluation is sharded. The speed-up is the ratio of the mean round time
(start of one round to the start of the next, so aggregation, evaluation and reporting
count too), and of the training phase alone, skipping round 1 (warm-up). The article
reports about 1.7x from 2 nodes. Our CLI's defaults otherwise (`--precision auto`), without
the final attack. With --variant, the pair runs again with those environment variables
set, e.g. Ray's worker niceness or Ray Train's poll interval, and both speed-ups are
printed. With --ceiling, it first measures what two cores give this work on this machine
without Ray: one client's local training in one process, then in two processes at once
(the upper bound of any 2-worker speed-up here).
"""
import argparse
import multiprocessing
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import mnist_subset_npz, read_metrics, round_cycles, run_cli  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--variant", nargs="*", default=[], metavar="NAME=VALUE",
                        help="environment variables for a second pair of runs")
    parser.add_argument("--ceiling", action="store_true",
                        help="first measure 1 vs 2 concurrent processes of local training, without Ray")
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="scaling_")
    data = mnist_subset_npz(os.path.join(out, "data.npz"), args.train_images, 400)
    if args.ceiling:
        ceiling(data, args.train_images // 2)
    job = ["--dataset", "npz", "--data-file", data, "--preset", "mnist", "--clients", "2", "--cpus-per-worker", "1",
           "--rounds", str(args.rounds), "--attack-steps", "10", "--eval-steps", "10", "--eps-warmup-rounds", "0",
           # pinned to the settings behind the numbers in benchmarks/README.md
           "--step-size", "0.01", "--batch-size", "128", "--attack-start", "gaussian", "--final-attack", "none"]
    speedups = {"as is": speedup(job, out, "", {})}
    if args.variant:
        label = " ".join(args.variant)
        speedups[label] = speedup(job, out, "variant-", dict(v.split("=", 1) for v in args.variant))
    print("speed-up from 2 workers, 1 worker / 2 workers, round time (training): "
          + ", ".join(f"{label} {rounds:.2f}x ({train:.2f}x)" for label, (rounds, train) in speedups.items())
          + " (goal: training >= 1.9x, issue 32)")


def local_training(data: str, images: int, queue) -> None:
    """One client's local epoch as a worker runs it (our MNIST defaults, --precision auto), one thread."""
    import numpy as np
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ray_fedat.client import ClientShard, LocalTrainingConfig, train_client
    from ray_fedat.federation import generator_for
    from ray_fedat.models import build_model
    from ray_fedat.precision import prepare_model, resolve_precision

    torch.set_num_threads(1)
    raw = np.load(data)
    x, y = torch.from_numpy(raw["x_train"][:images]).unsqueeze(1), torch.from_numpy(raw["y_train"][:images])
    precision = resolve_precision("auto", torch.device("cpu"))
    model = prepare_model(build_model("smallcnn", (1, 28, 28), 10), torch.device("cpu"), precision, True)
    cfg = LocalTrainingConfig("calfat", 1, 128, 0.04, 0.9, 2e-4, 0.3, 0.075, 5, 6.0, 0.1, False, precision=precision,
                              attack_start="uniform")
    shard = ClientShard(0, x, y, torch.bincount(y, minlength=10).float())
    started = time.perf_counter()
    train_client(model, shard, cfg, generator_for(0, 1, 0), torch.device("cpu"))
    queue.put(time.perf_counter() - started)


def ceiling(data: str, images: int) -> None:
    """Local training of one client alone, then two at once in separate processes."""
    ctx = multiprocessing.get_context("spawn")
    seconds = {}
    for n in (1, 2, 1, 2):  # interleaved, best of two each
        queue = ctx.Queue()
        procs = [ctx.Process(target=local_training, args=(data, images, queue)) for _ in range(n)]
        for p in procs:
            p.start()
        times = [queue.get() for _ in procs]
        for p in procs:
            p.join()
        seconds[n] = min(seconds.get(n, float("inf")), max(times))
    print(f"without Ray: one client's epoch ({images} images) takes {seconds[1]:.2f} s alone and "
          f"{seconds[2]:.2f} s with another running at once: two cores give this work at most "
          f"{2 * seconds[1] / seconds[2]:.2f}x", flush=True)


def speedup(job, out, prefix, env) -> tuple:
    """(round-time speed-up, training-time speed-up) of 2 workers over 1."""
    cycle, training = {}, {}
    saved = dict(os.environ)
    os.environ.update(env)  # the CLI's child process inherits them
    try:
        for workers in (1, 2):
            name = f"{prefix}w{workers}"
            run_cli(job + ["--workers", str(workers)], out, name)
            records = read_metrics(os.path.join(out, name))
            cycles = round_cycles(records)[1:]  # skip round 1's warm-up
            cycle[workers] = sum(cycles) / len(cycles)
            train = training[workers] = sum(r["train_s"] for r in records[1:]) / len(records[1:])
            print(f"{' '.join(f'{k}={v}' for k, v in env.items()) or 'as is'}: {workers} worker(s): round "
                  f"{cycle[workers]:6.2f} s (train {train:6.2f} s) over rounds 2..{len(records)}", flush=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return cycle[1] / cycle[2], training[1] / training[2]


if __name__ == "__main__":
    main()
