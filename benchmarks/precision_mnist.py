"""Robust accuracy on real MNIST, bf16 vs fp32 training forwards, at the same time budget.

    python benchmarks/precision_mnist.py [--budget 200]

The 8k/2k split of the real MNIST test set (../shared/data/mnist-t10k), our MNIST defaults,
2 workers x 1 client, --time-budget BUDGET, evaluated (always in fp32) with PGD-20, eps 0.3,
step 0.01 on the 2k test images; once with --precision fp32 and once with --precision bf16.
Prints rounds, natural and robust accuracy for both, and the robust-accuracy gap last.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import mnist_8k_2k_npz, run_cli  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=200.0, help="seconds per run")
    parser.add_argument("--out", default=None, help="where runs go (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="precision_mnist_")
    os.makedirs(out, exist_ok=True)
    data = mnist_8k_2k_npz(os.path.join(out, "mnist8k.npz"))
    common = ["--dataset", "npz", "--data-file", data, "--preset", "mnist", "--workers", "2", "--clients", "2",
              "--time-budget", str(args.budget), "--epsilon", "0.3", "--eval-step-size", "0.01", "--eval-steps", "20"]
    robust = {}
    with open(os.path.join(out, "log.txt"), "a") as log:
        for precision in ("fp32", "bf16"):
            s = run_cli(common + ["--precision", precision], out, precision, log)
            final = s["final"]
            robust[precision] = final["robust_acc"]
            print(f"{precision}: {s['rounds_completed']:>3} rounds in {s['cli_s']:5.0f} s   final natural "
                  f"{100 * final['natural_acc']:5.1f}%  PGD-20 {100 * final['robust_acc']:5.1f}%   "
                  f"(workers ran {s['workers'][0]['precision']})", flush=True)
    print(f"runs in {out}")
    print(f"robust accuracy bf16 - fp32 at the same budget: {100 * (robust['bf16'] - robust['fp32']):+.1f} points")


if __name__ == "__main__":
    main()
