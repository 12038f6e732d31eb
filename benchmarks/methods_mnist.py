"""The baselines a FAT paper compares against, at the same time budget on real MNIST, judged
by the AutoAttack authors' APGD-CE + APGD-T.

    python benchmarks/methods_mnist.py [--budget 540] [--only pgd mart ...] [--final-samples 1000] [--out DIR]

The 8k/2k split of the real MNIST test set (../shared/data/mnist-t10k), 4 clients on a
Dirichlet(0.5) label split, 2 workers, --time-budget BUDGET per method (the rounds get 85% of
it, the final attack the rest and whatever more it needs), our MNIST defaults otherwise
(eps 0.3; 10% of the training images held out for choosing the best models). While
training, each evaluation scores 500 validation images with the PGD-20 yardstick (step
0.0375). Every final model is then scored on --final-samples fixed class-stratified test images: natural
accuracy, the PGD-20 yardstick and APGD-CE + APGD-T (--final-attack apgd); the worst
client's robust accuracy on its own label mix comes from the last evaluation (PGD-20, the
test images, summary.json's client_robustness). Takes about len(methods) x (BUDGET + the
attack: ~5-10 min for 1000 images) on this 2-core machine: about 2.5 hours at 540 s.
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
    ("CalFAT (the authors' s=10, our default)", ["--method", "calfat"]),
    ("CalFAT (s=1, the old default)", ["--method", "calfat", "--calfat-scale", "1"]),
    ("FedProx + PGD-AT", ["--method", "pgd", "--prox-mu", "0.01"]),
    ("SFAT (PGD-AT)", ["--method", "pgd", "--aggregator", "sfat"]),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=540.0, help="seconds per method (--time-budget)")
    parser.add_argument("--final-samples", type=int, default=1000, help="test images for APGD-CE + APGD-T")
    parser.add_argument("--only", nargs="*", help="run only the methods whose label starts with one of these")
    parser.add_argument("--out", default=None, help="where runs go (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="methods_")
    os.makedirs(out, exist_ok=True)
    data = mnist_8k_2k_npz(os.path.join(out, "mnist8k.npz"))
    common = ["--dataset", "npz", "--data-file", data, "--preset", "mnist", "--workers", "2", "--clients", "4",
              "--partition", "dirichlet", "--beta", "0.5", "--time-budget", str(args.budget),
              "--eval-samples", "500", "--final-attack", "apgd", "--final-samples", str(args.final_samples)]
    print(f"| method | natural | PGD-20 (yardstick) | APGD-CE + APGD-T ({args.final_samples} images) | "
          "worst client (PGD-20) | rounds |")
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
            final = s["final_attack"]["models"]["final"]  # natural, PGD-20 and APGD on the same images
            worst = s["client_robustness"]["robust"]["worst"]
            print(f"| {label} | {100 * final['natural_acc']:.1f}% | {100 * final['yardstick_acc']:.1f}% | "
                  f"{100 * final['robust_acc']:.1f}% | {100 * worst:.1f}% | {s['rounds_completed']} |", flush=True)
    print(f"runs in {out}")


if __name__ == "__main__":
    main()
