"""Robust accuracy on real MNIST within a time budget, judged by APGD-CE + APGD-T (the
AutoAttack authors' code): our defaults vs the article's recipe.

    python benchmarks/mnist_real.py [--budget 540] [--final-samples 1000] [--only 0 1]

Builds an 8k/2k split of the real MNIST test set (../shared/data/mnist-t10k), then runs the
CLI with 2 workers and --time-budget BUDGET: our MNIST defaults on 2 IID clients (run 0), on
4 Dirichlet(0.5) clients (run 1), and the article's recipe (LeNet, CalFAT, lr 0.01 constant,
no epsilon warm-up, 40-step attack of step 0.01, batch 128) on 2 IID clients (run 2). Each
run ends with the default final attack, APGD-CE + APGD-T, on --final-samples fixed class-stratified test
images (it runs past the budget when that many images do not fit in its 15%); the row shows
natural accuracy, the PGD-20 yardstick (step 0.0375) and APGD-CE + APGD-T on those images.
Takes about 3 x (BUDGET + 10 min) on this 2-core machine; `--only 3` runs our defaults with
the article's training attack.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import mnist_8k_2k_npz, run_cli  # noqa: E402

ARTICLE_ATTACK = ["--attack-steps", "40", "--step-size", "0.01", "--batch-size", "128"]
RUNS = [
    ("defaults, 2 IID clients", []),
    ("defaults, 4 Dirichlet 0.5 clients", ["--clients", "4", "--partition", "dirichlet", "--beta", "0.5"]),
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
    parser.add_argument("--final-samples", type=int, default=1000, help="test images for APGD-CE + APGD-T")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="more train flags for every run (a recipe candidate), e.g. --extra --method trades")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="mnist_real_")
    os.makedirs(out, exist_ok=True)
    data = mnist_8k_2k_npz(os.path.join(out, "mnist8k.npz"))
    common = ["--dataset", "npz", "--data-file", data, "--preset", "mnist", "--workers", "2", "--clients", "2",
              "--time-budget", str(args.budget), "--final-attack", "apgd", "--final-samples", str(args.final_samples)]
    rows = []
    print("| run | rounds | wall | natural | PGD-20 yardstick | APGD-CE + APGD-T (images) |")
    print("|---|---|---|---|---|---|")
    with open(os.path.join(out, "log.txt"), "a") as log:
        for i, (label, extra) in enumerate(RUNS):
            if (args.only is not None and i not in args.only) or (args.only is None and i >= 3):
                continue
            s = run_cli(common + extra + args.extra, out, f"run{i}", log)
            final = s["final_attack"]["models"]["final"]  # natural, yardstick and APGD on the same images
            rows.append((label, s["rounds_completed"], final["natural_acc"], final["yardstick_acc"],
                         final["robust_acc"]))
            print(f"| {label} | {s['rounds_completed']} | {s['cli_s']:.0f} s | {100 * final['natural_acc']:.1f}% | "
                  f"{100 * final['yardstick_acc']:.1f}% | {100 * final['robust_acc']:.1f}% ({final['images']}) |",
                  flush=True)
    print(f"runs in {out}")
    by_label = {r[0]: r for r in rows}
    if "defaults, 2 IID clients" in by_label and "article recipe, IID" in by_label:
        ours, article = by_label["defaults, 2 IID clients"][4], by_label["article recipe, IID"][4]
        print(f"APGD-CE + APGD-T robust accuracy, defaults / article recipe (IID, same budget): "
              f"{100 * ours:.1f}% / {100 * article:.1f}% = {ours / max(article, 1e-9):.2f}x")

if __name__ == "__main__":
    main()
