"""Robust aggregation against Byzantine clients on real MNIST, the same time budget per rule.

    python benchmarks/byzantine_mnist.py [--budget 180] [--rules fedavg median ...]

The 8k/2k split of the real MNIST test set (../shared/data/mnist-t10k), 10 IID clients on
2 workers, 2 of them Byzantine with the sign-flip attack (they send global - 4 x their
update, see ray_fedat/byzantine.py), CalFAT with our MNIST defaults, --time-budget BUDGET
per run. One run per aggregation rule, plus FedAvg without Byzantine clients for
reference (run last). Evaluation: natural and PGD-20 (eps 0.3, step 0.01) on the first
--eval-samples (1000) of the 2k test images.

The rules' parameters: trimmed mean cuts 2 of 10 at each end (--trim-ratio 0.2, one cut per
Byzantine client); Krum and Multi-Krum tolerate f = 2; Bulyan needs K >= 4f + 3, so with 10
clients it runs with f = 1, fewer than the 2 attackers.
Takes about (number of rules + 1) x BUDGET seconds.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MNIST_DIR, mnist_8k_2k_npz, run_cli  # noqa: E402

RULES = {
    "fedavg": ["--aggregator", "fedavg"],
    "median": ["--aggregator", "median"],
    "trimmed-mean": ["--aggregator", "trimmed-mean", "--trim-ratio", "0.2"],
    "krum": ["--aggregator", "krum", "--aggregator-f", "2"],
    "multi-krum": ["--aggregator", "multi-krum", "--aggregator-f", "2"],
    "bulyan": ["--aggregator", "bulyan", "--aggregator-f", "1"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=180.0, help="seconds per run")
    parser.add_argument("--eval-samples", type=int, default=1000, help="test images evaluated (of 2000)")
    parser.add_argument("--rules", nargs="*", default=["fedavg", "median", "trimmed-mean", "krum", "bulyan"],
                        choices=list(RULES))
    parser.add_argument("--no-reference", action="store_true", help="skip FedAvg without Byzantine clients")
    parser.add_argument("--out", default=None, help="where runs go (default: a temp dir)")
    parser.add_argument("--mnist-dir", default=MNIST_DIR, help="folder with t10k-images/labels-idx*-ubyte.gz")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="byzantine_mnist_")
    os.makedirs(out, exist_ok=True)
    data = mnist_8k_2k_npz(os.path.join(out, "mnist8k.npz"), args.mnist_dir)
    common = ["--dataset", "npz", "--data-file", data, "--preset", "mnist", "--workers", "2", "--clients", "10",
              "--method", "calfat", "--time-budget", str(args.budget), "--epsilon", "0.3",
              "--eval-step-size", "0.01", "--eval-steps", "20", "--eval-samples", str(args.eval_samples)]
    attack = ["--byzantine", "2", "--byzantine-attack", "sign-flip"]
    runs = [(rule, RULES[rule] + attack) for rule in args.rules]
    if not args.no_reference:
        runs.append(("fedavg, no Byzantine clients", RULES["fedavg"]))
    rows = []
    print(f"{'rule (2 of 10 clients sign-flip)':<34} {'rounds':>6} {'natural':>8} {'PGD-20':>7}", flush=True)
    with open(os.path.join(out, "log.txt"), "a") as log:
        for i, (label, extra) in enumerate(runs):
            s = run_cli(common + extra, out, f"run{i}-{label.split(',')[0]}", log)
            final = s["final"]
            rows.append((label, s["rounds_completed"], final["natural_acc"], final["robust_acc"], s.get("byzantine")))
            print(f"{label:<34} {s['rounds_completed']:>6} {100 * final['natural_acc']:7.1f}% "
                  f"{100 * final['robust_acc']:6.1f}%   (Byzantine: {s.get('byzantine')})", flush=True)
    print(f"runs in {out}")
    by = {r[0]: r for r in rows}
    if "fedavg" in by:
        best = max((r for r in rows if r[0] not in ("fedavg", "fedavg, no Byzantine clients")),
                   key=lambda r: r[3], default=None)
        if best is not None:
            print(f"PGD-20 accuracy under attack, best robust rule ({best[0]}) / FedAvg: "
                  f"{100 * best[3]:.1f}% / {100 * by['fedavg'][3]:.1f}%")


if __name__ == "__main__":
    main()
