"""Robust accuracy on real MNIST within a time budget, our defaults vs the article's recipe.

    python benchmarks/mnist_real.py [--budget 540]

Builds an 8k/2k split of the real MNIST test set (../shared/data/mnist-t10k), then runs the
CLI with 2 workers and 2 clients and --time-budget BUDGET three times: our MNIST defaults on
an IID split, the same on a Dirichlet(0.5) split, and the article's recipe (LeNet, CalFAT,
lr 0.01 constant, no epsilon warm-up, 40-step attack of step 0.01, batch 128) on the IID
split. Every run evaluates with PGD-20, eps 0.3, step 0.01 on the 2k test images.
Takes about 3 x BUDGET seconds; `--only 3` runs our defaults with the article's training
attack, to show what the cheaper attack is worth.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import mnist_8k_2k_npz, run_cli  # noqa: E402

ARTICLE_ATTACK = ["--attack-steps", "40", "--step-size", "0.01", "--batch-size", "128"]
RUNS = [
    ("defaults, IID", []),
    ("defaults, Dirichlet 0.5", ["--partition", "dirichlet", "--beta", "0.5"]),
    ("article recipe, IID", ["--model", "lenet", "--method", "calfat", "--lr", "0.01", "--lr-schedule", "constant",
                             "--eps-warmup-rounds", "0"] + ARTICLE_ATTACK),
    # Not run by default (--only 3): our defaults but the article's 40-step training attack.
    ("defaults, article attack, IID", ARTICLE_ATTACK),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=540.0, help="seconds per run")
    parser.add_argument("--out", default=None, help="where runs go (default: a temp dir)")
    parser.add_argument("--only", type=int, nargs="*", help="run only these runs (0-2 by default; 3 is "
                        "the defaults with the article's training attack)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="mnist_real_")
    os.makedirs(out, exist_ok=True)
    data = mnist_8k_2k_npz(os.path.join(out, "mnist8k.npz"))
    common = ["--dataset", "npz", "--data-file", data, "--preset", "mnist", "--workers", "2", "--clients", "2",
              "--time-budget", str(args.budget), "--epsilon", "0.3", "--eval-step-size", "0.01", "--eval-steps", "20"]
    rows = []
    with open(os.path.join(out, "log.txt"), "a") as log:
        for i, (label, extra) in enumerate(RUNS):
            if (args.only and i not in args.only) or (not args.only and i >= 3):
                continue
            s = run_cli(common + extra, out, f"run{i}", log)
            final, best = s["final"], s["best"]["robust"]
            rows.append((label, s["rounds_completed"], s["cli_s"], final["natural_acc"], final["robust_acc"],
                         best["robust_acc"], best["round"]))
            print(f"{label:<26} {s['rounds_completed']:>3} rounds {s['cli_s']:6.0f} s   final natural "
                  f"{100 * final['natural_acc']:5.1f}%  PGD-20 {100 * final['robust_acc']:5.1f}%   best PGD-20 "
                  f"{100 * best['robust_acc']:5.1f}% (round {best['round']})", flush=True)
    print(f"runs in {out}")
    by_label = {r[0]: r for r in rows}
    if "defaults, IID" in by_label and "article recipe, IID" in by_label:
        ours, article = by_label["defaults, IID"], by_label["article recipe, IID"]
        print(f"robust accuracy, defaults / article recipe (IID, same budget): "
              f"{100 * ours[4]:.1f}% / {100 * article[4]:.1f}% = {ours[4] / max(article[4], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
