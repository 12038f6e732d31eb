"""The baselines a FAT paper compares against, at the same time budget on real MNIST.

    python benchmarks/methods_mnist.py [--budget 90] [--only pgd mart ...] [--out DIR]

The 8k/2k split of the real MNIST test set (../shared/data/mnist-t10k), 4 clients on a
Dirichlet(0.5) label split, 2 workers, --time-budget BUDGET per method, our MNIST defaults
otherwise (eps 0.3; training attack 3 steps of 0.1 from a uniform start; 10% of the
training images held out for choosing the best models). While training, each evaluation
uses 500 validation and 500 test images (PGD-20, step 0.01): a full one costs more than a
training round on this 2-core machine. Every final model is then scored the same way on
the first 1000 test images by --final-attack pgd-100: natural accuracy, PGD-20 and PGD-100
(step 0.01); the worst client's robust accuracy on its own label mix comes from the last
evaluation (PGD-20, 500 test images, summary.json's client_robustness).
Takes about len(methods) x (BUDGET + 90) seconds on this 2-core machine.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import mnist_8k_2k_npz, run_cli  # noqa: E402

METHODS = [
    ("natural", ["--method", "natural"]),
    ("PGD-AT", ["--method", "pgd"]),
    ("TRADES", ["--method", "trades"]),
    ("MART", ["--method", "mart"]),
    ("FGSM-RS", ["--method", "fgsm-rs"]),
    ("CalFAT (s=1)", ["--method", "calfat"]),
    ("CalFAT (s=10, paper)", ["--method", "calfat", "--calfat-scale", "paper"]),
    ("CalFAT (s=10, lr/10)", ["--method", "calfat", "--calfat-scale", "paper", "--lr", "0.002"]),
    ("FedProx + PGD-AT", ["--method", "pgd", "--prox-mu", "0.01"]),
    ("SFAT (PGD-AT)", ["--method", "pgd", "--aggregator", "sfat"]),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=150.0, help="seconds of training per method")
    parser.add_argument("--only", nargs="*", help="run only the methods whose label starts with one of these")
    parser.add_argument("--out", default=None, help="where runs go (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="methods_")
    os.makedirs(out, exist_ok=True)
    data = mnist_8k_2k_npz(os.path.join(out, "mnist8k.npz"))
    common = ["--dataset", "npz", "--data-file", data, "--preset", "mnist", "--workers", "2", "--clients", "4",
              "--partition", "dirichlet", "--beta", "0.5", "--time-budget", str(args.budget),
              "--eval-step-size", "0.01", "--eval-steps", "20", "--eval-samples", "500",
              "--final-attack", "pgd-100", "--final-samples", "1000"]
    print("| method | natural | PGD-20 | PGD-100 | worst client (PGD-20) | rounds |")
    print("|---|---|---|---|---|---|")
    with open(os.path.join(out, "log.txt"), "a") as log:
        for i, (label, extra) in enumerate(METHODS):
            if args.only and not any(label.lower().startswith(o.lower()) for o in args.only):
                continue
            try:
                s = run_cli(common + extra, out, f"m{i}", log)
            except SystemExit as e:  # e.g. the loss became NaN: a row of the table too
                print(f"| {label} | failed: {e} | | | | |", flush=True)
                continue
            final = s["final_attack"]["models"]["final"]  # natural, PGD-20 and PGD-100 on the same 1000 images
            worst = s["client_robustness"]["robust"]["worst"]
            print(f"| {label} | {100 * final['natural_acc']:.1f}% | {100 * final['yardstick_acc']:.1f}% | "
                  f"{100 * final['robust_acc']:.1f}% | {100 * worst:.1f}% | {s['rounds_completed']} |", flush=True)
    print(f"runs in {out}")


if __name__ == "__main__":
    main()
