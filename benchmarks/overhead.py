"""Framework overhead per round: time that is not local training, aggregation or evaluation.

    python benchmarks/overhead.py [--rounds 5]

Runs the same MNIST-configuration job (CalFAT, eps 0.3, 40 attack steps; a 2k-image
subset so it takes minutes) twice: with Ray Train's default controller poll
(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2) and with the 0.2 s the CLI sets. Overhead per round
= (start of round r+1 - start of round r) - (train + aggregate + eval of round r): the
report barrier, checkpoint upload, the callback writing the run directory. Prints the
overhead share of the round for both, ours last.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import mnist_subset_npz, read_metrics, round_cycles, run_cli  # noqa: E402


def overhead(records):
    cycles = round_cycles(records)
    work = [r["train_s"] + r["aggregate_s"] + r["eval_s"] for r in records[: len(cycles)]]
    spent = [c - w for c, w in zip(cycles, work)]
    return sum(spent) / len(spent), sum(spent) / sum(cycles)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-images", type=int, default=2000)
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="overhead_")
    data = mnist_subset_npz(os.path.join(out, "data.npz"), args.train_images, 500)
    job = ["--dataset", "npz", "--data-file", data, "--preset", "mnist", "--workers", "2", "--clients", "2",
           "--rounds", str(args.rounds), "--eval-steps", "20"]
    shares = {}
    for label, interval in (("Ray default poll 2 s", "2"), ("ray_fedat poll 0.2 s", "0.2")):
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = interval
        name = f"poll{interval}"
        run_cli(job, out, name)
        records = read_metrics(os.path.join(out, name))
        per_round, share = overhead(records)
        mean_round = sum(round_cycles(records)) / (len(records) - 1)
        shares[label] = share
        print(f"{label:<22} round {mean_round:6.2f} s, overhead {per_round:5.2f} s/round = {100 * share:4.1f}%",
              flush=True)
    print(f"framework overhead share of a round (ray_fedat setting): {100 * shares['ray_fedat poll 0.2 s']:.2f}% "
          f"(goal <= 3%; Ray default: {100 * shares['Ray default poll 2 s']:.2f}%)")


if __name__ == "__main__":
    main()
